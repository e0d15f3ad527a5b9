"""One benchmark run: prepare the layers, run every (workload, repeat, target) step in interleaved
order, and return the JSON-ready results.

Order: for each workload, repeat r runs the targets A B C D, then repeat r+1 runs A B C D again,
so slow drifts of a shared machine hit every target alike. Each step is: drop caches (which
also writes back the previous step's dirty data), a fresh mount, then either drop caches again
(cold workloads) or warm the host cache for the workload's inputs by reading them from the
layers directly (never through the target), the workload, and the unmount; on the floor the
workload's changes are undone after it. A step that fails (mount error,
verification error, anything but Ctrl-C) is recorded and the run goes on; the (workload, target)
pair is then reported as failed and no number is shown for it.

The container workloads (bench/containers.py) mount nothing: their step only syncs (no dropped
caches: they time whole commands as a user runs them, interpreter start-up included) and calls
`run_unmounted` with the target's name as cowctl's storage driver; targets they do not apply to
(the floor, fuse-overlayfs) are listed as not applicable, not as failed.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from bench.config import Sizes
from bench.layers import Layers, prepare
from bench.stats import RATIO_PAIRS, speed_ratio, summarize
from bench.targets import Target, drop_caches
from bench.workloads import Ctx, Workload

__all__ = ["Progress", "run"]

REPO = Path(__file__).resolve().parent.parent


class Progress:
    """One status line on stderr: rewritten in place on a terminal, one line per step otherwise
    (logs, pytest). Notes (failures) go on their own lines."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.t0 = time.monotonic()
        self._open = False

    def _clock(self) -> str:
        s = int(time.monotonic() - self.t0)
        return f"{s // 60:d}:{s % 60:02d}"

    def step(self, text: str) -> None:
        line = f"bench {self._clock()} {text}"
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self._open = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        self.done()
        self.stream.write(f"bench: {text}\n")
        self.stream.flush()

    def done(self) -> None:
        if self._open:
            self.stream.write("\n")
            self._open = False


def _version(cmd: list[str], marker: str = "") -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in (r.stdout + r.stderr).splitlines():
        if marker in line:
            return line.strip()
    return None


def host_info() -> dict[str, Any]:
    """What the numbers were measured on, including whether cowfs had uncommitted changes."""
    mem_kib = 0
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    rev = _version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _version(["git", "-C", str(REPO), "status", "--porcelain", "--", "cowfs"], "cowfs")
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "mem_gib": round(mem_kib / 2**20, 1),
        "python": platform.python_version(),
        "fio": _version(["fio", "--version"], "fio"),
        "fuse_overlayfs": _version(["fuse-overlayfs", "--version"], "fuse-overlayfs"),
        "cowfs_rev": (rev or "unknown") + (" (uncommitted changes in cowfs/)" if dirty else ""),
    }


def _log_problems(log: Path | None) -> list[str]:
    """WARNING/ERROR lines the cowfs daemon logged during one step."""
    if log is None or not log.exists():
        return []
    text = log.read_text(errors="replace").splitlines()
    return [
        x for x in text if any(k in x for k in (" WARNING ", " ERROR ", " CRITICAL ", "Traceback"))
    ]


def _unmounted_step(w: Workload, t: Target, workdir: Path) -> dict[str, Any]:
    os.sync()  # the previous step's dirty data is written back before, not during, this one
    try:
        metrics, extras = w.run_unmounted(workdir, t.name)
        return {"status": "ok", "metrics": metrics, "daemon_cpu_s": None, "extras": extras}
    except Exception as e:  # recorded, the run goes on; KeyboardInterrupt is not caught
        return {"status": "failed", "error": f"{type(e).__name__}: {e}"}


def _step(w: Workload, t: Target, layers: Layers, slot: Path) -> dict[str, Any]:
    # Every step starts from the same memory state. Without this the page cache left by earlier
    # steps leaked into later ones: the same 512 MiB buffered write on the floor ran at 400 or
    # 5,000 MiB/s depending on what ran before it.
    drop_caches()
    sample: dict[str, Any] = {"status": "ok"}
    log = None
    try:
        with t.mounted(layers, slot) as m:
            log = m.log
            if w.cold:
                drop_caches()  # again: nothing the mount itself touched stays cached
            else:
                w.prewarm(layers)
            ctx = Ctx(root=m.root, pid=m.pid, layers=layers, target=t.name)
            sample["metrics"] = w.run(ctx)
            sample["daemon_cpu_s"] = ctx.cpu_s if m.pid else None
            sample["extras"] = ctx.extras
    except Exception as e:  # recorded, the run goes on; KeyboardInterrupt is not caught
        sample = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    finally:
        if t.name == "floor":
            w.restore_floor(layers)
    problems = _log_problems(log)
    if problems:
        sample["daemon_log"] = problems[:5]
    return sample


