"""The overlayfs on-disk dialects, as pure functions on values.

Kernel overlayfs writes: whiteout = char device 0/0; opaque dir = xattr `<P>opaque` = "y", where the
prefix P is `trusted.overlay.` (or `user.overlay.` with userxattr). In lower layers we also read the
kernel's xattr whiteouts (zero-size file with `<P>whiteout` inside a dir marked `<P>opaque` = "x"),
`user.overlay.*`, fuse-overlayfs's `user.fuseoverlayfs.opaque`, and the OCI forms `.wh.NAME` and
`.wh..wh..opq`. We only ever write the kernel's own form.
"""

from __future__ import annotations

import enum
import stat

__all__ = [
    "OCI_OPAQUE",
    "OCI_PREFIX",
    "OPAQUE_XATTRS",
    "Kind",
    "classify",
    "is_private_xattr",
    "is_whiteout_stat",
    "opaque_value",
]

TRUSTED_PREFIX = "trusted.overlay."
USER_PREFIX = "user.overlay."
OCI_PREFIX = ".wh."
OCI_OPAQUE = ".wh..wh..opq"

OPAQUE_XATTRS = (
    TRUSTED_PREFIX + "opaque",
    USER_PREFIX + "opaque",
    "user.fuseoverlayfs.opaque",
)
WHITEOUT_XATTRS = (TRUSTED_PREFIX + "whiteout", USER_PREFIX + "whiteout")
_PRIVATE_PREFIXES = (TRUSTED_PREFIX, USER_PREFIX, "user.fuseoverlayfs.")


class Kind(enum.Enum):
    ABSENT = "absent"
    WHITEOUT = "whiteout"
    DIR = "dir"
    NONDIR = "nondir"


def is_whiteout_stat(st_mode: int, st_rdev: int) -> bool:
    """Kernel whiteout: a character device with device number 0/0 (the mode bits are ignored)."""
    return stat.S_ISCHR(st_mode) and st_rdev == 0


def classify(st_mode: int, st_rdev: int) -> Kind:
    if is_whiteout_stat(st_mode, st_rdev):
        return Kind.WHITEOUT
    if stat.S_ISDIR(st_mode):
        return Kind.DIR
    return Kind.NONDIR


def opaque_value(values: list[bytes | None]) -> str:
    """'y' (opaque), 'x' (holds xattr whiteouts) or '' from the opaque xattrs' values, in order."""
    for v in values:
        if v:
            c = v[:1]
            if c == b"y":
                return "y"
            if c == b"x":
                return "x"
    return ""


def is_private_xattr(name: str) -> bool:
    """Overlay-private xattrs are never shown through the mount, nor copied up."""
    return name.startswith(_PRIVATE_PREFIXES)
