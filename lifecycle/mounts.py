"""The container's cowfs mount: started through the `cowfs` CLI as a child of the monitor (so the
monitor learns when the daemon dies), found in /proc/self/mountinfo, and unmounted with a lazy
fallback. The option string is built with cowfs's own escaping rules."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from cowfs.options import escape  # the one cowfs module lifecycle may use: its option syntax

__all__ = ["MountError", "find_mount", "mount_table", "start_daemon", "unmount", "escape"]


class MountError(Exception):
    pass


def _unescape_mountinfo(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_table() -> dict[str, str]:
    """Mount point -> fstype of what is visible there, in this mount namespace."""
    table = {}
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            # the last one mounted at a point is the visible one
            table[_unescape_mountinfo(left.split()[4])] = right.split()[0]
    return table


def find_mount(path: str | os.PathLike[str]) -> str | None:
    """The fstype mounted at `path` in this mount namespace, or None."""
    return mount_table().get(os.path.realpath(path))


def start_daemon(
    source: str,
    lowers_top_first: list[Path],
    upper: Path,
    work: Path,
    mnt: Path,
    log_path: Path,
    timeout: float = 30.0,
) -> subprocess.Popen[bytes]:
    """Run `cowfs -f` as our child and return once the mount is visible. On failure the daemon is
    ended and MountError carries its last log line."""
    opts = ",".join(
        [
            "lowerdir=" + ":".join(escape(str(p)) for p in lowers_top_first),
            "upperdir=" + escape(str(upper)),
            "workdir=" + escape(str(work)),
        ]
    )
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cowfs", "-f", "-o", opts, source, str(mnt)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    finally:
        log.close()
    deadline = time.monotonic() + timeout
    delay = 0.001
    while find_mount(mnt) != "fuse.cowfs":
        if proc.poll() is not None:
            raise MountError(f"cowfs exited ({proc.returncode}): {_last_line(log_path)}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            unmount(mnt)
            raise MountError(f"cowfs did not mount {mnt} within {timeout:g}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    return proc


def mount_overlay(lowers_top_first: list[Path], upper: Path, work: Path, mnt: Path) -> None:
    """Kernel overlayfs with the same layers (kernel option syntax: `\\:` is not understood, so
    paths containing a colon or comma are refused)."""
    paths = [*lowers_top_first, upper, work]
    if any(c in str(p) for p in paths for c in ",:"):
        raise MountError("kernel overlayfs cannot take layer paths containing ',' or ':'")
    opts = f"lowerdir={':'.join(map(str, lowers_top_first))},upperdir={upper},workdir={work}"
    r = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], capture_output=True, text=True
    )
    if r.returncode != 0:
        raise MountError(f"mount -t overlay failed: {r.stderr.strip()}")


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else "no output"


def unmount(mnt: str | os.PathLike[str]) -> None:
    """Unmount every layer of mounts at `mnt`; lazily when busy (a holder then sees ENOTCONN or
    keeps its reference: the mount is gone from the tree either way)."""
    for _ in range(20):
        if find_mount(mnt) is None:
            return
        r = subprocess.run(["umount", str(mnt)], capture_output=True)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    if find_mount(mnt) is not None:
        raise MountError(f"cannot unmount {mnt}")
