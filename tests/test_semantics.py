"""Behaviour through a real cowfs mount that unit tests cannot show: cache coherence across
copy-up, a busy copy-up not stalling the mount, setuid clearing, the error boundary, interop."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from mounting import cowfs_mount, overlay_mount

pytestmark = pytest.mark.fuse


def test_reader_opened_before_copy_up_sees_new_data(layers: dict[str, Path]) -> None:
    (layers["lower0"] / "f").write_bytes(b"AAAA" * 1024)
    with cowfs_mount(layers["mnt"], [layers["lower0"]], layers["upper"], layers["work"]) as m:
        with open(m / "f", "rb", buffering=0) as r:
            assert r.read(4) == b"AAAA"
            # Another process copies the file up and rewrites it.
            subprocess.run(
                ["sh", "-c", f"printf BBBB | dd of={m / 'f'} conv=notrunc status=none"],
                check=True,
            )
            subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=False)
            r.seek(0)
            assert r.read(4) == b"BBBB"
        with open(m / "f", "rb") as again:
            assert again.read(4) == b"BBBB"
    assert (layers["lower0"] / "f").read_bytes() == b"AAAA" * 1024


def test_mount_keeps_serving_during_a_large_copy_up(layers: dict[str, Path]) -> None:
    big = layers["lower0"] / "big"
    block = os.urandom(1 << 20)
    with open(big, "wb") as f:
        for _ in range(768):
            f.write(block)
    (layers["lower0"] / "small").write_text("small")
    with cowfs_mount(layers["mnt"], [layers["lower0"]], layers["upper"], layers["work"]) as m:
        done = threading.Event()

        def copy_up() -> None:
            with open(m / "big", "r+b") as f:
                f.write(b"X")
            done.set()

        t = threading.Thread(target=copy_up)
        t.start()
        try:
            work = layers["work"] / "work"
            served_during_copy = False
            for _ in range(20000):
                if done.is_set():
                    break
                if any(n.startswith("#cowfs.") for n in os.listdir(work)):
                    # The copy is in flight: other requests must still be answered.
                    assert (m / "small").read_text() == "small"
                    assert os.stat(m / "small").st_size == 5
                    os.listdir(m)
                    served_during_copy = not done.is_set()
                    if served_during_copy:
                        break
        finally:
            t.join(120)
        assert served_during_copy, "never caught the copy-up in flight"
        with open(m / "big", "rb") as f:
            assert f.read(1) == b"X"
            assert f.read(len(block) - 1) == block[1:]


def test_setuid_cleared_on_write_by_non_root(layers: dict[str, Path]) -> None:
    f = layers["lower0"] / "suid"
    f.write_bytes(b"#!/bin/sh\n")
    os.chmod(f, 0o4777)
    with cowfs_mount(layers["mnt"], [layers["lower0"]], layers["upper"], layers["work"]) as m:
        pid = os.fork()
        if pid == 0:
            try:
                os.chdir(m)  # pytest's tmp dirs are 0700: enter as root, then drop privileges
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                with open("suid", "ab") as w:
                    w.write(b"echo hi\n")
                os._exit(0)
            except BaseException:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        mode = os.stat(m / "suid").st_mode
        assert not mode & stat.S_ISUID
        assert stat.S_IMODE(mode) == 0o777


def test_upper_written_by_cowfs_reads_the_same_under_kernel_overlay(
    layers: dict[str, Path], tmp_path: Path
) -> None:
    l0, l1 = layers["lower0"], layers["lower1"]
    (l1 / "d").mkdir()
    (l1 / "d" / "old").write_text("old")
    (l1 / "keep").write_text("keep")
    (l1 / "del").write_text("del")
    (l0 / "shadow").write_text("top")
    (l1 / "shadow").write_text("bottom")
    lowers = [l0, l1]
    with cowfs_mount(layers["mnt"], lowers, layers["upper"], layers["work"]) as m:
        (m / "del").unlink()
        (m / "d" / "old").unlink()
        (m / "d").rmdir()
        (m / "d").mkdir()
        (m / "d" / "new").write_text("new")
        (m / "shadow").write_text("changed")
        os.symlink("keep", m / "ln")
        os.link(m / "keep", m / "hard")
        seen = tree(m)
    work2 = tmp_path / "work2"
    work2.mkdir()
    with overlay_mount(layers["mnt"], lowers, layers["upper"], work2) as m:
        assert tree(m) == seen
    # And back: what the kernel writes, cowfs reads.
    with overlay_mount(layers["mnt"], lowers, layers["upper"], work2) as m:
        (m / "keep").unlink()
        (m / "d").rename(m / "d2")
        (m / "shadow").unlink()
        seen = tree(m)
    subprocess.run(["rm", "-rf", str(work2 / "work")], check=True)
    with cowfs_mount(layers["mnt"], lowers, layers["upper"], layers["work"]) as m:
        assert tree(m) == seen


def tree(root: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            st = p.lstat()
            if stat.S_ISREG(st.st_mode):
                v: object = p.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                v = os.readlink(p)
            else:
                v = None
            out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), v)
    return out


def test_error_boundary_turns_a_bug_into_eio() -> None:
    import pyfuse3
    import trio

    from cowfs.fuse_ops import Operations

    class Broken:
        attr_changed: set[int] = set()

        def getattr(self, ino: int) -> None:
            raise RuntimeError("bug")

        def lookup(self, parent: int, name: bytes) -> None:
            raise OSError(errno.ENAMETOOLONG, "x")

    ops = Operations(Broken())  # type: ignore[arg-type]

    async def main() -> None:
        with pytest.raises(pyfuse3.FUSEError) as ei:
            await ops.getattr(5)
        assert ei.value.errno == errno.EIO
        with pytest.raises(pyfuse3.FUSEError) as ei:
            await ops.lookup(1, b"x")
        assert ei.value.errno == errno.ENAMETOOLONG

    trio.run(main)
    assert ops.internal_errors == 1
