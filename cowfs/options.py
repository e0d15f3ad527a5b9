"""Parsing the overlayfs-style option string into a frozen `MountConfig`. Pure: no I/O.

The option names and the layer order are kernel overlayfs's (`lowerdir=TOP:...:BOTTOM`, `\\:` escapes
a colon, `\\,` a comma). FUSE mount options that libfuse accepts pass through; the connection options
that pyfuse3 cannot hand to libfuse (`writeback_cache`, `max_write=` ...) make `fuse_session_new`
fail with an unhelpful message, so they are refused here with a clear one.
"""

from __future__ import annotations

from dataclasses import dataclass

from cowfs.errors import EXIT_USAGE, UserError

__all__ = ["MountConfig", "parse_options", "split_escaped"]

# libfuse's lib/mount.c fuse_mount_opts[] and lib/fuse_lowlevel.c fuse_ll_opts[] (libfuse 3.14).
_FUSE_FLAGS = frozenset(
    {
        "allow_other",
        "allow_root",
        "auto_unmount",
        "default_permissions",
        "blkdev",
        "suid",
        "nosuid",
        "dev",
        "nodev",
        "exec",
        "noexec",
        "async",
        "sync",
        "atime",
        "noatime",
        "diratime",
        "nodiratime",
        "relatime",
        "norelatime",
        "strictatime",
        "nostrictatime",
        "lazytime",
        "nolazytime",
        "dirsync",
        "nodirsync",
    }
)
_FUSE_VALUED = frozenset(
    {
        "fsname",
        "subtype",
        "max_read",
        "blksize",
        "context",
        "fscontext",
        "defcontext",
        "rootcontext",
    }
)
# fuse_parse_conn_info_opts options: pyfuse3 never calls that parser, so libfuse rejects them.
_FUSE_REFUSED = frozenset(
    {
        "max_write",
        "max_readahead",
        "writeback_cache",
        "no_writeback_cache",
        "async_read",
        "sync_read",
        "splice_write",
        "no_splice_write",
        "splice_move",
        "no_splice_move",
        "splice_read",
        "no_splice_read",
        "readdirplus",
        "auto_inval_data",
        "no_auto_inval_data",
        "time_gran",
        "max_background",
        "congestion_threshold",
        "large_read",
        "nonempty",
    }
)
# Options mount(8) and fstab use that mean nothing to the filesystem itself.
_IGNORED = frozenset(
    {"defaults", "auto", "noauto", "user", "nouser", "users", "owner", "nofail", "_netdev", "rw"}
)
# Kernel overlayfs options whose default behaviour is what cowfs implements.
_OVERLAY_DEFAULTS = {
    "redirect_dir": {"off", "nofollow", "follow"},
    "index": {"off"},
    "metacopy": {"off"},
    "nfs_export": {"off"},
    "xino": {"off", "auto", "on"},
    "uuid": {"on", "off", "auto", "null"},
}


@dataclass(frozen=True)
class MountConfig:
    """One mount's validated configuration; paths are exactly as the user gave them."""

    lowerdirs: tuple[str, ...]
    upperdir: str | None = None
    workdir: str | None = None
    read_only: bool = False
    userxattr: bool = False
    volatile: bool = False
    fuse_options: frozenset[str] = frozenset()

    @property
    def writable(self) -> bool:
        return self.upperdir is not None and not self.read_only


def split_escaped(text: str, sep: str, unescape: bool = True) -> list[str]:
    """Split on `sep` except where a backslash escapes it. With `unescape`, backslash escapes are
    resolved in the parts (`\\x` -> `x`); without, they are kept for a later split."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            if unescape:
                cur.append(text[i + 1])
            else:
                cur.append(text[i : i + 2])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def escape(value: str) -> str:
    """A value (a layer path) as it must appear in an -o string: the inverse of the parsing here,
    so `\\`, `,` and `:` survive."""
    return value.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def _unescape(text: str) -> str:
    return split_escaped(text, "\0")[0]


def _bad(msg: str) -> UserError:
    return UserError(msg, EXIT_USAGE)


def parse_options(option_strings: list[str] | tuple[str, ...]) -> MountConfig:
    """Merge every `-o` argument (later ones win, as mount(8) does) into a `MountConfig`."""
    lower: list[str] | None = None
    upper = work = None
    read_only = userxattr = volatile = False
    fuse: set[str] = set()
    for optstring in option_strings:
        # Backslash-escaped commas survive this split; colons are handled per option below.
        for raw in split_escaped(optstring, ",", unescape=False):
            opt = raw
            if not opt:
                continue
            key, eq, value = opt.partition("=")
            if key == "lowerdir":
                if not value:
                    raise _bad("lowerdir= is empty: give at least one lower directory")
                if any(p == "" for p in split_escaped(value, ":", unescape=False)[1:-1]):
                    raise _bad("data-only lower layers (lowerdir=...::...) are not supported")
                lower = split_escaped(value, ":")
                if any(not p for p in lower):
                    raise _bad(f"lowerdir={value!r} has an empty layer path")
            elif key == "lowerdir+":
                raise _bad("lowerdir+= is not supported; use lowerdir=TOP:...:BOTTOM")
            elif key == "upperdir":
                if not value:
                    raise _bad("upperdir= is empty")
                upper = _unescape(value)
            elif key == "workdir":
                if not value:
                    raise _bad("workdir= is empty")
                work = _unescape(value)
            elif key == "ro" and not eq:
                read_only = True
                fuse.add("ro")
            elif key == "userxattr" and not eq:
                userxattr = True
            elif key == "volatile" and not eq:
                volatile = True
            elif key in _OVERLAY_DEFAULTS:
                if value not in _OVERLAY_DEFAULTS[key]:
                    allowed = "|".join(sorted(_OVERLAY_DEFAULTS[key]))
                    raise _bad(f"{key}={value} is not supported by cowfs (allowed: {allowed})")
            elif key in _FUSE_REFUSED:
                raise _bad(
                    f"mount option {key!r} is a libfuse connection option that cowfs cannot pass"
                    " to libfuse; remove it"
                )
            elif key in _IGNORED or key.startswith(("x-", "comment=")):
                continue
            elif key in _FUSE_FLAGS and not eq:
                fuse.add(key)
            elif key in _FUSE_VALUED and eq:
                if not value:
                    raise _bad(f"mount option {key}= needs a value")
                if key in ("max_read", "blksize") and not value.isdigit():
                    raise _bad(f"mount option {key}={value} needs a number")
                fuse.add(f"{key}={value}")
            else:
                raise _bad(f"unknown mount option {opt!r}")
    if lower is None:
        raise _bad("missing lowerdir=: at least one lower directory is required")
    if (upper is None) != (work is None):
        raise _bad("upperdir= and workdir= must be given together")
    if volatile and upper is None:
        raise _bad("volatile needs upperdir= and workdir=")
    return MountConfig(
        lowerdirs=tuple(lower),
        upperdir=upper,
        workdir=work,
        read_only=read_only,
        userxattr=userxattr,
        volatile=volatile,
        fuse_options=frozenset(fuse),
    )
