"""Directory listings through a real mount: the kernel keeps them (no OPENDIR, no READDIRPLUS for
a directory it has listed and that did not change), drops them when the directory changes, and a
reader halfway through a directory that changes under it still sees every name that stayed
exactly once (POSIX), on cowfs as on kernel overlayfs."""

from __future__ import annotations

import collections
import contextlib
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mounting import cowfs_cmd, cowfs_mount, is_mounted, missing, overlay_mount, unmount

from cowfs import fuse_ops

pytestmark = pytest.mark.fuse


@contextlib.contextmanager
def traced_mount(layers: dict[str, Path]) -> Iterator[tuple[Path, Path]]:
    """cowfs in the foreground with libfuse's request trace in a file; always unmounted."""
    mnt, trace = layers["mnt"], layers["work"].parent / "trace.log"
    opts = f"lowerdir={layers['lower0']},upperdir={layers['upper']},workdir={layers['work']}"
    with open(trace, "wb") as err:
        proc = subprocess.Popen(
            [*cowfs_cmd(), "-f", "--debug-fuse", "-o", opts, str(mnt)],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mnt):
            assert proc.poll() is None, f"cowfs exited with {proc.returncode}"
            assert time.monotonic() < deadline, "cowfs did not mount within 30 s"
            time.sleep(0.05)
        yield mnt, trace
    finally:
        unmount(mnt)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def requests(trace: Path) -> collections.Counter[str]:
    return collections.Counter(re.findall(rb"opcode: ([A-Z_]+)", trace.read_bytes()))


def test_the_kernel_keeps_listings_until_the_directory_changes(layers: dict[str, Path]) -> None:
    if not fuse_ops.NO_OPENDIR:
        missing("pyfuse3 lacks cowfs's readdir-ino patch (scripts/setup.sh builds it)")
    (layers["lower0"] / "d").mkdir()
    for i in range(60):
        (layers["lower0"] / "d" / f"f{i:02d}").write_text("x")
    with traced_mount(layers) as (m, trace):
        first = sorted(os.listdir(m / "d"))
        assert len(first) == 60
        before = requests(trace)
        assert before[b"READDIRPLUS"] >= 1
        for _ in range(3):
            assert sorted(os.listdir(m / "d")) == first
        after = requests(trace)
        assert after[b"READDIRPLUS"] == before[b"READDIRPLUS"], "a warm listing reached the daemon"
        assert after[b"OPENDIR"] <= 1 and after[b"RELEASEDIR"] == 0  # the one ENOSYS reply
        # A change through the mount drops the kernel's copy.
        (m / "d" / "new").write_text("y")
        os.unlink(m / "d" / "f00")
        os.rename(m / "d" / "f01", m / "d" / "g01")
        assert sorted(os.listdir(m / "d")) == sorted(set(first) - {"f00", "f01"} | {"new", "g01"})
        assert requests(trace)[b"READDIRPLUS"] > after[b"READDIRPLUS"]


def test_without_the_patch_opendir_hands_out_handles(
    layers: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COWFS_OPENDIR", "1")
    (layers["lower0"] / "d").mkdir()
    for i in range(30):
        (layers["lower0"] / "d" / f"f{i:02d}").write_text("x")
    with traced_mount(layers) as (m, trace):
        for _ in range(3):
            assert sorted(os.listdir(m / "d")) == [f"f{i:02d}" for i in range(30)]
        (m / "d" / "new").write_text("y")
        assert "new" in os.listdir(m / "d")
    seen = requests(trace)  # after the unmount: RELEASEDIR is sent after close(2) returns
    assert seen[b"OPENDIR"] >= 4 and seen[b"RELEASEDIR"] >= 4  # every listing asked the daemon
    text = trace.read_bytes()
    ids = re.findall(rb"unique: (\d+), opcode: OPENDIR", text)
    assert all(re.search(rb"unique: %s, success" % i, text) for i in ids), "an OPENDIR failed"


def read_while_changing(d: Path, names: list[str]) -> None:
    """Read part of `d`, remove and add names, read the rest: every name that was there all
    along comes exactly once."""
    with os.scandir(d) as it:
        got = [next(it).name for _ in range(120)]
        unseen = sorted(set(names) - set(got))
        gone = set(unseen[::3]) | set(got[::10])
        for name in sorted(gone):
            os.unlink(d / name)
        for i in range(80):
            (d / f"late{i:03d}").write_text("z")
        got += [e.name for e in it]
    assert len(got) == len(set(got)), "a name came twice"
    missed = set(names) - gone - set(got)
    assert not missed, f"names present all along were skipped: {sorted(missed)[:5]}"


@pytest.mark.parametrize("kind", ["cowfs", "cowfs-opendir", "overlay"])
def test_a_reader_halfway_through_a_changing_directory(
    layers: dict[str, Path], kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cowfs-opendir: as on an unpatched pyfuse3 (OPENDIR answered with a handle, no cache)."""
    if kind == "cowfs-opendir":
        monkeypatch.setenv("COWFS_OPENDIR", "1")
    (layers["lower0"] / "d").mkdir()
    # Long names: a 4 KiB READDIRPLUS reply holds a dozen, so the reader's getdents calls and
    # the daemon's chunks both end well before the directory does.
    lower = [f"{'l' * 180}{i:03d}" for i in range(300)]
    for name in lower:
        (layers["lower0"] / "d" / name).write_text("x")
    mount: Callable[..., Any] = overlay_mount if kind == "overlay" else cowfs_mount
    with mount(layers["mnt"], [layers["lower0"]], layers["upper"], layers["work"]) as m:
        d = m / "d"
        upper = [f"{'u' * 180}{i:03d}" for i in range(100)]
        for name in upper:
            (d / name).write_text("y")
        # First read: nothing cached in the kernel, so its chunks come from the daemon at the
        # offsets it handed out, while the directory changes between them.
        read_while_changing(d, sorted(lower + upper))
        # Then the same on a listing the kernel has cached (filled by listdir).
        read_while_changing(d, sorted(os.listdir(d)))
