"""The filesystem API (`UnionFS`) over real layer directories, with no FUSE and no kernel mount.

Every test ends with `check_layers`: nothing left in work, lowers byte-identical to before.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from cowfs.engine import UnionFS
from cowfs.layers import LayerStack
from cowfs.options import parse_options

WHITEOUT = stat.S_IFCHR


def snapshot(root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            st = p.lstat()
            xattrs = {}
            if not p.is_symlink():
                for x in os.listxattr(p, follow_symlinks=False):
                    xattrs[x] = os.getxattr(p, x, follow_symlinks=False)
            data = None
            if stat.S_ISREG(st.st_mode):
                data = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                data = os.readlink(p)
            out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_mtime_ns, data, xattrs)
    return out


class Env:
    def __init__(self, tmp: Path, nlowers: int = 2, writable: bool = True) -> None:
        self.lowers = [tmp / f"lower{i}" for i in range(nlowers)]
        self.upper, self.work = tmp / "upper", tmp / "work"
        for p in [*self.lowers, self.upper, self.work]:
            p.mkdir()
        self.writable = writable
        self.fs: UnionFS | None = None

    def start(self) -> UnionFS:
        opts = "lowerdir=" + ":".join(map(str, self.lowers))
        if self.writable:
            opts += f",upperdir={self.upper},workdir={self.work}"
        self.before = [snapshot(p) for p in self.lowers]
        self.fs = UnionFS(LayerStack.open(parse_options([opts])))
        return self.fs

    def ino(self, path: str) -> int:
        ino = 1
        for part in path.split("/"):
            if part:
                attr = self.fs.lookup(ino, part.encode())
                if attr is None:
                    raise FileNotFoundError(path)
                ino = attr.ino
        return ino

    def check_layers(self) -> None:
        assert [snapshot(p) for p in self.lowers] == self.before, "a lower layer changed"
        assert os.listdir(self.work / "work") == [], "work directory not clean"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    if e.fs is not None:
        e.check_layers()
        e.fs.close()
        e.fs.stack.close()


def run(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    async def main() -> Any:
        return await fn(*args, **kw)

    return trio.run(main)


def listdir(fs: UnionFS, ino: int) -> list[str]:
    fh = fs.opendir(ino)
    try:
        return sorted(n.decode() for n, _a, _o, i in fs.readdir_plus(fh, 0) if i is not None)
    finally:
        fs.releasedir(fh)


def read_all(fs: UnionFS, ino: int) -> bytes:
    h = run(fs.open, ino, os.O_RDONLY)
    try:
        return run(fs.read, h.fh, 0, 1 << 20)
    finally:
        fs.release(h.fh)


def test_lookup_falls_through_and_shadows(env: Env) -> None:
    (env.lowers[1] / "a").write_text("bottom")
    (env.lowers[1] / "b").write_text("b-bottom")
    (env.lowers[0] / "a").write_text("top")
    fs = env.start()
    assert read_all(fs, env.ino("a")) == b"top"
    assert read_all(fs, env.ino("b")) == b"b-bottom"
    assert fs.lookup(1, b"missing") is None
    assert listdir(fs, 1) == ["a", "b"]


def test_whiteouts_and_opaque_in_lowers(env: Env) -> None:
    l0, l1 = env.lowers
    (l1 / "gone").write_text("x")
    os.mknod(l0 / "gone", WHITEOUT | 0o600, os.makedev(0, 0))
    (l1 / "d").mkdir()
    (l1 / "d" / "hidden").write_text("x")
    (l0 / "d").mkdir()
    (l0 / "d" / "shown").write_text("y")
    os.setxattr(l0 / "d", "trusted.overlay.opaque", b"y")
    # OCI dialect: .wh.NAME and .wh..wh..opq
    (l1 / "oci").write_text("x")
    (l0 / ".wh.oci").write_text("")
    (l1 / "od").mkdir()
    (l1 / "od" / "old").write_text("x")
    (l0 / "od").mkdir()
    (l0 / "od" / ".wh..wh..opq").write_text("")
    (l0 / "od" / "new").write_text("y")
    fs = env.start()
    assert fs.lookup(1, b"gone") is None
    assert fs.lookup(1, b"oci") is None
    assert fs.lookup(1, b".wh.oci") is None
    assert listdir(fs, 1) == ["d", "od"]
    assert listdir(fs, env.ino("d")) == ["shown"]
    assert listdir(fs, env.ino("od")) == ["new"]
    assert fs.listxattr(env.ino("d")) == []  # overlay-private xattrs never shown


def test_xattr_whiteout_in_lower(env: Env) -> None:
    l0, l1 = env.lowers
    (l1 / "d").mkdir()
    (l1 / "d" / "f").write_text("x")
    (l1 / "d" / "g").write_text("x")
    (l0 / "d").mkdir()
    (l0 / "d" / "f").write_text("")
    os.setxattr(l0 / "d" / "f", "trusted.overlay.whiteout", b"")
    os.setxattr(l0 / "d", "trusted.overlay.opaque", b"x")
    fs = env.start()
    assert listdir(fs, env.ino("d")) == ["g"]
    assert fs.lookup(env.ino("d"), b"f") is None


def test_copy_up_on_write_keeps_metadata_and_inode(env: Env) -> None:
    l1 = env.lowers[1]
    (l1 / "dir").mkdir(mode=0o750)
    f = l1 / "dir" / "file"
    f.write_bytes(b"hello")
    os.chmod(f, 0o640)
    os.chown(f, 1234, 4321)
    os.setxattr(f, "user.k", b"v")
    os.utime(f, ns=(1_000_000_000, 2_000_000_000))
    fs = env.start()
    ino = env.ino("dir/file")
    h = run(fs.open, ino, os.O_WRONLY)
    run(fs.write, h.fh, 5, b" world")
    fs.release(h.fh)
    up = env.upper / "dir" / "file"
    st = up.lstat()
    assert up.read_bytes() == b"hello world"
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 1234, 4321)
    assert os.getxattr(up, "user.k") == b"v"
    assert stat.S_IMODE((env.upper / "dir").stat().st_mode) == 0o750
    assert fs.getattr(ino).ino == ino == env.ino("dir/file")
    assert fs.getattr(ino).st.st_size == 11


def test_readdir_after_a_forgotten_copy_up_shows_the_copy(env: Env) -> None:
    """readdir probes a plain file's layer from hints taken when it read the directory; a file
    copied up (and forgotten by the kernel) in between must be seen in the upper."""
    d = env.lowers[0] / "d"
    d.mkdir()
    for n in ("a", "b", "c"):
        (d / n).write_bytes(b"lower")
    fs = env.start()
    dino = env.ino("d")
    assert next(fs.readdir_plus(dino, 0))[0] == b"."  # the listing and its hints are taken
    ino = env.ino("d/b")
    h = run(fs.open, ino, os.O_WRONLY)
    run(fs.write, h.fh, 0, b"UPPER!!")
    fs.release(h.fh)
    fs.forget([(ino, 1)])
    assert ino not in fs.table.inodes
    got = {n: (a, i) for n, a, _o, i in fs.readdir_plus(dino, 0) if i is not None}
    attr, inode = got[b"b"]
    assert inode.layer == 0 and attr.st.st_size == 7 and attr.ino == ino


def test_open_read_only_never_copies_up(env: Env) -> None:
    (env.lowers[0] / "f").write_text("x")
    fs = env.start()
    read_all(fs, env.ino("f"))
    assert os.listdir(env.upper) == []


def test_o_trunc_copy_up_skips_data(env: Env) -> None:
    (env.lowers[0] / "f").write_bytes(b"x" * 10000)
    fs = env.start()
    h = run(fs.open, env.ino("f"), os.O_WRONLY | os.O_TRUNC)
    fs.release(h.fh)
    assert (env.upper / "f").stat().st_size == 0


def test_sparse_copy_up_stays_sparse(env: Env) -> None:
    f = env.lowers[0] / "sparse"
    with open(f, "wb") as fh:
        fh.truncate(64 << 20)
        fh.seek(32 << 20)
        fh.write(b"data")
    fs = env.start()
    run(fs.setattr, env.ino("sparse"), mode=0o600)
    up = (env.upper / "sparse").stat()
    assert up.st_size == 64 << 20
    assert up.st_blocks * 512 < 1 << 20
    with open(env.upper / "sparse", "rb") as fh:
        fh.seek(32 << 20)
        assert fh.read(4) == b"data"


def test_unlink_lower_leaves_whiteout(env: Env) -> None:
    (env.lowers[1] / "d").mkdir()
    (env.lowers[1] / "d" / "f").write_text("x")
    (env.lowers[1] / "d" / "g").write_text("x")
    fs = env.start()
    d = env.ino("d")
    run(fs.unlink, d, b"f")
    st = (env.upper / "d" / "f").lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert listdir(fs, d) == ["g"]
    with pytest.raises(FileNotFoundError):
        run(fs.unlink, d, b"f")


def test_unlink_upper_only_leaves_nothing(env: Env) -> None:
    fs = env.start()
    h, _attr = run(fs.create, 1, b"new", 0o644, os.O_WRONLY, 0, 0)
    fs.release(h.fh)
    run(fs.unlink, 1, b"new")
    assert os.listdir(env.upper) == []


def test_rmdir_rules(env: Env) -> None:
    (env.lowers[1] / "full").mkdir()
    (env.lowers[1] / "full" / "f").write_text("x")
    (env.lowers[1] / "empty").mkdir()
    fs = env.start()
    with pytest.raises(OSError) as ei:
        run(fs.rmdir, 1, b"full")
    assert ei.value.errno == errno.ENOTEMPTY
    run(fs.unlink, env.ino("full"), b"f")
    run(fs.rmdir, 1, b"full")  # now only a whiteout is left inside: merged-empty
    run(fs.rmdir, 1, b"empty")
    for n in ("full", "empty"):
        st = (env.upper / n).lstat()
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert listdir(fs, 1) == []


def test_mkdir_over_deleted_dir_is_opaque(env: Env) -> None:
    (env.lowers[1] / "d").mkdir()
    (env.lowers[1] / "d" / "old").write_text("x")
    fs = env.start()
    run(fs.unlink, env.ino("d"), b"old")
    run(fs.rmdir, 1, b"d")
    attr = fs.mkdir(1, b"d", 0o755, 0, 0)
    assert os.getxattr(env.upper / "d", "trusted.overlay.opaque") == b"y"
    assert listdir(fs, attr.ino) == []


def test_create_ownership_and_setgid(env: Env) -> None:
    fs = env.start()
    d = fs.mkdir(1, b"sg", 0o2777, 0, 777)
    attr = fs.mkdir(d.ino, b"sub", 0o755, 1000, 1000)
    assert (attr.st.st_uid, attr.st.st_gid) == (1000, 777)  # group from the setgid parent
    assert attr.st.st_mode & stat.S_ISGID
    h, fattr = run(fs.create, 1, b"f", 0o600, os.O_WRONLY, 1000, 1001)
    fs.release(h.fh)
    assert (fattr.st.st_uid, fattr.st.st_gid) == (1000, 1001)


def test_rename_rules(env: Env) -> None:
    (env.lowers[1] / "ldir").mkdir()
    (env.lowers[1] / "lfile").write_text("data")
    fs = env.start()
    with pytest.raises(OSError) as ei:
        run(fs.rename, 1, b"ldir", 1, b"moved", 0)
    assert ei.value.errno == errno.EXDEV
    run(fs.rename, 1, b"lfile", 1, b"moved", 0)
    assert fs.lookup(1, b"lfile") is None
    assert read_all(fs, env.ino("moved")) == b"data"
    st = (env.upper / "lfile").lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    # A pure upper directory may move; landing on a lower directory's name makes it opaque.
    fs.mkdir(1, b"up", 0o755, 0, 0)
    run(fs.rmdir, 1, b"ldir")
    run(fs.rename, 1, b"up", 1, b"ldir", 0)
    assert os.getxattr(env.upper / "ldir", "trusted.overlay.opaque") == b"y"
    with pytest.raises(OSError) as ei:
        run(fs.rename, 1, b"moved", 1, b"ldir", 0)
    assert ei.value.errno == errno.EISDIR


def test_rename_noreplace_and_exchange(env: Env) -> None:
    (env.lowers[0] / "a").write_text("A")
    (env.lowers[0] / "b").write_text("B")
    fs = env.start()
    with pytest.raises(OSError) as ei:
        run(fs.rename, 1, b"a", 1, b"b", 1)  # RENAME_NOREPLACE
    assert ei.value.errno == errno.EEXIST
    run(fs.rename, 1, b"a", 1, b"b", 2)  # RENAME_EXCHANGE
    assert read_all(fs, env.ino("a")) == b"B"
    assert read_all(fs, env.ino("b")) == b"A"


def test_hard_link_to_lower_file(env: Env) -> None:
    (env.lowers[0] / "f").write_text("x")
    fs = env.start()
    ino = env.ino("f")
    attr = run(fs.link, ino, 1, b"g")
    assert attr.ino == ino
    assert attr.nlink == 2
    assert (env.upper / "f").stat().st_ino == (env.upper / "g").stat().st_ino


def test_xattrs_copy_up_and_privacy(env: Env) -> None:
    (env.lowers[0] / "f").write_text("x")
    os.setxattr(env.lowers[0] / "f", "user.a", b"1")
    fs = env.start()
    ino = env.ino("f")
    run(fs.setxattr, ino, "user.b", b"2")
    assert sorted(fs.listxattr(ino)) == ["user.a", "user.b"]
    with pytest.raises(OSError) as ei:
        fs.getxattr(ino, "trusted.overlay.cowfs.ino")
    assert ei.value.errno == errno.ENODATA
    with pytest.raises(OSError) as ei:
        run(fs.removexattr, ino, "user.nope")
    assert ei.value.errno == errno.ENODATA


def test_old_reader_sees_copied_up_data(env: Env) -> None:
    (env.lowers[0] / "f").write_bytes(b"AAAA")
    fs = env.start()
    ino = env.ino("f")
    r = run(fs.open, ino, os.O_RDONLY)
    w = run(fs.open, ino, os.O_RDWR)
    run(fs.write, w.fh, 0, b"BBBB")
    assert run(fs.read, r.fh, 0, 4) == b"BBBB"
    fs.release(r.fh)
    fs.release(w.fh)


def test_large_copy_up_runs_in_a_thread(env: Env) -> None:
    data = os.urandom(1 << 20) * 5
    (env.lowers[0] / "big").write_bytes(data)
    fs = env.start()
    ino = env.ino("big")
    h = run(fs.open, ino, os.O_WRONLY)
    fs.release(h.fh)
    assert (env.upper / "big").read_bytes() == data


def test_read_only_mount_refuses_writes(tmp_path: Path) -> None:
    e = Env(tmp_path, writable=False)
    (e.lowers[0] / "f").write_text("x")
    fs = e.start()
    try:
        ino = e.ino("f")
        for call in (
            lambda: run(fs.open, ino, os.O_WRONLY),
            lambda: fs.mkdir(1, b"d", 0o755, 0, 0),
            lambda: run(fs.unlink, 1, b"f"),
            lambda: run(fs.setattr, ino, mode=0o600),
        ):
            with pytest.raises(OSError) as ei:
                call()
            assert ei.value.errno == errno.EROFS
        assert read_all(fs, ino) == b"x"
    finally:
        fs.close()
        fs.stack.close()


def test_inode_numbers_stable_across_remount(env: Env, tmp_path: Path) -> None:
    (env.lowers[0] / "d").mkdir()
    (env.lowers[0] / "d" / "f").write_text("x")
    fs = env.start()
    before = (env.ino("d"), env.ino("d/f"))
    run(fs.setattr, env.ino("d/f"), mode=0o600)
    run(fs.rename, env.ino("d"), b"f", 1, b"g", 0)
    moved = env.ino("g")
    assert moved == before[1]
    fs.close()
    fs.stack.close()
    env.fs = None
    fs2 = env.start()
    env.fs = fs2
    assert (env.ino("d"), env.ino("g")) == (before[0], before[1])
