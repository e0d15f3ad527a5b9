"""Hostile layers cannot make the daemon read or write outside the layers.

The lower layers hold symlinks that point out of the layers (absolute, relative `..` escapes, into a
"canary" directory next to them), a FIFO and a character device where files are expected. Through
the mount we do everything that acts on those objects themselves (lchown, utime without following,
xattrs on the link, rename, hard link, unlink, copy-up, O_NOFOLLOW opens, readdir). The canary, a
directory outside every layer, must come out byte-for-byte and attribute-for-attribute unchanged
(its ctimes too, so even a no-op chmod or chown on it would show), the lowers unchanged, and
symlinks copied into the upper layer must still be symlinks with the same target.

Note: paths through the mount are resolved by the kernel, which follows a symlink in the middle of
a path (`MNT/etc/x` with `etc -> /canary`) on the host, exactly as on kernel overlayfs; that is not
cowfs' doing, so these tests only walk through the mount with O_NOFOLLOW / directory fds /
openat2(RESOLVE_*), and act on the symlinks themselves.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mounting import _mount_pids, cowfs_mount

pytestmark = pytest.mark.fuse

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
SYS_openat2 = 437  # the same number on every architecture (unified syscall table)
SYS_fchmodat2 = 452
SYS_renameat2 = 316 if os.uname().machine == "x86_64" else 276
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_IN_ROOT = 0x10
RENAME_EXCHANGE = 2
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, mode: int, resolve: int) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    fd = _libc.syscall(SYS_openat2, dirfd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    return fd


def fchmodat2_nofollow(path: str | Path, mode: int) -> None:
    r = _libc.syscall(SYS_fchmodat2, AT_FDCWD, os.fsencode(str(path)), mode, AT_SYMLINK_NOFOLLOW)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(path))


def exchange(dirfd: int, a: bytes, b: bytes, dirfd_b: int | None = None) -> bool:
    """renameat2(RENAME_EXCHANGE); False when either name is missing."""
    other = dirfd if dirfd_b is None else dirfd_b
    return _libc.syscall(SYS_renameat2, dirfd, a, other, b, RENAME_EXCHANGE) == 0


# --------------------------------------------------------------------------- snapshots


def _xattrs(p: str) -> dict[str, bytes]:
    out = {}
    try:
        names = os.listxattr(p, follow_symlinks=False)
    except OSError:
        return {}
    for n in names:
        with contextlib.suppress(OSError):
            out[n] = os.getxattr(p, n, follow_symlinks=False)
    return out


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything about a tree except atimes: names, types, modes, owners, sizes, mtimes, ctimes,
    link counts, inode numbers, devices, contents, link targets and xattrs. Never follows a link."""
    out: dict[str, tuple] = {}

    def visit(p: str, rel: str) -> None:
        st = os.lstat(p)
        m = st.st_mode
        if stat.S_ISREG(m):
            with open(p, "rb") as f:
                content: bytes | str | None = f.read()
        elif stat.S_ISLNK(m):
            content = os.readlink(p)
        else:
            content = None
        out[rel] = (
            m,
            st.st_uid,
            st.st_gid,
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
            st.st_nlink,
            st.st_ino,
            st.st_rdev,
            content,
            _xattrs(p),
        )
        if stat.S_ISDIR(m):
            for name in sorted(os.listdir(p)):
                visit(os.path.join(p, name), f"{rel}/{name}")

    visit(str(root), ".")
    return out


def make_canary(base: Path) -> tuple[Path, dict[str, tuple]]:
    canary = base / "canary"
    canary.mkdir()
    (canary / "secret").write_bytes(b"top secret\n")
    os.chmod(canary / "secret", 0o600)
    (canary / "sub").mkdir(mode=0o750)
    (canary / "sub" / "deep").write_bytes(os.urandom(4096))
    (canary / "passwd").write_bytes(b"root:x:0:0:root:/root:/bin/sh\n")
    os.symlink("secret", canary / "inner-link")
    for p in (canary, canary / "secret", canary / "sub"):
        os.setxattr(p, "user.canary", b"do not touch")
        os.setxattr(p, "trusted.canary", b"do not touch")
    os.utime(canary / "secret", ns=(1_000_000_000, 1_000_000_000))
    # Let every ctime/mtime settle into the past, so a later change cannot hide in the same tick.
    time.sleep(0.02)
    return canary, snapshot(canary)


