"""Mount helpers shared by the real-mount tests: every mount made here is unmounted and every
daemon ended, even when the test fails (use them as context managers)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

REQUIRE_FUSE_ENV = "COWFS_REQUIRE_FUSE"


def missing(reason: str) -> NoReturn:
    """A prerequisite is absent: skip on a developer's machine, fail under CI
    (COWFS_REQUIRE_FUSE=1), where a skip would hide it."""
    import pytest

    if os.environ.get(REQUIRE_FUSE_ENV) == "1":
        pytest.fail(f"{reason} (and {REQUIRE_FUSE_ENV}=1)")
    pytest.skip(reason)


def needs(ok: bool, reason: str) -> Any:
    """A skipif marker that only skips when CI does not require everything."""
    import pytest

    return pytest.mark.skipif(not ok and os.environ.get(REQUIRE_FUSE_ENV) != "1", reason=reason)


def fuse_problem() -> str | None:
    """Why real mounts cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "real-mount tests need root"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 (Debian package fuse3) is missing"
    try:
        import pyfuse3  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the machine
        return f"pyfuse3 cannot be imported: {e}"
    return None


def cowfs_cmd() -> list[str]:
    """How to run the cowfs CLI from the test's interpreter (the venv's code, not a PATH lookup)."""
    return [sys.executable, "-m", "cowfs"]


def is_mounted(path: str | os.PathLike[str]) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            mnt = fields[4].encode().decode("unicode_escape")
            if mnt == target:
                return True
    return False


def unmount(path: str | os.PathLike[str]) -> None:
    """Unmount, lazily if it is busy; a no-op when nothing is mounted there."""
    for _ in range(50):
        if not is_mounted(path):
            return
        r = subprocess.run(["umount", str(path)], capture_output=True)
        if r.returncode == 0:
            continue
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
        time.sleep(0.05)


def serving_pids(mnt: str, needle: bytes = b"cowfs") -> list[int]:
    """Processes other than this one whose command line names this mount point and contains
    ``needle`` (the daemon serving it)."""
    pids = []
    target = os.fsencode(os.path.realpath(mnt))
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if target in argv and any(needle in a for a in argv):
            pids.append(int(d))
    return pids


def _mount_pids(mnt: str) -> list[int]:
    """cowfs daemons serving this mount point."""
    return serving_pids(mnt)


@contextlib.contextmanager
def cowfs_mount(
    mnt: str | os.PathLike[str],
    lowers: list[str | os.PathLike[str]],
    upper: str | os.PathLike[str] | None = None,
    work: str | os.PathLike[str] | None = None,
    extra_opts: str = "",
) -> Iterator[Path]:
    """Mount cowfs through its CLI (which returns once the mount is ready); always unmount."""
    opts = "lowerdir=" + ":".join(str(p).replace(":", "\\:") for p in lowers)
    if upper is not None:
        opts += f",upperdir={upper},workdir={work}"
    if extra_opts:
        opts += "," + extra_opts
    mnt = str(mnt)
    try:
        r = subprocess.run(
            [*cowfs_cmd(), "-o", opts, mnt], capture_output=True, text=True, timeout=60
        )
        if r.returncode != 0:
            raise RuntimeError(f"cowfs mount failed ({r.returncode}): {r.stderr.strip()}")
        assert is_mounted(mnt), "cowfs returned 0 but nothing is mounted"
        yield Path(mnt)
    finally:
        unmount(mnt)
        deadline = time.monotonic() + 10
        while _mount_pids(mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in _mount_pids(mnt):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


@contextlib.contextmanager
def overlay_mount(
    mnt: str | os.PathLike[str],
    lowers: list[str | os.PathLike[str]],
    upper: str | os.PathLike[str] | None = None,
    work: str | os.PathLike[str] | None = None,
    extra_opts: str = "",
) -> Iterator[Path]:
    """Mount kernel overlayfs (the reference implementation); always unmount."""
    opts = "lowerdir=" + ":".join(str(p).replace(":", "\\:") for p in lowers)
    if upper is not None:
        opts += f",upperdir={upper},workdir={work}"
    if extra_opts:
        opts += "," + extra_opts
    mnt = str(mnt)
    try:
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, mnt], check=True)
        yield Path(mnt)
    finally:
        unmount(mnt)
