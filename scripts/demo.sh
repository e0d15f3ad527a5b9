#!/usr/bin/env bash
# The main job: sets up (scripts/setup.sh), then
#   1. the filesystem demo: builds a two-layer image in a temporary directory, mounts it with cowfs,
#      shows copy-up and whiteouts, unmounts and cleans up;
#   2. the container demo: an image from busybox-static, three containers sharing its layers with
#      their own changes (df, diff), one paused and unpaused, all stopped and removed.
# Needs root and /dev/fuse. Everything happens under temporary directories.
#
#   scripts/demo.sh [--keep]      --keep leaves the filesystem demo's directories for inspection
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
"$ROOT/.venv/bin/python" -m cowfs.demo "$@"
echo
exec "$ROOT/.venv/bin/python" -m lifecycle.demo