def assert_same(before: dict[str, tuple], after: dict[str, tuple], what: str) -> None:
    assert sorted(after) == sorted(before), f"{what}: names changed"
    for k in before:
        assert after[k] == before[k], f"{what}: {k} changed\nbefore {before[k]}\nafter  {after[k]}"


# --------------------------------------------------------------------------- the hostile layers


def hostile_layers(layers: dict[str, Path], canary: Path) -> dict[str, str]:
    """Populate the two lowers; returns {mount path: symlink target} of every hostile symlink."""
    top, bottom = layers["lower0"], layers["lower1"]
    links = {
        "etc": str(canary),  # an absolute symlink where a directory is expected
        "up": "../../..",  # a relative escape out of the layer
        "upc": "../canary",  # a relative escape that lands on the canary
        "f": str(canary / "secret"),  # a symlink to a file outside
        "d/x": str(canary),  # a nested directory symlink
        "d/y": "../../canary/secret",
        "d/z": "/proc/self/root" + str(canary),  # through a magic link
    }
    (top / "d").mkdir()
    (top / "d" / "plain").write_bytes(b"plain\n")
    for name, target in links.items():
        os.symlink(target, top / name)
    os.mkfifo(top / "passwd", 0o644)  # a FIFO where a file is expected
    os.mknod(top / "shadow", stat.S_IFCHR | 0o640, os.makedev(1, 3))  # /dev/null's numbers
    # The bottom layer has real things under the same names; the top layer's objects hide them.
    (bottom / "etc").mkdir()
    (bottom / "etc" / "hosts").write_bytes(b"127.0.0.1 localhost\n")
    (bottom / "passwd").write_bytes(b"root:x:0:0\n")
    (bottom / "shadow").write_bytes(b"root:*:1:0\n")
    (bottom / "d").mkdir()
    (bottom / "d" / "lowfile").write_bytes(b"low\n")
    return links


def errno_of(fn, *args, **kw) -> int:
    """The errno `fn` fails with, or 0 when it succeeds (closing a returned fd)."""
    try:
        r = fn(*args, **kw)
    except OSError as e:
        return e.errno
    if isinstance(r, int) and r >= 0 and fn in (os.open, openat2):
        os.close(r)
    return 0


def assert_link(path: Path | str, target: str) -> None:
    st = os.lstat(path)
    assert stat.S_ISLNK(st.st_mode), f"{path} is no longer a symlink: {oct(st.st_mode)}"
    assert os.readlink(path) == target, f"{path} target changed"


# --------------------------------------------------------------------------- tests


