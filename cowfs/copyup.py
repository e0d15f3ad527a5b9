"""Synchronous copy-up, run in worker threads: build the copy under a temp name in the work
directory, then rename it into the upper layer in one step.

A crash at any point leaves either the lower object visible (the temp is purged at the next mount)
or the complete copy: never a partial file. Workers take fds and values, return nothing, and never
touch the engine's tables.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat

from cowfs import _sys
from cowfs.layers import chmod_nofollow, fdpath
from cowfs.ondisk import is_private_xattr

__all__ = ["build_temp", "copy_data", "copy_up", "install", "temp_name"]

_counter = itertools.count(1)
_CHUNK = 1 << 30


def temp_name() -> bytes:
    return b"#cowfs.%d.%d" % (os.getpid(), next(_counter))


def copy_data(src: int, dst: int, size: int) -> None:
    """Data extents only (holes stay holes), copied in the kernel; reflink first where it works."""
    try:
        _sys.ficlone(dst, src)
        return
    except OSError:
        pass
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(src, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole remains
                    break
                raise
            end = os.lseek(src, start, os.SEEK_HOLE)
            off_in, off_out = start, start
            while off_in < end:
                n = os.copy_file_range(src, dst, min(end - off_in, _CHUNK), off_in, off_out)
                if n == 0:
                    break
                off_in += n
                off_out += n
            pos = end
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        _copy_slow(src, dst, size)
    os.ftruncate(dst, size)


def _copy_slow(src: int, dst: int, size: int) -> None:
    pos = 0
    while pos < size:
        buf = os.pread(src, 1 << 20, pos)
        if not buf:
            break
        os.pwrite(dst, buf, pos)
        pos += len(buf)


def copy_xattrs(src_path: str | bytes, dst: int | str | bytes, follow: bool = True) -> None:
    """`src_path` is a /proc/self/fd link: following it reaches the object itself, even a symlink."""
    try:
        names = os.listxattr(src_path)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return
        raise
    for n in names:
        if is_private_xattr(n):
            continue
        try:
            v = os.getxattr(src_path, n)
            os.setxattr(dst, n, v, follow_symlinks=follow)
        except OSError as e:
            # user.* xattrs are impossible on symlinks and special files; the kernel skips EOPNOTSUPP.
            if e.errno not in (errno.ENOTSUP, errno.EPERM, errno.ENODATA):
                raise


def build_temp(
    src_opath: int,
    st: os.stat_result,
    work_fd: int,
    tmp: bytes,
    with_data: bool,
    sync: bool,
    extra_xattrs: dict[str, bytes] | None = None,
) -> None:
    """Create a complete copy of the object behind `src_opath` as `tmp` in the work directory.

    `extra_xattrs` are set too (the overlay-private marks recording where the copy came from).
    """
    mode = st.st_mode
    src_p = fdpath(src_opath)
    if stat.S_ISREG(mode):
        dst = os.open(
            tmp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=work_fd,
        )
        try:
            if with_data and st.st_size:
                src = os.open(
                    src_p, os.O_RDONLY | os.O_CLOEXEC
                )  # the fd link names the object itself
                try:
                    copy_data(src, dst, st.st_size)
                finally:
                    os.close(src)
            copy_xattrs(src_p, dst)  # after the data, so security.capability survives
            for n, v in (extra_xattrs or {}).items():
                os.setxattr(dst, n, v)
            os.fchown(dst, st.st_uid, st.st_gid)
            os.fchmod(dst, stat.S_IMODE(mode))  # after chown, which clears setuid/setgid
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
            if sync:
                os.fsync(dst)
        finally:
            os.close(dst)
        return
    if stat.S_ISDIR(mode):
        os.mkdir(tmp, 0o700, dir_fd=work_fd)
    elif stat.S_ISLNK(mode):
        os.symlink(os.readlink("", dir_fd=src_opath), tmp, dir_fd=work_fd)
    else:
        os.mknod(tmp, stat.S_IFMT(mode) | 0o600, st.st_rdev, dir_fd=work_fd)
    dst_p = os.fsencode(fdpath(work_fd)) + b"/" + tmp
    copy_xattrs(src_p, dst_p, follow=False)
    for n, v in (extra_xattrs or {}).items():
        os.setxattr(dst_p, n, v, follow_symlinks=False)
    os.chown(tmp, st.st_uid, st.st_gid, dir_fd=work_fd, follow_symlinks=False)
    if not stat.S_ISLNK(mode):
        chmod_nofollow(work_fd, tmp, stat.S_IMODE(mode))
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=work_fd, follow_symlinks=False)


def install(work_fd: int, tmp: bytes, parent_fd: int, name: bytes, replace: bool) -> None:
    """Rename the finished temp into place: over a whiteout when `replace`, else never over anything."""
    if replace:
        os.rename(tmp, name, src_dir_fd=work_fd, dst_dir_fd=parent_fd)
    else:
        _sys.renameat2(work_fd, tmp, parent_fd, name, _sys.RENAME_NOREPLACE)


def copy_up(
    src_opath: int,
    st: os.stat_result,
    work_fd: int,
    parent_fd: int,
    name: bytes,
    with_data: bool = True,
    sync: bool = True,
    extra_xattrs: dict[str, bytes] | None = None,
) -> None:
    """Copy one object up into `parent_fd` (an upper directory) as `name`, atomically."""
    tmp = temp_name()
    try:
        build_temp(src_opath, st, work_fd, tmp, with_data, sync, extra_xattrs)
        pst = os.fstat(parent_fd)
        install(work_fd, tmp, parent_fd, name, replace=False)
        # Copy-up is invisible through the mount: the parent keeps its times (as the kernel does).
        os.utime(fdpath(parent_fd), ns=(pst.st_atime_ns, pst.st_mtime_ns))
        if sync:
            _fsync_dir(parent_fd)
    finally:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, OSError):
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(tmp, dir_fd=work_fd)
            else:
                os.unlink(tmp, dir_fd=work_fd)


def _fsync_dir(dir_fd: int) -> None:
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
