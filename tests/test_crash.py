"""kill -9 of the daemon: during a large copy-up, and while idle.

Copy-up builds the copy under a temp name in `<workdir>/work/` and renames it into the upper layer
in one step, so a daemon killed at any moment leaves either the lower file visible (plus a temp
that the next mount purges) or the complete copy, never a partial file under the real name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash
from mounting import _mount_pids, cowfs_mount, is_mounted

pytestmark = pytest.mark.fuse

MIB = 1 << 20
# Big enough that copy-up (copy, then fsync of the copy) takes well over 100 ms on this machine
# (about 1.3 s measured: 0.15 s of copy, the rest fsync), small enough to write and read fast.
BIG_MIB = 512
FUSECTL = "/sys/fs/fuse/connections"


# --------------------------------------------------------------------------- helpers


def write_pattern(path: Path, block: bytes, count: int) -> None:
    """Real data everywhere (no holes, no unwritten extents): copy-up must move every byte."""
    with open(path, "wb") as f:
        for _ in range(count):
            f.write(block)


def pattern_hash(block: bytes, count: int, first: bytes = b"") -> str:
    """The hash of `count` copies of `block` whose first bytes are replaced by `first`."""
    h = xxhash.xxh3_128()
    h.update(first + block[len(first) :])
    for _ in range(count - 1):
        h.update(block)
    return h.hexdigest()


def file_hash(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(8 * MIB):
            h.update(chunk)
    return h.hexdigest()


def daemon_pid(mnt: Path) -> int:
    pids = _mount_pids(str(mnt))
    assert len(pids) == 1, f"expected one cowfs daemon for {mnt}, found {pids}"
    return pids[0]


def fuse_connection(mnt: Path) -> int:
    """The FUSE connection id of the mount: the minor number of its device (mountinfo field 3)."""
    target = os.path.realpath(mnt)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if fields[4].encode().decode("unicode_escape") == target:
                return int(fields[2].split(":")[1])
    raise AssertionError(f"{mnt} is not mounted")


def abort_connection(conn: int) -> None:
    """Abort a FUSE connection through fusectl (mounted for the moment if it is not)."""
    mounted_here = False
    if not os.path.exists(f"{FUSECTL}/{conn}"):
        r = subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL], capture_output=True)
        mounted_here = r.returncode == 0
    try:
        with contextlib.suppress(OSError), open(f"{FUSECTL}/{conn}/abort", "w") as f:
            f.write("1")
    finally:
        if mounted_here:
            subprocess.run(["umount", FUSECTL], capture_output=True)


def errno_of(fn, *args) -> int:
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return 0


def wait_dead(pid: int, timeout: float = 30) -> None:
    """Until the process is gone or a zombie (a daemon is reparented, we cannot reap it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.01)
    raise AssertionError(f"daemon {pid} still alive {timeout}s after SIGKILL")


def kill_daemon(mnt: Path) -> None:
    """kill -9 the daemon, then check the mount is dead (ENOTCONN) and unmount it lazily."""
    pid = daemon_pid(mnt)
    conn = fuse_connection(mnt)
    os.kill(pid, signal.SIGKILL)
    wait_dead(pid)
    try:
        # Requests caught in the abort fail with ECONNABORTED; from then on it is ENOTCONN.
        deadline = time.monotonic() + 10
        while errno_of(os.statvfs, mnt) == errno.ECONNABORTED and time.monotonic() < deadline:
            time.sleep(0.01)
        # (A plain stat, or a listing of a directory already listed, may still be answered from
        # the kernel's caches; what needs the daemon fails.)
        for call in (os.statvfs, lambda p: os.open(p / "x", os.O_RDONLY)):
            assert errno_of(call, mnt) == errno.ENOTCONN, call
    finally:
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        if is_mounted(mnt):
            abort_connection(conn)
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    assert not is_mounted(mnt)


@contextlib.contextmanager
def child(code: str, *args: str, conn: int | None = None) -> Iterator[subprocess.Popen[str]]:
    """A Python child touching the mount; always ended and reaped (aborting the FUSE connection
    `conn` first if it is stuck in a request to a dead daemon)."""
    p = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield p
    finally:
        if p.poll() is None:
            p.kill()
        try:
            p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            if conn is not None:
                abort_connection(conn)
            p.communicate(timeout=30)


def work_entries(layers: dict[str, Path]) -> list[str]:
    return sorted(os.listdir(layers["work"] / "work"))


def mount(layers: dict[str, Path]):
    return cowfs_mount(layers["mnt"], [layers["lower0"]], layers["upper"], layers["work"])