def test_hostile_symlinks_are_never_followed(layers: dict[str, Path], tmp_path: Path) -> None:
    canary, canary_before = make_canary(tmp_path)
    links = hostile_layers(layers, canary)
    # More links, in the bottom layer, for rename/link/unlink before anything else copies them.
    fresh = {
        "fresh/r": str(canary),
        "fresh/h": str(canary / "secret"),
        "fresh/x": "../../canary/sub",
        "fresh/u": str(canary / "secret"),
    }
    (layers["lower1"] / "fresh").mkdir()
    for name, target in fresh.items():
        os.symlink(target, layers["lower1"] / name)
    lowers_before = {n: snapshot(layers[n]) for n in ("lower0", "lower1")}
    mnt = layers["mnt"]

    with cowfs_mount(mnt, [layers["lower0"], layers["lower1"]], layers["upper"], layers["work"]):
        # readdir of the directories holding them, and lstat/readlink of every link.
        assert {"etc", "up", "upc", "f", "d", "passwd", "shadow"} <= set(os.listdir(mnt))
        assert set(os.listdir(mnt / "d")) == {"x", "y", "z", "plain", "lowfile"}
        for e in [*os.scandir(mnt), *os.scandir(mnt / "d")]:
            e.stat(follow_symlinks=False)
            if e.name in ("etc", "up", "upc", "f", "x", "y", "z"):
                assert e.is_symlink(), e.path
        for name, target in links.items():
            assert_link(mnt / name, target)

        # Opens that must not follow the last component: the kernel answers ELOOP itself, and a
        # daemon asked to open a symlink must not follow it either.
        for name in links:
            for flags in (
                os.O_RDONLY,
                os.O_WRONLY,
                os.O_RDWR | os.O_TRUNC,
                os.O_WRONLY | os.O_APPEND,
                os.O_RDONLY | os.O_DIRECTORY,
            ):
                err = errno_of(os.open, mnt / name, flags | os.O_NOFOLLOW)
                assert err in (errno.ELOOP, errno.ENOTDIR), (name, flags, err)
            # openat2 refusing symlinks, and resolving them inside the mount (where the canary's
            # absolute path does not exist): no way to create anything through them.
            root = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for resolve in (RESOLVE_NO_SYMLINKS, RESOLVE_IN_ROOT):
                    err = errno_of(
                        openat2, root, f"{name}/new", os.O_CREAT | os.O_WRONLY, 0o644, resolve
                    )
                    assert err != 0 or resolve == RESOLVE_IN_ROOT, (name, resolve)
            finally:
                os.close(root)

        # Attribute changes on the symlinks themselves: each one copies the link up.
        for i, name in enumerate(links):
            p = mnt / name
            os.chown(p, 4000 + i, 5000 + i, follow_symlinks=False)
            os.utime(p, ns=(2_000_000_000, 3_000_000_000 + i), follow_symlinks=False)
            os.setxattr(p, "trusted.cowfs-test", b"on the link", follow_symlinks=False)
            assert os.getxattr(p, "trusted.cowfs-test", follow_symlinks=False) == b"on the link"
            assert "trusted.cowfs-test" in os.listxattr(p, follow_symlinks=False)
            # user.* xattrs are not allowed on symlinks (EPERM): must not land on the target.
            assert (
                errno_of(os.setxattr, p, "user.cowfs-test", b"x", follow_symlinks=False)
                == errno.EPERM
            )
            os.removexattr(p, "trusted.cowfs-test", follow_symlinks=False)
            os.setxattr(p, "trusted.cowfs-test", b"kept", follow_symlinks=False)
            # chmod of a symlink: the VFS refuses (EOPNOTSUPP); it must not reach the target.
            assert errno_of(fchmodat2_nofollow, p, 0o777) in (errno.EOPNOTSUPP, 0)
            st = os.lstat(p)
            assert (st.st_uid, st.st_gid) == (4000 + i, 5000 + i)
            assert st.st_mtime_ns == 3_000_000_000 + i
            assert_link(p, links[name])
        # Now in the upper layer, as symlinks with the same targets and the new attributes.
        for i, (name, target) in enumerate(links.items()):
            up = layers["upper"] / name
            assert_link(up, target)
            st = os.lstat(up)
            assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (4000 + i, 5000 + i, 3_000_000_000 + i)
            assert os.getxattr(up, "trusted.cowfs-test", follow_symlinks=False) == b"kept"

        # Rename, hard link and unlink links already copied up ...
        os.rename(mnt / "etc", mnt / "etc.moved")
        assert_link(mnt / "etc.moved", links["etc"])
        assert not os.path.lexists(mnt / "etc")
        os.link(mnt / "f", mnt / "f.hard", follow_symlinks=False)
        assert_link(mnt / "f.hard", links["f"])
        assert os.lstat(mnt / "f").st_nlink == 2
        os.link(mnt / "d" / "x", mnt / "x.hard", follow_symlinks=False)
        os.rename(mnt / "d" / "y", mnt / "y.moved")
        os.unlink(mnt / "up")
        os.unlink(mnt / "d" / "z")
        assert not os.path.lexists(mnt / "up")
        # ... and untouched ones, which rename and link copy up themselves.
        os.rename(mnt / "fresh" / "r", mnt / "r.moved")
        os.link(mnt / "fresh" / "h", mnt / "fresh" / "h.hard", follow_symlinks=False)
        os.rename(mnt / "fresh" / "x", mnt / "fresh" / "x.moved")
        os.unlink(mnt / "fresh" / "u")
        (mnt / "fresh" / "new").write_bytes(b"new\n")
        os.chown(mnt / "fresh", 0, 0)
        for name, target in fresh.items():
            moved = {"fresh/r": "r.moved", "fresh/x": "fresh/x.moved"}.get(name, name)
            if name != "fresh/u":
                assert_link(mnt / moved, target)
        assert_link(mnt / "fresh" / "h.hard", fresh["fresh/h"])
        assert set(os.listdir(mnt / "fresh")) == {"h", "h.hard", "x.moved", "new"}
        assert_link(mnt / "x.hard", links["d/x"])
        assert_link(mnt / "d" / "x", links["d/x"])
        assert_link(mnt / "y.moved", links["d/y"])
        assert_link(mnt / "upc", links["upc"])
        assert set(os.listdir(mnt / "d")) == {"x", "plain", "lowfile"}
        assert {"etc.moved", "f", "f.hard", "x.hard", "y.moved", "r.moved"} <= set(os.listdir(mnt))
        for e in os.scandir(mnt):
            e.stat(follow_symlinks=False)

    assert_same(canary_before, snapshot(canary), "canary")
    for n, before in lowers_before.items():
        assert_same(before, snapshot(layers[n]), n)
    upper = layers["upper"]
    for name, target in (
        ("etc.moved", links["etc"]),
        ("f", links["f"]),
        ("f.hard", links["f"]),
        ("x.hard", links["d/x"]),
        ("y.moved", links["d/y"]),
        ("upc", links["upc"]),
        ("d/x", links["d/x"]),
        ("r.moved", fresh["fresh/r"]),
        ("fresh/h", fresh["fresh/h"]),
        ("fresh/h.hard", fresh["fresh/h"]),
        ("fresh/x.moved", fresh["fresh/x"]),
    ):
        assert_link(upper / name, target)
    assert os.lstat(upper / "f").st_ino == os.lstat(upper / "f.hard").st_ino
    for whiteout in ("etc", "up", "d/z", "d/y", "fresh/r", "fresh/x", "fresh/u"):
        st = os.lstat(upper / whiteout)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, whiteout
    # Nothing of ours ended up outside the layers (e.g. a link created through a followed path).
    assert not any(p.name.startswith("#cowfs") for p in tmp_path.iterdir())

    # A second mount on the result shows the same links.
    with cowfs_mount(mnt, [layers["lower0"], layers["lower1"]], layers["upper"], layers["work"]):
        assert_link(mnt / "etc.moved", links["etc"])
        assert_link(mnt / "f.hard", links["f"])
        assert_link(mnt / "d" / "x", links["d/x"])
    assert_same(canary_before, snapshot(canary), "canary after remount")


