"""The raw syscalls Python lacks, and nothing else: renameat2 and the FICLONE ioctl.

There is no silent fallback to a weaker call here; callers decide what to do with the OSError.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os

__all__ = ["RENAME_EXCHANGE", "RENAME_NOREPLACE", "RENAME_WHITEOUT", "ficlone", "renameat2"]

RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2

_FICLONE = 0x40049409

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int


def renameat2(
    old_dir_fd: int, old_name: bytes, new_dir_fd: int, new_name: bytes, flags: int = 0
) -> None:
    """renameat2(2) on single names relative to directory fds."""
    if _renameat2(old_dir_fd, old_name, new_dir_fd, new_name, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), old_name, None, new_name)


def ficlone(dst_fd: int, src_fd: int) -> None:
    """Share src's extents with dst (btrfs, xfs); EOPNOTSUPP/EXDEV/EINVAL where the fs cannot."""
    fcntl.ioctl(dst_fd, _FICLONE, src_fd)