def _memory(samples: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Daemon memory after the cold stat walk: peak RSS and the growth per inode walked."""
    rows = [
        s["extras"] for s in samples if s["status"] == "ok" and "after_VmHWM_kib" in s["extras"]
    ]
    if not rows:
        return None
    per_inode = [(r["after_VmHWM_kib"] - r["before_VmRSS_kib"]) * 1024 / r["entries"] for r in rows]
    return {
        "rss_after_mount_kib": summarize([r["before_VmRSS_kib"] for r in rows]),
        "peak_rss_after_walk_kib": summarize([r["after_VmHWM_kib"] for r in rows]),
        "inodes_walked": rows[0]["entries"],
        "bytes_per_inode": summarize(per_inode),
    }


def run(
    sizes: Sizes,
    reps: int,
    targets: list[Target],
    loads: list[Workload],
    scratch: Path,
    progress: Progress,
) -> dict[str, Any]:
    """Run the benchmark in scratch (an empty directory) and return the results document."""
    started = datetime.now(UTC)
    target_rows = []
    for t in targets:
        reason = t.unavailable(scratch)
        target_rows.append(
            {
                "name": t.name,
                "description": t.description,
                "status": "unavailable" if reason else "ok",
                "reason": reason,
            }
        )
        if reason:
            progress.note(f"target {t.name} unavailable: {reason}")
    live_targets = [t for t, row in zip(targets, target_rows, strict=True) if row["status"] == "ok"]

    workload_rows = []
    live_loads = []
    for w in loads:
        reason = w.unavailable()
        skipped = [t.name for t in targets if not w.applies(t.name)]
        workload_rows.append(
            {
                "name": w.name,
                "description": w.description,
                "cold": w.cold,
                "status": "unavailable" if reason else "ok",
                "reason": reason,
                "metrics": [asdict(m) for m in w.metrics],
                "reps": min(reps, w.max_reps or reps),
                "not_applicable": skipped,
                "not_applicable_reason": w.not_applicable if skipped else None,
            }
        )
        if reason:
            progress.note(f"workload {w.name} not measured: {reason}")
        else:
            live_loads.append(w)

    layers = None
    if any(w.mounts for w in live_loads):
        progress.step(f"preparing layers ({sizes.name} sizes) in {scratch}")
        layers = prepare(scratch / "data", sizes)
        drop_caches()  # write the fresh layers back now, not during the first measurements

    samples: dict[tuple[str, str], list[dict[str, Any]]] = {}
    steps = [
        (w, r, t)
        for w in live_loads
        for r in range(min(reps, w.max_reps or reps))
        for t in live_targets
        if w.applies(t.name)
    ]
    t_run = time.monotonic()
    for i, (w, r, t) in enumerate(steps):
        eta = ""
        if i:
            left = (time.monotonic() - t_run) / i * (len(steps) - i)
            eta = f", ~{int(left) // 60}:{int(left) % 60:02d} left"
        w_reps = min(reps, w.max_reps or reps)
        progress.step(f"[{i + 1}/{len(steps)}{eta}] {w.name} rep {r + 1}/{w_reps} on {t.name}")
        if w.mounts:
            assert layers is not None
            sample = _step(w, t, layers, scratch / "targets" / t.name)
        else:
            sample = _unmounted_step(w, t, scratch / "cowctl")
        sample["rep"] = r
        samples.setdefault((w.name, t.name), []).append(sample)
        if sample["status"] != "ok":
            progress.note(f"{w.name} on {t.name} (rep {r + 1}) FAILED: {sample['error']}")
        for line in sample.get("daemon_log", []):
            progress.note(f"{w.name} on {t.name}: daemon log: {line}")
    progress.done()

    results = []
    for w in live_loads:
        for t in live_targets:
            if not w.applies(t.name):
                continue
            ss = samples[(w.name, t.name)]
            failed = [s for s in ss if s["status"] != "ok"]
            row: dict[str, Any] = {
                "workload": w.name,
                "target": t.name,
                "status": "failed" if failed else "ok",
                "verified": not failed,
                "errors": sorted({s["error"] for s in failed}),
                "samples": ss,
            }
            if not failed:
                row["summary"] = {
                    m.name: summarize([s["metrics"][m.name] for s in ss]) for m in w.metrics
                }
                cpu = [s["daemon_cpu_s"] for s in ss if s["daemon_cpu_s"] is not None]
                row["daemon_cpu_s"] = summarize(cpu) if cpu else None
            results.append(row)

    medians = {
        (r["workload"], r["target"], m): v["median"]
        for r in results
        if r["status"] == "ok"
        for m, v in r["summary"].items()
    }
    ratios: dict[str, dict[str, float | None]] = {}
    for w in live_loads:
        for m in w.metrics:
            if not m.speed:
                continue
            row_r = {}
            for a, b in RATIO_PAIRS:
                if b == "floor" and not m.vs_floor:
                    continue
                va, vb = medians.get((w.name, a, m.name)), medians.get((w.name, b, m.name))
                if va is not None and vb is not None:
                    row_r[f"{a}/{b}"] = speed_ratio(va, vb, m.higher_is_better)
            ratios[m.name] = row_r

    memory = {}
    for t in live_targets:
        if t.fuse and ("walk_cold", t.name) in samples:
            mem = _memory(samples[("walk_cold", t.name)])
            if mem:
                memory[t.name] = mem

    finished = datetime.now(UTC)
    return {
        "schema": "cowfs-bench/1",
        "mode": sizes.name,
        "reps": reps,
        "sizes": sizes.as_dict(),
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "duration_s": round((finished - started).total_seconds(), 1),
        "host": host_info(),
        "targets": target_rows,
        "workloads": workload_rows,
        "results": results,
        "ratios": ratios,
        "memory": memory,
    }