_FIFO_CHILD = r"""
import os, sys
mnt = sys.argv[1]
p = os.path.join(mnt, "passwd")
# Without a reader a non-blocking write open fails at once (ENXIO), it must not hang.
try:
    os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
    print("no-reader-open-succeeded")
except OSError as e:
    print("no-reader", e.errno)
r = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
w = os.open(p, os.O_WRONLY)  # a reader exists: must not block
os.write(w, b"through the fifo")
print("read", os.read(r, 100).decode())
os.close(w)
os.close(r)
# The same for the device: /dev/null's numbers, reads give nothing, writes vanish.
d = os.open(os.path.join(mnt, "shadow"), os.O_RDWR)
os.write(d, b"into the void")
print("dev", len(os.read(d, 100)))
os.close(d)
print("stat", os.stat(mnt).st_ino)  # the daemon still answers
"""


def _run_guarded(args: list[str], timeout: float = 20) -> str:
    """Run a child that touches the mount; a hang becomes a test failure, never a stuck run."""
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        pytest.fail(f"child hung for {timeout}s: {args}")
    assert p.returncode == 0, f"child failed ({p.returncode}): {err}"
    return out


def test_fifo_and_device_where_files_are_expected(layers: dict[str, Path], tmp_path: Path) -> None:
    canary, canary_before = make_canary(tmp_path)
    hostile_layers(layers, canary)
    lowers_before = {n: snapshot(layers[n]) for n in ("lower0", "lower1")}
    mnt, upper = layers["mnt"], layers["upper"]
    with cowfs_mount(mnt, [layers["lower0"], layers["lower1"]], upper, layers["work"]):
        assert stat.S_ISFIFO(os.lstat(mnt / "passwd").st_mode)
        st = os.lstat(mnt / "shadow")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
        out = _run_guarded([sys.executable, "-c", _FIFO_CHILD, str(mnt)])
        assert f"no-reader {errno.ENXIO}" in out, out
        assert "read through the fifo" in out, out
        assert "dev 0" in out, out
        # Whether or not opening copied them up (kernel overlayfs does not for special files), an
        # upper entry must be of the same kind, never a regular file holding the data.
        for name, kind in (("passwd", stat.S_ISFIFO), ("shadow", stat.S_ISCHR)):
            if os.path.lexists(upper / name):
                assert kind(os.lstat(upper / name).st_mode), name
        # Metadata changes copy them up: as a FIFO and as the same device.
        os.chmod(mnt / "passwd", 0o600)
        os.chown(mnt / "shadow", 12, 34)
        os.utime(mnt / "passwd", ns=(5_000_000_000, 6_000_000_000))
        os.setxattr(mnt / "shadow", "trusted.cowfs-test", b"dev")
        pst, dst = os.lstat(upper / "passwd"), os.lstat(upper / "shadow")
        assert stat.S_ISFIFO(pst.st_mode) and stat.S_IMODE(pst.st_mode) == 0o600
        assert pst.st_mtime_ns == 6_000_000_000
        assert stat.S_ISCHR(dst.st_mode) and dst.st_rdev == os.makedev(1, 3)
        assert (dst.st_uid, dst.st_gid) == (12, 34)
        assert stat.S_IMODE(dst.st_mode) == 0o640
        # The copies behave like the originals, without blocking the daemon.
        out = _run_guarded([sys.executable, "-c", _FIFO_CHILD, str(mnt)])
        assert "read through the fifo" in out and "dev 0" in out, out
        os.rename(mnt / "passwd", mnt / "passwd.fifo")
        os.link(mnt / "shadow", mnt / "shadow.dev")
        assert stat.S_ISFIFO(os.lstat(upper / "passwd.fifo").st_mode)
        assert os.lstat(upper / "shadow.dev").st_rdev == os.makedev(1, 3)
    assert_same(canary_before, snapshot(canary), "canary")
    for n, before in lowers_before.items():
        assert_same(before, snapshot(layers[n]), n)