_WRITER = r"""
import os, sys
try:
    with open(sys.argv[1], "r+b", buffering=0) as f:  # O_RDWR: copy-up happens in open
        f.write(b"X")
    print("wrote")
except OSError as e:
    print("error", e.errno)
"""


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("phase", ["copying", "syncing"])
def test_kill_during_large_copy_up(layers: dict[str, Path], phase: str) -> None:
    """`copying`: kill as soon as the temp appears (its data is being copied); `syncing`: kill once
    the temp has all its bytes (its attributes are set and it is being fsynced), before the
    rename."""
    block = os.urandom(MIB)
    lower_file = layers["lower0"] / "big"
    write_pattern(lower_file, block, BIG_MIB)
    want = pattern_hash(block, BIG_MIB)
    assert file_hash(lower_file) == want
    mnt, upper, work = layers["mnt"], layers["upper"], layers["work"] / "work"

    with mount(layers):
        pid = daemon_pid(mnt)
        conn = fuse_connection(mnt)
        with child(_WRITER, str(mnt / "big"), conn=conn) as writer:
            try:
                # Wait for the copy-up temp in <workdir>/work (and in `syncing`, for all of its
                # data), then kill.
                deadline = time.monotonic() + 20
                temp = None
                while True:
                    assert time.monotonic() < deadline, f"copy-up never reached {phase}"
                    assert writer.poll() is None, f"writer ended early: {writer.communicate()}"
                    if temp is None:
                        temp = next((n for n in os.listdir(work) if n.startswith("#cowfs.")), None)
                        if temp is None:
                            continue
                    if phase == "copying":
                        break
                    with contextlib.suppress(FileNotFoundError):
                        if os.stat(work / temp).st_size == BIG_MIB * MIB:
                            break
                size_at_kill = os.stat(work / temp).st_size
                kill_daemon(mnt)
            except BaseException:
                if writer.poll() is None:
                    abort_connection(conn)
                raise
            out, err = writer.communicate(timeout=20)
        # The writer's open was answered by the dead connection, not by a copy-up.
        assert out.split() in (
            ["error", str(errno.ECONNABORTED)],
            ["error", str(errno.ENOTCONN)],
        ), (
            out,
            err,
        )
    assert pid not in _mount_pids(str(mnt))

    # The lower file is untouched; the upper has no partial file under its name; the temp (left
    # by the crash) is the only trace.
    assert file_hash(lower_file) == want
    if os.path.lexists(upper / "big"):
        # Only possible if the kill came after the rename: then the copy must be complete.
        assert os.stat(upper / "big").st_size == BIG_MIB * MIB
        assert file_hash(upper / "big") == want
        pytest.fail(f"the kill came after the copy-up finished (temp had {size_at_kill} bytes)")
    assert temp in work_entries(layers), "the crash left no temp: was the copy-up in flight?"
    assert os.listdir(upper) == [], "something other than the temp was left by the crash"

    # Remount: the leftover is purged, the file reads as the lower one.
    with mount(layers):
        assert work_entries(layers) == []
        assert os.stat(mnt / "big").st_size == BIG_MIB * MIB
        assert file_hash(mnt / "big") == want
        assert not os.path.lexists(upper / "big")  # reading copies nothing up
        # Now the 1-byte write goes through: copy-up, then the write.
        with open(mnt / "big", "r+b", buffering=0) as f:
            assert f.write(b"X") == 1
        assert work_entries(layers) == []
    want_written = pattern_hash(block, BIG_MIB, first=b"X")
    assert file_hash(upper / "big") == want_written
    assert file_hash(lower_file) == want

    # ... and is still there after another remount.
    with mount(layers):
        with open(mnt / "big", "rb") as f:
            assert f.read(2) == b"X" + block[1:2]
        assert file_hash(mnt / "big") == want_written
    assert file_hash(lower_file) == want


def _tree(root: Path) -> dict[str, bytes | str | None]:
    """name -> content (files), target (symlinks) or None (directories), as the mount shows it."""
    out: dict[str, bytes | str | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for d in dirnames:
            out[os.path.normpath(os.path.join(rel, d))] = None
        for n in filenames:
            p = os.path.join(dirpath, n)
            key = os.path.normpath(os.path.join(rel, n))
            if os.path.islink(p):
                out[key] = os.readlink(p)
            else:
                with open(p, "rb") as f:
                    out[key] = f.read()
    return out


def test_kill_while_idle(layers: dict[str, Path]) -> None:
    low, mnt = layers["lower0"], layers["mnt"]
    (low / "keep").write_bytes(b"lower keep\n")
    (low / "edit").write_bytes(b"lower edit\n")
    (low / "gone").write_bytes(b"lower gone\n")
    (low / "dir").mkdir()
    (low / "dir" / "inner").write_bytes(b"inner\n")
    (low / "olddir").mkdir()

    # A first, clean mount leaves copy-ups, whiteouts and new objects in the upper layer.
    with mount(layers):
        (mnt / "edit").write_bytes(b"edited\n")
        os.unlink(mnt / "gone")
        (mnt / "new").write_bytes(b"new\n")
        os.mkdir(mnt / "newdir")
        os.rename(mnt / "new", mnt / "newdir" / "moved")
        os.rmdir(mnt / "olddir")
        os.symlink("keep", mnt / "link")
        (mnt / "dir" / "inner").write_bytes(b"inner edited\n")
        expected = _tree(mnt)

    # Mount, change a few more things (no fsync: the writes are in the upper's page cache), then
    # kill the daemon while it is idle.
    with mount(layers):
        assert _tree(mnt) == expected
        (mnt / "late").write_bytes(b"written just before the kill\n")
        with open(mnt / "keep", "r+b") as f:  # a copy-up, complete before the kill
            f.write(b"L")
        os.unlink(mnt / "dir" / "inner")
        expected["late"] = b"written just before the kill\n"
        expected["keep"] = b"Lower keep\n"
        del expected["dir/inner"]
        assert _tree(mnt) == expected
        time.sleep(0.1)  # let the kernel's replies settle: the daemon is idle now
        kill_daemon(mnt)

    assert work_entries(layers) == []  # nothing was in flight
    with mount(layers):
        assert work_entries(layers) == []
        assert _tree(mnt) == expected
        (mnt / "after").write_bytes(b"after the crash\n")
        expected["after"] = b"after the crash\n"
    with mount(layers):
        assert _tree(mnt) == expected
