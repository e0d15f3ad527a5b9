"""The layer roots: opened once at mount as `O_PATH` directory fds, validated, and never re-resolved.

Every later host access is relative to one of these fds (or to a directory fd opened from one, one
name at a time, with `O_NOFOLLOW`), so symlinks inside a layer are never traversed and `..` never
climbs out. This module also owns the single-name helpers built on that rule.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from dataclasses import dataclass

from cowfs.errors import EXIT_PATH, UserError
from cowfs.ondisk import (
    OCI_OPAQUE,
    OPAQUE_XATTRS,
    TRUSTED_PREFIX,
    USER_PREFIX,
    WHITEOUT_XATTRS,
    opaque_value,
)
from cowfs.options import MountConfig

__all__ = ["LayerStack", "check_name", "chmod_nofollow", "fdpath", "open_layer_root"]

O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
O_PATH_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
WORK_SUBDIR = "work"  # kernel overlayfs keeps its temporaries in <workdir>/work as well


def fdpath(fd: int) -> str:
    """A path naming exactly the object behind `fd` (also an `O_PATH` fd), for calls with no fd form."""
    return f"/proc/self/fd/{fd}"


def check_name(name: bytes) -> None:
    """Names reaching a host call are single components: FUSE guarantees it, we make sure."""
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise OSError(errno.EINVAL, "invalid name")
    if len(name) > 255:
        raise OSError(errno.ENAMETOOLONG, "name too long")


def chmod_nofollow(dir_fd: int, name: bytes, mode: int, keep_setgid: bool = False) -> None:
    """chmod one name without ever following a symlink (Linux has no fchmodat that refuses one):
    pin the object with O_PATH|O_NOFOLLOW, check it, chmod it through its fd link."""
    fd = os.open(name, O_PATH_NOFOLLOW, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if stat.S_ISLNK(st.st_mode):
            raise OSError(errno.ELOOP, "refusing to chmod a symlink")
        if keep_setgid:
            mode |= st.st_mode & stat.S_ISGID
        os.chmod(fdpath(fd), mode)
    finally:
        os.close(fd)


def open_layer_root(path: str, what: str) -> int:
    try:
        fd = os.open(path, O_PATH_DIR)
    except FileNotFoundError:
        raise UserError(f"{what} {path!r} does not exist", EXIT_PATH) from None
    except NotADirectoryError:
        raise UserError(f"{what} {path!r} is not a directory", EXIT_PATH) from None
    except OSError as e:
        raise UserError(f"{what} {path!r}: {e.strerror}", EXIT_PATH) from None
    return fd


def _ancestry(fd: int) -> list[tuple[int, int]]:
    """(st_dev, st_ino) of the directory and each ancestor up to /, through `..` fds."""
    out = []
    cur = os.open(".", O_PATH_DIR, dir_fd=fd)
    try:
        while True:
            st = os.fstat(cur)
            key = (st.st_dev, st.st_ino)
            if out and out[-1] == key:
                return out
            out.append(key)
            nxt = os.open("..", O_PATH_DIR, dir_fd=cur)
            os.close(cur)
            cur = nxt
    finally:
        os.close(cur)


@dataclass
class LayerStack:
    """Root fds: `fds[0]` is the upper root (or -1 when read-only), `fds[1:]` the lowers, top first."""

    config: MountConfig
    fds: list[int]
    work_fd: int  # <workdir>/work, our temp area; -1 when read-only
    workdir_fd: int

    @property
    def writable(self) -> bool:
        return self.work_fd >= 0

    @property
    def xattr_prefix(self) -> str:
        return USER_PREFIX if self.config.userxattr else TRUSTED_PREFIX

    @classmethod
    def open(cls, config: MountConfig) -> LayerStack:
        fds: list[int] = []
        try:
            upper = workdir = work = -1
            if config.upperdir is not None:
                # With -o ro the upper is still shown, as the top (read-only) layer.
                upper = open_layer_root(config.upperdir, "upperdir")
                fds.append(upper)
                assert config.workdir is not None
                workdir = open_layer_root(config.workdir, "workdir")
            else:
                fds.append(-1)
            for p in config.lowerdirs:
                fds.append(open_layer_root(p, "lowerdir"))
            if upper >= 0:
                cls._validate_writable(config, fds, workdir)
                if not config.read_only:
                    work = cls._prepare_work(workdir)
            return cls(config, fds, work, workdir)
        except BaseException:
            for fd in fds:
                if fd >= 0:
                    os.close(fd)
            raise

    @staticmethod
    def _validate_writable(config: MountConfig, fds: list[int], workdir: int) -> None:
        upper = fds[0]
        ust, wst = os.fstat(upper), os.fstat(workdir)
        if ust.st_dev != wst.st_dev:
            raise UserError(
                f"upperdir {config.upperdir!r} and workdir {config.workdir!r} must be on the same"
                " filesystem",
                EXIT_PATH,
            )
        up_anc, work_anc = _ancestry(upper), _ancestry(workdir)
        if up_anc[0] == work_anc[0]:
            raise UserError("upperdir and workdir must be different directories", EXIT_PATH)
        if up_anc[0] in work_anc:
            raise UserError(
                f"workdir {config.workdir!r} must not be inside upperdir {config.upperdir!r}",
                EXIT_PATH,
            )
        if work_anc[0] in up_anc:
            raise UserError(
                f"upperdir {config.upperdir!r} must not be inside workdir {config.workdir!r}",
                EXIT_PATH,
            )
        for path, fd in zip(config.lowerdirs, fds[1:], strict=True):
            low_anc = _ancestry(fd)
            for what, anc in (("upperdir", up_anc), ("workdir", work_anc)):
                if low_anc[0] in anc or anc[0] in low_anc:
                    raise UserError(
                        f"{what} and lowerdir {path!r} overlap: one is inside the other",
                        EXIT_PATH,
                    )
        try:
            os.setxattr(fdpath(upper), "trusted.overlay.cowfs-probe", b"1")
            os.removexattr(fdpath(upper), "trusted.overlay.cowfs-probe")
        except OSError as e:
            if not config.userxattr:
                raise UserError(
                    f"upperdir {config.upperdir!r} does not support trusted.* xattrs"
                    f" ({e.strerror}); mount as root or use -o userxattr",
                    EXIT_PATH,
                ) from None

    @staticmethod
    def _prepare_work(workdir: int) -> int:
        """Create <workdir>/work and purge what a crashed mount left there (fd-based, no symlinks)."""
        try:
            os.mkdir(WORK_SUBDIR, 0o700, dir_fd=workdir)
        except FileExistsError:
            pass
        st = os.stat(WORK_SUBDIR, dir_fd=workdir, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            raise UserError("workdir/work exists and is not a directory", EXIT_PATH)
        work = os.open(WORK_SUBDIR, O_PATH_DIR | os.O_NOFOLLOW, dir_fd=workdir)
        purge_dir(work)
        return work

    def close(self) -> None:
        for fd in [*self.fds, self.work_fd, self.workdir_fd]:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fds = []


def purge_dir(dir_fd: int) -> None:
    """Delete everything inside a directory, without following symlinks."""
    rd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        with os.scandir(rd) as it:
            names = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        for name, is_dir in names:
            if is_dir:
                shutil.rmtree(name, dir_fd=rd)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=rd)
    finally:
        os.close(rd)


def read_opaque(fd: int, is_lower: bool, userxattr: bool) -> str:
    """'y', 'x' or '' for the directory behind `fd` (an O_PATH fd)."""
    p = fdpath(fd)
    try:
        names = os.listxattr(p)
    except OSError:
        names = []
    if is_lower:
        candidates = OPAQUE_XATTRS
    else:
        candidates = (USER_PREFIX + "opaque",) if userxattr else (TRUSTED_PREFIX + "opaque",)
    values: list[bytes | None] = []
    for n in candidates:
        if n in names:
            try:
                values.append(os.getxattr(p, n))
            except OSError:
                values.append(None)
    v = opaque_value(values)
    if v != "y" and is_lower:
        try:
            os.stat(OCI_OPAQUE, dir_fd=fd, follow_symlinks=False)
            return "y"
        except OSError:
            pass
    return v


def is_xattr_whiteout(parent_fd: int, name: bytes) -> bool:
    try:
        names = os.listxattr(os.fsencode(fdpath(parent_fd)) + b"/" + name, follow_symlinks=False)
    except OSError:
        return False
    return any(w in names for w in WHITEOUT_XATTRS)