# --------------------------------------------------------------------------- races


def _attacker(dir_path: Path, targets, stop: threading.Event, hits: list[int], hold: float) -> None:
    """Swap each name `targets()` gives (something the mount is about to make or copy up) with
    its decoy (a symlink to the canary), hold it there a moment, swap back; until told to stop."""
    dfd = os.open(dir_path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        while not stop.is_set():
            for n, evil in targets():
                if exchange(dfd, n, evil):
                    hits[0] += 1
                    if hold:
                        time.sleep(hold)
                    exchange(dfd, n, evil)
    finally:
        os.close(dfd)


def _nofollow_dir(parent: int, name: str) -> int:
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)


def test_upper_swap_race_during_copy_up(layers: dict[str, Path], tmp_path: Path) -> None:
    """An attacker with write access to the upper layer keeps swapping what copy-up just put there
    (a directory, a file) with a symlink to the canary (its directory, its secret file). Operations
    through the mount may fail, but nothing outside the layers may be written, created, chmod-ed,
    chown-ed, touched or given an xattr."""
    canary, canary_before = make_canary(tmp_path)
    low = layers["lower0"]
    n = 300
    (low / "a").mkdir()
    for i in range(n):
        (low / "a" / f"f{i}").write_bytes(b"data %d\n" % i)
        (low / "a" / f"s{i}").mkdir(mode=0o755)
        (low / "a" / f"s{i}" / "g").write_bytes(b"g\n")
    lower_before = snapshot(low)
    mnt, upper = layers["mnt"], layers["upper"]
    stop = threading.Event()
    hits = [0]
    errors: dict[str, int] = {}
    with cowfs_mount(mnt, [low], upper, layers["work"]):
        root = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
        a = _nofollow_dir(root, "a")
        try:
            os.fchown(a, 0, 0)  # copies `a` up before the attacker starts
            os.symlink(str(canary), upper / "a" / ".evil")
            os.symlink(str(canary / "secret"), upper / "a" / ".evilf")
            cur = [0]

            def targets() -> list[tuple[bytes, bytes]]:
                i = cur[0]
                return [(b"s%d" % i, b".evil"), (b"f%d" % i, b".evilf")]

            t = threading.Thread(target=_attacker, args=(upper / "a", targets, stop, hits, 0.0005))
            t.start()
            deadline = time.monotonic() + 2.0
            try:
                for i in range(n):
                    if time.monotonic() > deadline:
                        break
                    cur[0] = i
                    ops = [
                        ("write", lambda i=i: _write_at(a, f"f{i}")),
                        ("file-attrs", lambda i=i: _file_attrs(a, f"f{i}")),
                        ("dir-chmod", lambda i=i: _fchmod_dir(a, f"s{i}")),
                        ("create-in", lambda i=i: _create_in(a, f"s{i}", "new")),
                        ("write-in", lambda i=i: _write_at_in(a, f"s{i}", "g")),
                        ("mkdir-in", lambda i=i: _mkdir_in(a, f"s{i}", "m", 0o755)),
                        (
                            "link",
                            lambda i=i: os.link(
                                f"f{i}", f"h{i}", src_dir_fd=a, dst_dir_fd=a, follow_symlinks=False
                            ),
                        ),
                        (
                            "rename",
                            lambda i=i: os.rename(f"h{i}", f"r{i}", src_dir_fd=a, dst_dir_fd=a),
                        ),
                    ]
                    for what, op in ops:
                        try:
                            op()
                        except OSError as e:
                            key = f"{what}:{errno.errorcode.get(e.errno, e.errno)}"
                            errors[key] = errors.get(key, 0) + 1
            finally:
                stop.set()
                t.join()
        finally:
            os.close(a)
            os.close(root)
    assert hits[0] > 0, "the attacker never got to swap anything"
    assert_same(canary_before, snapshot(canary), f"canary (swaps {hits[0]}, errors {errors})")
    assert_same(lower_before, snapshot(low), "lower")


