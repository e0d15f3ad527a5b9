"""The four targets, each mounted over the same prepared layers, and the process/mount plumbing
they need.

Rules callers keep: a target is only used inside `with target.mounted(...)`, which always
unmounts (lazily if busy) and always ends the daemon it started, even on an exception or Ctrl-C;
each union mount starts from a fresh upper directory seeded from `layers/upper-seed`. The daemon
of a FUSE target is found by its command line naming the mount point, which is unique per target.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.layers import Layers

__all__ = [
    "TARGETS",
    "Mounted",
    "Target",
    "daemon_cpu_seconds",
    "daemon_memory_kib",
    "drop_caches",
    "end_daemons",
    "is_mounted",
    "mounts_under",
    "run_cmd",
    "unmount",
]

CLK_TCK = os.sysconf("SC_CLK_TCK")


class MountError(RuntimeError):
    """A target could not be mounted: recorded as that measurement's failure."""


@dataclass(frozen=True)
class Mounted:
    """A mounted target: where to work and (FUSE targets) which process serves it."""

    root: Path
    pid: int | None
    log: Path | None = None


def _mountinfo_paths() -> list[str]:
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            raw = line.split()[4]
            out.append(raw.replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\"))
    return out


def is_mounted(path: Path) -> bool:
    """Whether something is mounted exactly at path."""
    return os.path.realpath(path) in _mountinfo_paths()


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below root: the final safety net before scratch is deleted."""
    r = os.path.realpath(root)
    return [m for m in _mountinfo_paths() if m == r or m.startswith(r + "/")]


def unmount(path: Path) -> None:
    """umount; if it stays busy, lazy-unmount so the mount can never outlive the run."""
    for _ in range(5):
        if not is_mounted(path):
            return
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            time.sleep(0.2)
    if is_mounted(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def daemon_pids(mnt: Path) -> list[int]:
    """Processes (other than this one) whose argv names mnt: the daemon serving a FUSE mount."""
    target = os.fsencode(os.path.realpath(mnt))
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if target in argv:
            pids.append(int(d))
    return pids


def daemon_cpu_seconds(pid: int) -> float:
    """utime + stime of pid (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def daemon_memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of pid, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def run_cmd(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
    """Run a workload's command (find, ls, tar, rm, fio) in its own process group, and kill the
    whole group if anything interrupts it: fio forks its jobs, and a child left reading a mount
    would keep it busy after Ctrl-C."""
    env = {**os.environ, "LC_ALL": "C"}
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True
    ) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def drop_caches() -> None:
    """Cold cache: write back dirty data, then drop page cache, dentries and inodes."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as f:
        f.write("3\n")


def _end_process(pid: int, deadline_s: float = 10.0) -> None:
    """A FUSE daemon exits by itself once unmounted; wait for that, then TERM, then KILL."""
    end = time.monotonic() + deadline_s
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            end = time.monotonic() + 3
        while time.monotonic() < end:
            if not os.path.exists(f"/proc/{pid}") or _is_zombie(pid):
                return
            time.sleep(0.02)


def end_daemons(mnt: Path) -> None:
    """End every process still serving (or naming) mnt: call after unmounting it."""
    for pid in daemon_pids(mnt):
        _end_process(pid)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class Target:
    """One way of presenting the layers. Subclasses implement `_mount`."""

    name = ""
    description = ""
    fuse = False

    def unavailable(self, scratch: Path) -> str | None:
        """Why this target cannot run on this machine (None when it can)."""
        return None

    @contextlib.contextmanager
    def mounted(self, layers: Layers, slot: Path) -> Iterator[Mounted]:
        """Mount over layers in slot (upper, work and mnt below it); always unmount."""
        mnt = slot / "mnt"
        upper, work = slot / "upper", slot / "work"
        unmount(mnt)  # a leftover from an interrupted earlier measurement
        for p in (upper, work):
            if p.exists():
                shutil.rmtree(p)
        mnt.mkdir(parents=True, exist_ok=True)
        work.mkdir()
        subprocess.run(["cp", "-a", f"{layers.seed}/.", str(upper)], check=True)
        pids: list[int] = []
        try:
            log = self._mount(layers, upper, work, mnt, slot)
            if not is_mounted(mnt):
                raise MountError(f"{self.name}: mount command succeeded but nothing is mounted")
            pid = None
            if self.fuse:
                pids = daemon_pids(mnt)
                if len(pids) != 1:
                    raise MountError(f"{self.name}: expected one daemon for {mnt}, found {pids}")
                pid = pids[0]
            yield Mounted(root=mnt, pid=pid, log=log)
        finally:
            unmount(mnt)
            for pid in pids or daemon_pids(mnt):
                _end_process(pid)

    def _mount(self, layers: Layers, upper: Path, work: Path, mnt: Path, slot: Path) -> Path | None:
        raise NotImplementedError

    @staticmethod
    def _opts(layers: Layers, upper: Path, work: Path) -> str:
        return f"lowerdir={':'.join(map(str, layers.lowers))},upperdir={upper},workdir={work}"

    @staticmethod
    def _run(cmd: list[str], what: str) -> None:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            msg = (r.stderr or r.stdout).strip().splitlines()
            raise MountError(f"{what} failed ({r.returncode}): {msg[-1] if msg else ''}")


class Floor(Target):
    """The flattened layers in a plain directory: no union at all, the speed limit."""

    name = "floor"
    description = "plain directory holding the flattened layers"

    @contextlib.contextmanager
    def mounted(self, layers: Layers, slot: Path) -> Iterator[Mounted]:
        yield Mounted(root=layers.flat, pid=None)


class KernelOverlay(Target):
    name = "overlay"
    description = "kernel overlayfs (mount -t overlay), module defaults"

    def unavailable(self, scratch: Path) -> str | None:
        """Probe with a tiny mount: the module may be missing or the scratch filesystem may not
        support an upper directory."""
        probe = scratch / "overlay-probe"
        dirs = {n: probe / n for n in ("l", "u", "w", "m")}
        for p in dirs.values():
            p.mkdir(parents=True)
        try:
            r = subprocess.run(
                [
                    "mount",
                    "-t",
                    "overlay",
                    "overlay",
                    "-o",
                    f"lowerdir={dirs['l']},upperdir={dirs['u']},workdir={dirs['w']}",
                    str(dirs["m"]),
                ],
                capture_output=True,
                text=True,
            )
            if r.returncode != 0:
                return f"mount -t overlay failed: {r.stderr.strip()}"
            return None
        finally:
            unmount(dirs["m"])
            if not is_mounted(dirs["m"]):
                shutil.rmtree(probe)

    def _mount(self, layers: Layers, upper: Path, work: Path, mnt: Path, slot: Path) -> None:
        opts = self._opts(layers, upper, work)
        self._run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], "mount -t overlay")


class FuseOverlayfs(Target):
    name = "fuse-overlayfs"
    description = "fuse-overlayfs (C, libfuse 3), its defaults"
    fuse = True

    def unavailable(self, scratch: Path) -> str | None:
        if shutil.which("fuse-overlayfs") is None:
            return "fuse-overlayfs not installed (scripts/setup.sh --bench installs it)"
        if not os.path.exists("/dev/fuse"):
            return "/dev/fuse is missing"
        return None

    def _mount(self, layers: Layers, upper: Path, work: Path, mnt: Path, slot: Path) -> None:
        opts = self._opts(layers, upper, work)
        self._run(["fuse-overlayfs", "-o", opts, str(mnt)], "fuse-overlayfs")


class Cowfs(Target):
    name = "cowfs"
    description = "cowfs (this checkout, the venv's Python), default options"
    fuse = True

    def unavailable(self, scratch: Path) -> str | None:
        if not os.path.exists("/dev/fuse"):
            return "/dev/fuse is missing"
        r = subprocess.run([sys.executable, "-c", "import cowfs.cli, pyfuse3"], capture_output=True)
        if r.returncode != 0:
            return "cowfs or pyfuse3 cannot be imported by this Python"
        return None

    def _mount(self, layers: Layers, upper: Path, work: Path, mnt: Path, slot: Path) -> Path:
        log = slot / "cowfs.log"
        log.unlink(missing_ok=True)  # one log per mount, read by the runner after unmount
        opts = self._opts(layers, upper, work)
        cmd = [sys.executable, "-m", "cowfs", "--log", str(log), "-o", opts, str(mnt)]
        self._run(cmd, "cowfs")
        return log


TARGETS: tuple[Target, ...] = (Floor(), KernelOverlay(), FuseOverlayfs(), Cowfs())
