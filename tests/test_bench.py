"""The benchmark harness (bench/) end to end in its --quick mode, plus its argument handling and
ratio arithmetic.

Never asserts a timing: the machine is shared and the sizes are tiny. What it does assert is that
every target and workload is accounted for, that every measurement that ran passed its
verification, that the outputs are written, and that nothing stays mounted or running. Targets and
workloads whose tool is missing (fio, fuse-overlayfs and matplotlib come only with
`scripts/setup.sh --bench`, which scripts/test.sh does not run) must be reported as unavailable
with a reason, and the rest must still pass. The container workloads run through cowctl on its
two storage drivers only (overlay and cowfs targets); they need busybox-static, which
scripts/setup.sh installs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["floor", "overlay", "fuse-overlayfs", "cowfs"]
WORKLOADS = [
    "seqread_cold",
    "seqread_warm",
    "randread_4k",
    "copyup",
    "seqwrite",
    "walk_cold",
    "walk_warm",
    "ls_lR",
    "readdir_cold",
    "readdir_warm",
    "create_delete",
    "rm_lower",
    "untar",
    "container_cycle",
    "container_footprint",
]
CONTAINER_WORKLOADS = {"container_cycle", "container_footprint"}
DRIVER_TARGETS = {"overlay", "cowfs"}  # cowctl's storage drivers


def _bench(*args: str, timeout: float = 85) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _processes_naming(path: Path) -> list[int]:
    needle = os.fsencode(str(path))
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if needle in f.read():
                        pids.append(int(d))
            except OSError:
                pass
    return pids


@pytest.mark.fuse
def test_quick_run_end_to_end(tmp_path: Path) -> None:
    out, scratch = tmp_path / "results", tmp_path / "scratch"
    scratch.mkdir()
    r = _bench("--quick", "--out", str(out), "--scratch", str(scratch))
    assert r.returncode == 0, r.stderr[-4000:]

    res = json.loads((out / "results.json").read_text())
    assert res["mode"] == "quick" and res["reps"] == 1

    targets = {t["name"]: t for t in res["targets"]}
    assert list(targets) == TARGETS
    for name in ("floor", "overlay", "cowfs"):
        assert targets[name]["status"] == "ok", targets[name]
    have_fo = shutil.which("fuse-overlayfs") is not None
    assert targets["fuse-overlayfs"]["status"] == ("ok" if have_fo else "unavailable")
    if not have_fo:
        assert "fuse-overlayfs" in targets["fuse-overlayfs"]["reason"]
    live_targets = [t for t in TARGETS if targets[t]["status"] == "ok"]

    loads = {w["name"]: w for w in res["workloads"]}
    assert list(loads) == WORKLOADS
    have_fio = shutil.which("fio") is not None
    have_busybox = os.path.exists("/bin/busybox")
    for name in WORKLOADS:
        if name == "randread_4k":
            want = "ok" if have_fio else "unavailable"
        elif name in CONTAINER_WORKLOADS:
            want = "ok" if have_busybox else "unavailable"
        else:
            want = "ok"
        assert loads[name]["status"] == want, loads[name]
    if not have_fio:
        assert "fio" in loads["randread_4k"]["reason"]
    for name in CONTAINER_WORKLOADS:
        assert loads[name]["not_applicable"] == ["floor", "fuse-overlayfs"]
        assert "not applicable" in loads[name]["not_applicable_reason"]
        if not have_busybox:
            assert loads[name]["reason"].startswith("busybox-static missing")
    live_loads = [w for w in WORKLOADS if loads[w]["status"] == "ok"]

    def applies(w: str, t: str) -> bool:
        return w not in CONTAINER_WORKLOADS or t in DRIVER_TARGETS

    results = {(x["workload"], x["target"]): x for x in res["results"]}
    assert set(results) == {(w, t) for w in live_loads for t in live_targets if applies(w, t)}
    for (w, t), row in results.items():
        assert row["status"] == "ok" and row["verified"], (w, t, row["errors"])
        assert len(row["samples"]) == 1
        for m in loads[w]["metrics"]:
            value = row["samples"][0]["metrics"][m["name"]]
            assert math.isfinite(value) and value > 0, (w, t, m["name"], value)
            assert row["summary"][m["name"]]["median"] == value
        if w in CONTAINER_WORKLOADS:
            assert row["daemon_cpu_s"] is None  # each container has its own daemon
        elif t in ("fuse-overlayfs", "cowfs"):
            assert row["daemon_cpu_s"]["median"] >= 0
        else:
            assert row["daemon_cpu_s"] is None

    metrics = [m for w in live_loads for m in loads[w]["metrics"] if m["speed"]]
    assert set(res["ratios"]) == {m["name"] for m in metrics}
    for m in metrics:
        ratio = res["ratios"][m["name"]]
        assert ratio["cowfs/overlay"] > 0
        # copy-up on the floor is an in-place append, not a copy: no ratio to it
        assert ("cowfs/floor" in ratio) == m["vs_floor"]
        container = any(m in loads[w]["metrics"] for w in CONTAINER_WORKLOADS if w in live_loads)
        assert ("cowfs/fuse-overlayfs" in ratio) == (have_fo and not container)

    if have_busybox:
        for t in DRIVER_TARGETS:
            cyc = results[("container_cycle", t)]["samples"][0]["metrics"]
            phases = sum(cyc[f"cycle_{p}"] for p in ("create", "start", "stop", "rm"))
            assert math.isclose(cyc["cycle"], phases)
            # The storage claim (bytes, not time): N containers share the image's layers.
            fp = results[("container_footprint", t)]["samples"][0]
            n = fp["extras"]["containers"]
            assert n == res["sizes"]["containers"] == len(fp["extras"]["uppers_bytes"])
            m = fp["metrics"]
            assert m["footprint"] < m["footprint_copies"]
            assert m["footprint_ratio"] == m["footprint"] / m["footprint_copies"] < 1
            assert m["footprint_state_root"] >= m["footprint"]

    mem = res["memory"]["cowfs"]
    sz = res["sizes"]
    leaves = sz["tree_top"] * sz["tree_sub"]
    assert mem["inodes_walked"] == 1 + sz["tree_top"] + leaves * (1 + sz["tree_files"])
    assert mem["peak_rss_after_walk_kib"]["median"] >= mem["rss_after_mount_kib"]["median"] > 0
    assert "bytes_per_inode" in mem

    md = (out / "results.md").read_text()
    assert "| metric | unit | " + " | ".join(live_targets) + " |" in md
    for w in live_loads:
        for m in loads[w]["metrics"]:
            assert f"| {m['label']} | {m['unit']} |" in md
    if have_busybox:
        assert "| n/a |" in md and "not applicable" in md
    assert "FAILED" not in md
    assert md in r.stdout

    if importlib.util.find_spec("matplotlib") is not None:
        assert res["chart"] == "chart.png"
        assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert res["chart"] is None and "matplotlib" in res["chart_note"]

    # Clean-up: the run's scratch directory is gone, nothing is mounted or running there.
    assert list(scratch.iterdir()) == []
    with open("/proc/self/mountinfo") as f:
        assert str(scratch) not in f.read()
    assert _processes_naming(scratch) == []


@pytest.mark.parametrize(
    ("args", "word"),
    [
        (["--reps", "0"], "--reps"),
        (["--targets", "floor,nfs"], "nfs"),
        (["--workloads", "dd"], "dd"),
        (["--frobnicate"], "--frobnicate"),
        (["--scratch", "/nonexistent-dir"], "not a directory"),
        (["--scratch", "/tmp/a,b"], "commas"),
    ],
)
def test_bad_arguments_one_line_exit_2(args: list[str], word: str) -> None:
    r = _bench(*args, timeout=30)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench: error: ") and word in lines[0]
    assert r.stdout == ""


def test_speed_ratio_direction() -> None:
    # bench/ is not an installed package: load its pure module by path.
    spec = importlib.util.spec_from_file_location("bench_stats", ROOT / "bench" / "stats.py")
    assert spec is not None and spec.loader is not None
    stats = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stats)
    speed_ratio, summarize = stats.speed_ratio, stats.summarize
    assert speed_ratio(50.0, 100.0, higher_is_better=True) == 0.5  # half the throughput
    assert speed_ratio(2.0, 1.0, higher_is_better=False) == 0.5  # twice the time
    assert speed_ratio(0.0, 1.0, higher_is_better=True) is None
    assert summarize([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}


DF_V = """\
TYPE         TOTAL   ACTIVE   SIZE     RECLAIMABLE
Images       1       0        2.06MB   2.06MB (100%)
Containers   2       0        213kB    213kB (100%)

Images space usage:

REPOSITORY   TAG      IMAGE ID       SIZE     SHARED SIZE   UNIQUE SIZE   CONTAINERS
bb           latest   fe9e89ee2f87   2.06MB   0B            2.06MB        2

Containers space usage:

CONTAINER ID   IMAGE   SIZE    STATUS    NAMES
25c6aca6041f   bb      106kB   exited    fp-cowfs-1
8bd6d897dc2d   bb      107kB   exited    fp-cowfs-2
"""


def test_parse_cowctl_df(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.containers import parse_df, parse_size

    assert parse_size("0B") == 0 and parse_size("106kB") == 106_000
    assert parse_size("2.06MB") == 2_060_000 and parse_size("1.5GB") == 1.5e9
    df = parse_df(DF_V)
    assert df["images_total"] == 2_060_000 and df["containers_total"] == 213_000
    assert df["images"] == {"bb:latest": {"size": 2_060_000, "containers": 2}}
    assert df["containers"] == {"fp-cowfs-1": 106_000, "fp-cowfs-2": 107_000}
