#!/usr/bin/env bash
# Benchmarks: cowfs against a plain directory, kernel overlayfs and fuse-overlayfs (bench/).
#
#   scripts/bench.sh [--quick] [BENCH ARGS...]     (as root)
#
# Sets the machine up first (scripts/setup.sh --bench: fio, fuse-overlayfs, matplotlib), then runs
# `.venv/bin/python -m bench` with the arguments: the full run by default (~10-15 min), `--quick`
# for a smoke run. Results go to bench/results/<timestamp>/ (results.json, results.md, chart.png);
# the Markdown table is also printed. `scripts/bench.sh --help` lists the harness's options.
# Exit code: the harness's (0 all verified, 1 a target failed a workload, 2 bad arguments,
# 3 machine unsuitable, 130 interrupted).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh" --bench
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m bench "$@"
