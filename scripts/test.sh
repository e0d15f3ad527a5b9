#!/usr/bin/env bash
# Run the test suite: set up (scripts/setup.sh), lint with ruff, then pytest.
#
#   scripts/test.sh [PYTEST ARGS...]      e.g. scripts/test.sh -x -k copyup
#
# Exit code: pytest's own; 1 if pytest passed but ruff found problems; pytest's 5 ("no tests
# collected") stays a failure. COWFS_REQUIRE_FUSE=1 (set by .ci/run) makes real-mount tests fail
# instead of skipping when FUSE is unavailable.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh" || exit $?
cd "$ROOT" || exit 1
PY="$ROOT/.venv/bin/python"

# Lint first, so that pytest's summary is the last thing printed.
lint_dirs=()
for d in cowfs lifecycle tests bench; do
    [ -d "$d" ] && lint_dirs+=("$d")
done
lint_rc=0
"$PY" -m ruff check --quiet --output-format=concise "${lint_dirs[@]}" || lint_rc=$?
[ "$lint_rc" -eq 0 ] || echo "test.sh: ruff check failed (exit $lint_rc); running the tests anyway" >&2

rc=0
"$PY" -m pytest "$@" || rc=$?

if [ "$rc" -eq 5 ]; then
    echo "test.sh: FAILED: pytest collected no tests (exit 5)" >&2
    exit 5
fi
if [ "$rc" -ne 0 ]; then
    exit "$rc"
fi
if [ "$lint_rc" -ne 0 ]; then
    echo "test.sh: FAILED: the tests passed but ruff check did not (see above)" >&2
    exit 1
fi
