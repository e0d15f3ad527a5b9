"""One cgroup per container, for freezing and for killing the whole tree at once. cgroup v2
(`cgroup.freeze`, `cgroup.events`, `cgroup.kill`) wherever a cgroup2 hierarchy is mounted (on the
hybrid hosts here it sits at /sys/fs/cgroup/unified), the v1 freezer otherwise. The cowfs daemon
and the monitor never join it: a frozen daemon would wedge every container request."""

from __future__ import annotations

import errno
import functools
import os
import signal
import time
from pathlib import Path

__all__ = ["Cgroup", "FreezeTimeout", "cgroup_for"]

PREFIX = "cowfs"


class FreezeTimeout(Exception):
    pass


def _mounts() -> list[tuple[str, str, list[str]]]:
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rfields = right.split()
            out.append((fields[4], rfields[0], rfields[2].split(",") if len(rfields) > 2 else []))
    return out


def _roots() -> tuple[Path | None, Path | None]:
    v2 = v1 = None
    for mnt, fstype, opts in _mounts():
        if fstype == "cgroup2" and v2 is None:
            v2 = Path(mnt)
        elif fstype == "cgroup" and "freezer" in opts and v1 is None:
            v1 = Path(mnt)
    return v2, v1


class Cgroup:
    """A container's cgroup; `v2` tells which freezer interface it uses."""

    def __init__(self, path: Path, v2: bool) -> None:
        self.path = path
        self.v2 = v2

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(f"{pid}\n")

    def pids(self) -> list[int]:
        try:
            text = (self.path / "cgroup.procs").read_text()
        except FileNotFoundError:
            return []
        return [int(x) for x in text.split()]

    def _frozen(self) -> bool:
        if self.v2:
            for line in (self.path / "cgroup.events").read_text().splitlines():
                k, _, v = line.partition(" ")
                if k == "frozen":
                    return v.strip() == "1"
            return False
        return (self.path / "freezer.state").read_text().strip() == "FROZEN"

    def freeze(self, timeout: float) -> None:
        """Freeze, or thaw again and raise FreezeTimeout: a task blocked in an uninterruptible
        wait (a FUSE request, for one) cannot be frozen, and a half-frozen container is worse
        than a running one."""
        if self.v2:
            (self.path / "cgroup.freeze").write_text("1\n")
        else:
            (self.path / "freezer.state").write_text("FROZEN\n")
        deadline = time.monotonic() + timeout
        delay = 0.001
        while not self._frozen():
            if time.monotonic() > deadline:
                self.thaw()
                raise FreezeTimeout(f"unable to freeze within {timeout:g}s")
            if not self.v2:
                (self.path / "freezer.state").write_text("FROZEN\n")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def thaw(self) -> None:
        if self.v2:
            (self.path / "cgroup.freeze").write_text("0\n")
        else:
            (self.path / "freezer.state").write_text("THAWED\n")

    def is_frozen(self) -> bool:
        try:
            return self._frozen()
        except FileNotFoundError:
            return False

    def kill(self) -> None:
        """SIGKILL every task, frozen or not."""
        if self.v2 and (self.path / "cgroup.kill").exists():
            try:
                (self.path / "cgroup.kill").write_text("1\n")
                return
            except FileNotFoundError:
                return
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not self.v2:
            self.thaw()  # v1 delivers SIGKILL to frozen tasks only once thawed

    def remove(self, timeout: float = 5.0) -> None:
        """rmdir, retried while the killed tasks are still being reaped (EBUSY)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)


def cgroup_for(cid: str) -> Cgroup:
    parent, v2 = _parent()
    return Cgroup(parent / cid, v2)


@functools.cache
def _parent() -> tuple[Path, bool]:
    """Where our cgroups live and which freezer they use: found once per process (reconcile
    asks for every container)."""
    v2, v1 = _roots()
    if v2 is not None and _can_freeze(v2):
        return v2 / PREFIX, True
    if v1 is not None:
        return v1 / PREFIX, False
    raise OSError(
        errno.ENOTSUP, "no cgroup freezer (neither cgroup2 nor the v1 freezer is mounted)"
    )


def _can_freeze(v2: Path) -> bool:
    """The root cgroup has no cgroup.freeze file; a child does when the kernel has the v2
    freezer (5.2+). Checked once by creating our parent directory."""
    parent = v2 / PREFIX
    try:
        parent.mkdir(exist_ok=True)
    except OSError:
        return False
    return (parent / "cgroup.freeze").exists()
