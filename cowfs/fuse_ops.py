"""The pyfuse3 adapter: one-line delegations to `UnionFS`, reply types with cache timeouts, and the
error boundary (only `FUSEError` leaves a handler: an unexpected exception becomes EIO plus a log
line, never a dead mount)."""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import trio

from cowfs.engine import Attr, UnionFS

__all__ = ["Operations"]

log = logging.getLogger(__name__)

# pyfuse3 built with cowfs's patches (scripts/setup.sh) passes a directory's inode to readdir
# when there was no OPENDIR. COWFS_OPENDIR=1 runs as on an unpatched pyfuse3 (tests use it).
NO_OPENDIR = (
    "readdir-ino" in getattr(pyfuse3, "cowfs_patches", ())
    and os.environ.get("COWFS_OPENDIR") != "1"
)

# Layers are immutable and the upper changes only through this mount, so the kernel may keep
# names, attributes and negative entries as long as it likes.
TIMEOUT = 3600.0

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def boundary(fn: F) -> F:
    @functools.wraps(fn)
    async def wrapper(self: Operations, *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            self.internal_errors += 1
            log.exception("internal error in %s%r", fn.__name__, args[:3])
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            if self.fs.attr_changed:
                await self.invalidate_attrs()

    return wrapper  # type: ignore[return-value]


def entry(attr: Attr) -> pyfuse3.EntryAttributes:
    """The reply for `attr`, built once per `Attr` (a lower object's `Attr` is cached and
    reused, and pyfuse3 only reads an `EntryAttributes` when it replies)."""
    e = attr.reply
    if e is None:
        e = attr.reply = _entry(attr)
    return e  # type: ignore[return-value]


def _entry(attr: Attr) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    st = attr.st
    e.st_ino = attr.ino
    e.generation = 0
    e.entry_timeout = TIMEOUT
    e.attr_timeout = TIMEOUT
    e.st_mode = st.st_mode
    e.st_nlink = attr.nlink
    e.st_uid = st.st_uid
    e.st_gid = st.st_gid
    e.st_rdev = st.st_rdev
    e.st_size = st.st_size
    e.st_blksize = st.st_blksize
    e.st_blocks = st.st_blocks
    e.st_atime_ns = st.st_atime_ns
    e.st_mtime_ns = st.st_mtime_ns
    e.st_ctime_ns = st.st_ctime_ns
    return e


def negative_entry() -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = 0
    e.entry_timeout = TIMEOUT
    return e


def _invalidate(inos: list[int]) -> None:
    for ino in inos:
        try:
            pyfuse3.invalidate_inode(ino, attr_only=True)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EBADF):
                log.warning("invalidate inode %d: %s", ino, e)


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    # The kernel buffers writes (one WRITE per dirty range instead of one per write(2)), owns
    # size and mtime of open files, and may read through write-only handles (the engine opens
    # those O_RDWR).
    enable_writeback_cache = True
    enable_acl = False

    def __init__(self, fs: UnionFS) -> None:
        super().__init__()
        self.fs = fs
        self.internal_errors = 0
        if isinstance(fs, UnionFS):
            fs.writeback = self.enable_writeback_cache

    def init(self) -> None:
        pass

    async def invalidate_attrs(self) -> None:
        """Tell the kernel about attributes that changed behind its cache (copy-up), before the
        reply, so that the caller's next stat sees them. With the writeback cache,
        `invalidate_inode` may block in the kernel (pyfuse3's docstring): it runs in a worker
        thread while this handler waits, so the event loop keeps answering the requests the
        kernel may be waiting for."""
        changed = self.fs.attr_changed
        inos = list(changed)
        changed.clear()
        if self.enable_writeback_cache:
            await trio.to_thread.run_sync(_invalidate, inos)
        else:
            _invalidate(inos)

    @boundary
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        attr = self.fs.lookup(parent_inode, name)
        return negative_entry() if attr is None else entry(attr)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        try:
            self.fs.forget(inode_list)
        except Exception:
            log.exception("forget failed")

    @boundary
    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return entry(self.fs.getattr(inode))

    @boundary
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any) -> Any:
        kw: dict[str, Any] = {"fh": fh}
        if fields.update_size:
            kw["size"] = attr.st_size
        if fields.update_mode:
            kw["mode"] = attr.st_mode
        if fields.update_uid:
            kw["uid"] = attr.st_uid
        if fields.update_gid:
            kw["gid"] = attr.st_gid
        if fields.update_atime:
            kw["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            kw["mtime_ns"] = attr.st_mtime_ns
        return entry(await self.fs.setattr(inode, **kw))

    @boundary
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return self.fs.readlink(inode)

    @boundary
    async def opendir(self, inode: int, ctx: Any) -> int:
        # With pyfuse3 patched to pass the inode to readdir (third_party/pyfuse3), ENOSYS turns
        # OPENDIR and RELEASEDIR off for good (FUSE_NO_OPENDIR_SUPPORT) and the kernel caches
        # listings (FOPEN_CACHE_DIR), dropping them when the directory changes through it - and
        # only the kernel changes it. A warm readdir then costs no request at all.
        if NO_OPENDIR:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        return self.fs.opendir(inode)

    @boundary
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        # `fh` is the directory's inode number, from opendir or from pyfuse3 itself.
        fs = self.fs
        reply = pyfuse3.readdir_reply
        for name, attr, nxt, inode in fs.readdir_plus(fh, start_id):
            if not reply(token, name, entry(attr), nxt):
                if inode is not None:
                    fs.table.maybe_drop(inode)
                break
            if inode is not None:
                inode.nlookup += 1

    @boundary
    async def releasedir(self, fh: int) -> None:
        self.fs.releasedir(fh)

    @boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass

    @boundary
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        h = await self.fs.open(inode, flags)
        return pyfuse3.FileInfo(fh=h.fh, keep_cache=True, direct_io=bool(flags & os.O_DIRECT))

    @boundary
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        h, attr = await self.fs.create(parent_inode, name, mode, flags, ctx.uid, ctx.gid)
        fi = pyfuse3.FileInfo(fh=h.fh, keep_cache=True, direct_io=bool(flags & os.O_DIRECT))
        return fi, entry(attr)

    @boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.fs.read(fh, off, size)

    @boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.fs.write(fh, off, buf)

    @boundary
    async def flush(self, fh: int) -> None:
        pass

    @boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.fs.fsync(fh, datasync)

    @boundary
    async def release(self, fh: int) -> None:
        self.fs.release(fh)

    @boundary
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        return entry(self.fs.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid))

    @boundary
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        return entry(self.fs.mknod(parent_inode, name, mode, rdev, ctx.uid, ctx.gid))

    @boundary
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        return entry(self.fs.symlink(parent_inode, name, target, ctx.uid, ctx.gid))

    @boundary
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        return entry(await self.fs.link(inode, new_parent_inode, new_name))

    @boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.unlink(parent_inode, name)

    @boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.rmdir(parent_inode, name)

    @boundary
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        await self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @boundary
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        return self.fs.getxattr(inode, os.fsdecode(name))

    @boundary
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return [os.fsencode(n) for n in self.fs.listxattr(inode)]

    @boundary
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        await self.fs.setxattr(inode, os.fsdecode(name), value)

    @boundary
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.removexattr(inode, os.fsdecode(name))

    @boundary
    async def statfs(self, ctx: Any) -> Any:
        sv = self.fs.statfs()
        d = pyfuse3.StatvfsData()
        d.f_bsize = sv.f_bsize
        d.f_frsize = sv.f_frsize
        d.f_blocks = sv.f_blocks
        d.f_bfree = sv.f_bfree
        d.f_bavail = sv.f_bavail
        d.f_files = sv.f_files
        d.f_ffree = sv.f_ffree
        d.f_favail = sv.f_favail
        d.f_namemax = sv.f_namemax
        return d
