"""Driving `cowctl` from tests: a state root per test module, the CLI run as a user would run it,
and a teardown that leaves no container, process, mount or cgroup behind even when a test fails."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CGROUP_PARENTS = (
    "/sys/fs/cgroup/unified/cowfs",
    "/sys/fs/cgroup/cowfs",
    "/sys/fs/cgroup/freezer/cowfs",
)


@dataclass
class Result:
    rc: int
    out: str
    err: str


class Ctl:
    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self, *args: str, timeout: float = 60, check: bool = False) -> Result:
        r = subprocess.run(
            [sys.executable, "-m", "lifecycle", "--root", str(self.root), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        res = Result(r.returncode, r.stdout, r.stderr)
        if check and r.returncode != 0:
            raise AssertionError(f"cowctl {' '.join(args)} -> {r.returncode}: {r.stderr.strip()}")
        return res

    def ok(self, *args: str, timeout: float = 60) -> str:
        return self(*args, timeout=timeout, check=True).out

    def inspect(self, ref: str) -> dict:
        return json.loads(self.ok("inspect", ref))[0]

    def state(self, ref: str) -> dict:
        return self.inspect(ref)["State"]

    def mounts(self) -> list[str]:
        return mounts_under(self.root)

    def wait_for(self, ref: str, cond, timeout: float = 15.0) -> dict:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while True:
            st = self.inspect(ref)
            if cond(st):
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting on {ref}: {st['State']}")
            time.sleep(0.05)


def mounts_under(root: Path) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4]
            if mnt.startswith(str(root) + "/"):
                out.append(mnt)
    return out


def cleanup(ctl: Ctl) -> list[str]:
    """rm -f every container, then verify and force: no mount under the root, no process or
    cgroup of ours left. Returns what had to be forced (a test may assert it is empty)."""
    forced = []
    # Only this root's containers: other users of the machine (a benchmark, another test run)
    # have cgroups under the same parent.
    ours = set()
    if (ctl.root / "containers").is_dir():
        ours = {d.name for d in (ctl.root / "containers").iterdir()}
    with contextlib.suppress(Exception):
        ids = ctl("ps", "-aq", "--no-trunc", timeout=60).out.split()
        ours.update(ids)
        if ids:
            ctl("rm", "-f", *ids, timeout=120)
    for parent in CGROUP_PARENTS:
        p = Path(parent)
        if not p.is_dir():
            continue
        for cg in p.iterdir():
            if not cg.is_dir() or cg.name not in ours:
                continue
            procs = (
                (cg / "cgroup.procs").read_text().split() if (cg / "cgroup.procs").exists() else []
            )
            if procs:
                forced.append(f"processes in {cg}")
                for pid in procs:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
                if (cg / "freezer.state").exists():
                    (cg / "freezer.state").write_text("THAWED\n")
                if (cg / "cgroup.freeze").exists():
                    (cg / "cgroup.freeze").write_text("0\n")
            for _ in range(100):
                try:
                    cg.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)
    for m in sorted(mounts_under(ctl.root), reverse=True):
        forced.append(f"mount {m}")
        subprocess.run(["umount", "-l", m], capture_output=True)
    for pid in daemons_under(ctl.root):
        forced.append(f"daemon {pid}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return forced


def daemons_under(root: Path) -> list[int]:
    """Live cowfs daemons and monitors whose command line points into the root."""
    pids = []
    key = os.fsencode(str(root))
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{d}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state == b"Z":
            continue
        if any(a.startswith(key) for a in argv) and any(
            b"cowfs" in a or b"lifecycle" in a for a in argv
        ):
            pids.append(int(d))
    return pids


@contextlib.contextmanager
def controller(root: Path) -> Iterator[Ctl]:
    ctl = Ctl(root)
    try:
        yield ctl
    finally:
        cleanup(ctl)


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[11]) + int(fields[12])