def test_upper_swap_race_during_mkdir_with_special_bits(
    layers: dict[str, Path], tmp_path: Path
) -> None:
    """mkdir through the mount with setgid/sticky bits: the new upper directory is swapped for a
    symlink to the canary the moment it appears. The mode must never land on the canary."""
    canary, canary_before = make_canary(tmp_path)
    low = layers["lower0"]
    (low / "a").mkdir()
    mnt, upper = layers["mnt"], layers["upper"]
    stop = threading.Event()
    hits = [0]
    errors: dict[str, int] = {}
    n = 400
    with cowfs_mount(mnt, [low], upper, layers["work"]):
        root = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
        a = _nofollow_dir(root, "a")
        try:
            os.fchown(a, 0, 0)
            os.symlink(str(canary), upper / "a" / ".evil")
            cur = [0]
            t = threading.Thread(
                target=_attacker,
                args=(upper / "a", lambda: [(b"m%d" % cur[0], b".evil")], stop, hits, 0.002),
            )
            t.start()
            deadline = time.monotonic() + 2.0
            try:
                for i in range(n):
                    if time.monotonic() > deadline:
                        break
                    cur[0] = i
                    try:
                        os.mkdir(f"m{i}", 0o3777, dir_fd=a)
                    except OSError as e:
                        key = errno.errorcode.get(e.errno, str(e.errno))
                        errors[key] = errors.get(key, 0) + 1
            finally:
                stop.set()
                t.join()
        finally:
            os.close(a)
            os.close(root)
    assert hits[0] > 0, "the attacker never got to swap anything"
    assert_same(canary_before, snapshot(canary), f"canary (swaps {hits[0]}, errors {errors})")


def _write_at(dirfd: int, name: str) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW, dir_fd=dirfd)
    try:
        os.write(fd, b"W")
    finally:
        os.close(fd)


def _file_attrs(dirfd: int, name: str) -> None:
    """Every attribute change on an open file: each one reaches the daemon as the file's inode."""
    fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW, dir_fd=dirfd)
    try:
        os.fchmod(fd, 0o640)
        os.fchown(fd, 1234, 1234)
        os.utime(fd, ns=(7_000_000_000, 7_000_000_000))
        os.setxattr(fd, "user.cowfs-race", b"x")
        os.setxattr(fd, "trusted.cowfs-race", b"x")
        os.removexattr(fd, "user.cowfs-race")
        os.ftruncate(fd, 3)
        os.pwrite(fd, b"Z", 1)
    finally:
        os.close(fd)


