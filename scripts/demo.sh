#!/usr/bin/env bash
# The cowfs demo: sets up (scripts/setup.sh), then builds a two-layer image in a temporary directory,
# mounts it with cowfs, shows copy-up and whiteouts, unmounts and cleans up. Needs root and /dev/fuse.
#
#   scripts/demo.sh [--keep]      --keep leaves the temporary directories for inspection
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/python" -m cowfs.demo "$@"
