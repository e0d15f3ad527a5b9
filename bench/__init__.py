"""Storage benchmarks of cowfs against the plain directory (floor), kernel overlayfs and
fuse-overlayfs, all mounted in turn over the same prepared layers (issue 4).

Run `scripts/bench.sh` (set-up, then `python -m bench`); `--quick` is the smoke run the test suite
uses. Modules: `config` (sizes), `layers` (the prepared layers and expected values), `targets`
(mounting and daemons), `workloads` (timing and verification), `containers` (the cowctl
workloads: container cycle and footprint), `stats` (pure numbers), `runner`
(interleaved repeats), `report` (JSON, Markdown, PNG), `cli` (arguments, exit codes, clean-up).
"""