def _fchmod_dir(dirfd: int, name: str) -> None:
    fd = _nofollow_dir(dirfd, name)
    try:
        os.fchmod(fd, 0o711)
    finally:
        os.close(fd)


def _create_in(dirfd: int, sub: str, name: str) -> None:
    fd = _nofollow_dir(dirfd, sub)
    try:
        os.close(
            os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o4755, dir_fd=fd)
        )
    finally:
        os.close(fd)


def _write_at_in(dirfd: int, sub: str, name: str) -> None:
    fd = _nofollow_dir(dirfd, sub)
    try:
        _write_at(fd, name)
    finally:
        os.close(fd)


def _mkdir_in(dirfd: int, sub: str, name: str, mode: int) -> None:
    fd = _nofollow_dir(dirfd, sub)
    try:
        os.mkdir(name, mode, dir_fd=fd)
    finally:
        os.close(fd)


def test_work_swap_race_during_copy_up(layers: dict[str, Path], tmp_path: Path) -> None:
    """The same attacker, in `<workdir>/work`: each copy-up temp that appears there (a directory, a
    FIFO) is swapped for a symlink to the canary while copy-up sets its attributes. The attributes
    (mode, owner, times, xattrs) of the lower objects must never land on the canary."""
    canary, canary_before = make_canary(tmp_path)
    low = layers["lower0"]
    n = 300
    for i in range(n):
        (low / f"d{i}").mkdir()
        os.chmod(low / f"d{i}", 0o751)
        os.mkfifo(low / f"p{i}", 0o604)
    mnt, upper, workdir = layers["mnt"], layers["upper"], layers["work"]
    stop = threading.Event()
    hits = [0]
    errors: dict[str, int] = {}

    def attacker(pid: int) -> None:
        # Temp names are `#cowfs.PID.N` with N counting up: wait on the next few of them, and
        # now and then catch up with what is really there.
        wd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
        w = os.open("work", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=wd)
        prefix = b"#cowfs.%d." % pid
        nxt, rounds = 1, 0
        try:
            while not stop.is_set():
                rounds += 1
                if rounds % 500 == 0:
                    seen = [
                        int(e.name[len(prefix) :])
                        for e in os.scandir(w)
                        if os.fsencode(e.name).startswith(prefix)
                    ]
                    nxt = max([nxt, *seen])
                for k in range(nxt, nxt + 4):
                    tmp = prefix + b"%d" % k
                    if not exchange(w, tmp, b"evil", wd):
                        continue
                    hits[0] += 1
                    time.sleep(0.002)
                    if not exchange(w, tmp, b"evil", wd):
                        # The daemon moved our symlink on: make a new decoy.
                        os.rename(b"evil", b"spent%d" % hits[0], src_dir_fd=wd, dst_dir_fd=wd)
                        os.symlink(str(canary), b"evil", dir_fd=wd)
                    nxt = k + 1
                    break
        finally:
            os.close(w)
            os.close(wd)

    with cowfs_mount(mnt, [low], upper, workdir):
        os.symlink(str(canary), workdir / "evil")
        (pid,) = _mount_pids(str(mnt))
        t = threading.Thread(target=attacker, args=(pid,))
        t.start()
        deadline = time.monotonic() + 2.0
        try:
            for i in range(n):
                if time.monotonic() > deadline:
                    break
                for what, op in (
                    ("dir-chown", lambda i=i: os.chown(mnt / f"d{i}", 0, 0, follow_symlinks=False)),
                    (
                        "fifo-chown",
                        lambda i=i: os.chown(mnt / f"p{i}", 0, 0, follow_symlinks=False),
                    ),
                ):
                    try:
                        op()
                    except OSError as e:
                        key = f"{what}:{errno.errorcode.get(e.errno, e.errno)}"
                        errors[key] = errors.get(key, 0) + 1
        finally:
            stop.set()
            t.join()
    assert hits[0] > 0, "the attacker never got to swap anything"
    assert_same(canary_before, snapshot(canary), f"canary (swaps {hits[0]}, errors {errors})")
