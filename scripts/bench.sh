#!/usr/bin/env bash
# Benchmarks (bench/): not written yet. `scripts/setup.sh --bench` installs what they will need
# (fio, fuse-overlayfs); results are meant to go to bench/results/ (git-ignored).
echo "benchmarks: not yet implemented" >&2
exit 2
