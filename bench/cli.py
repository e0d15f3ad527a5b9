"""The `python -m bench` command: arguments, the scratch directory's lifetime, the top-level error
handler and the exit codes.

Exit codes:
  0    every available target passed every workload's verification
  1    some measurement failed (mount error or wrong result); the results are still written
  2    bad arguments (one line on stderr)
  3    this machine cannot run the benchmark (not root, unusable scratch directory)
  130  interrupted (Ctrl-C, SIGTERM, SIGHUP); mounts and daemons are cleaned up all the same

Whatever happens, every container of the run's cowctl state root is force-removed, every mount
below the scratch directory is unmounted, every daemon serving one is ended, and the scratch
directory is removed (unless --keep), but never while something is still mounted below it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from types import FrameType

from bench.config import FULL, QUICK
from bench.containers import STATE, remove_all
from bench.report import markdown, write_all
from bench.runner import REPO, Progress, run
from bench.targets import TARGETS, end_daemons, mounts_under, unmount
from bench.workloads import workloads

__all__ = ["BenchError", "main"]

EXIT_FAILED, EXIT_USAGE, EXIT_ENV, EXIT_INTERRUPTED = 1, 2, 3, 130
USAGE = (
    "python -m bench [--quick] [--reps N] [--targets A,B] [--workloads A,B] "
    "[--out DIR] [--scratch DIR] [--keep] [--list]"
)


class BenchError(Exception):
    """A problem the user can fix; printed as one line, no traceback."""

    def __init__(self, msg: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(msg)
        self.exit_code = exit_code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise BenchError(f"{message} (usage: {USAGE})")


def build_parser() -> argparse.ArgumentParser:
    """The command line; see README.md's Benchmarks section."""
    p = _Parser(
        prog="bench",
        usage=USAGE,
        description="Benchmark cowfs against a plain directory (the floor), kernel overlayfs and "
        "fuse-overlayfs, mounted in turn over the same prepared layers. Results: results.json, "
        "results.md and chart.png in --out.",
        epilog="exit codes: " + __doc__.split("Exit codes:")[1].split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat: a smoke run")
    p.add_argument("--reps", type=int, help="interleaved repeats (default 5, --quick 1)")
    p.add_argument(
        "--targets", help="comma-separated subset of: " + ", ".join(t.name for t in TARGETS)
    )
    p.add_argument("--workloads", help="comma-separated subset of the workloads (see --list)")
    p.add_argument("--out", type=Path, help="results directory (default bench/results/<timestamp>)")
    p.add_argument(
        "--scratch",
        type=Path,
        default=Path("/var/tmp"),
        help="where layers and mounts go, on a disk filesystem (default /var/tmp)",
    )
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--list", action="store_true", help="list targets and workloads, then exit")
    return p


def _subset(arg: str | None, known: list[str], what: str) -> list[str]:
    if arg is None:
        return known
    names = [n.strip() for n in arg.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        shown = ", ".join(bad) if bad else repr(arg)
        raise BenchError(f"unknown {what}: {shown} (known: {', '.join(known)})")
    return [n for n in known if n in names]


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _cleanup(run_dir: Path, keep: bool) -> None:
    """Unmount and end everything below run_dir, then delete it (never across a live mount)."""
    # Containers first, by cowctl itself: it kills their processes and cgroups, then unmounts.
    for problem in remove_all(run_dir / "cowctl" / STATE):
        print(f"bench: warning: clean-up of containers: {problem}", file=sys.stderr)
    for m in reversed(mounts_under(run_dir)):
        unmount(Path(m))
    targets_dir = run_dir / "targets"
    if targets_dir.is_dir():
        for slot in targets_dir.iterdir():
            end_daemons(slot / "mnt")
    left = mounts_under(run_dir)
    if left:
        print(f"bench: warning: still mounted, {run_dir} kept: {', '.join(left)}", file=sys.stderr)
    elif keep:
        print(f"bench: scratch kept in {run_dir}", file=sys.stderr)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Parse, check the machine, run, report. Returns the exit code."""
    try:
        return _main(argv)
    except BenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(
            "\nbench: interrupted; mounts and daemons cleaned up, no results written",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    sizes = QUICK if args.quick else FULL
    all_loads = workloads(sizes)
    if args.list:
        for t in TARGETS:
            print(f"target    {t.name:<20} {t.description}")
        for w in all_loads:
            why = w.unavailable()
            print(
                f"workload  {w.name:<16} {w.description}"
                + (f" (not measured: {why})" if why else "")
            )
        return 0
    reps = sizes.reps if args.reps is None else args.reps
    if reps < 1:
        raise BenchError(f"--reps must be at least 1, got {reps}")
    target_names = _subset(args.targets, [t.name for t in TARGETS], "target")
    load_names = _subset(args.workloads, [w.name for w in all_loads], "workload")
    scratch = args.scratch.resolve()
    if any(c in str(scratch) for c in ",: \t\n\\"):
        raise BenchError(
            f"--scratch {scratch}: no commas, colons, backslashes or spaces "
            "(they would break lowerdir= options)"
        )
    if not scratch.is_dir():
        raise BenchError(f"--scratch {scratch}: not a directory")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = (args.out or REPO / "bench" / "results" / stamp).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BenchError(f"--out {out}: exists and is not an empty directory")

    if os.geteuid() != 0:
        raise BenchError("needs root (it mounts filesystems and drops caches)", EXIT_ENV)
    if not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        raise BenchError("/proc/sys/vm/drop_caches is not writable: cold runs impossible", EXIT_ENV)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        run_dir = Path(tempfile.mkdtemp(prefix="cowfs-bench-", dir=scratch))
    except OSError as e:
        raise BenchError(f"--scratch {scratch}: {e.strerror}", EXIT_ENV) from None
    progress = Progress()
    try:
        res = run(
            sizes,
            reps,
            [t for t in TARGETS if t.name in target_names],
            [w for w in all_loads if w.name in load_names],
            run_dir,
            progress,
        )
    finally:
        progress.done()
        _cleanup(run_dir, args.keep)
    write_all(res, out)
    sys.stdout.write(markdown(res))
    print(
        f"bench: results in {out}" + ("" if res["chart"] else f" (no chart: {res['chart_note']})"),
        file=sys.stderr,
    )
    return EXIT_FAILED if any(r["status"] != "ok" for r in res["results"]) else 0
