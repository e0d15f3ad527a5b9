"""Build overlayfs layer fixtures from a compact spec, and snapshot directory trees.

A *spec* maps paths (relative, "/"-separated) to entries::

    {
        "etc/passwd": "root:x:0:0\\n",               # str or bytes: a regular file, mode 0644
        "bin/sh": F(b"...", mode=0o755),             # a regular file with options
        "var/": D(mode=0o1777),                      # a directory (a trailing "/" is allowed)
        "opq": D(opaque=True),                       # trusted.overlay.opaque=y
        "lnk": L("etc/passwd"),                      # a symlink
        "hard": H("bin/sh"),                         # a hard link to another path of the layer
        "gone": W(),                                 # a kernel whiteout (0/0 character device)
        "pipe": P(),                                 # a FIFO
        "null": C(1, 3),                             # a character device
    }

Missing parent directories are created as ``D()``. Building is deterministic: every entry gets the
same timestamps (``FIXTURE_MTIME_NS``), so two builds of one spec are identical except for inode
numbers and ctimes. Whiteouts, opaque directories and character devices need root.

``snapshot_tree`` records what a mounted (merged) tree shows to users; ``snapshot_layer_raw``
records a layer's raw on-disk state, trusted.overlay.* xattrs and whiteouts included.
``diff_snapshots`` compares two snapshots and lists the differences readably.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "C",
    "D",
    "F",
    "FIXTURE_MTIME_NS",
    "H",
    "L",
    "P",
    "STANDARD_STACK",
    "Stack",
    "TIME_THRESHOLD_NS",
    "W",
    "build_layer",
    "build_stack",
    "build_standard_stack",
    "diff_snapshots",
    "snapshot_layer_raw",
    "snapshot_tree",
]

# Every fixture entry gets this mtime/atime (2017-07-14); explicit times set by tests should also
# be before TIME_THRESHOLD_NS so that snapshot comparisons can tell them from "now".
FIXTURE_MTIME_NS = 1_500_000_000_123_456_789
TIME_THRESHOLD_NS = 1_600_000_000 * 10**9

OPAQUE_XATTR = "trusted.overlay.opaque"


# --------------------------------------------------------------------------------------------
# spec entries


@dataclass(frozen=True)
class F:
    """A regular file."""

    content: bytes | str = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    xattrs: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class D:
    """A directory; ``opaque=True`` sets trusted.overlay.opaque=y."""

    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    opaque: bool = False
    xattrs: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class L:
    """A symbolic link."""

    target: str
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class H:
    """A hard link to another path of the same layer (which must be a non-directory)."""

    target: str


@dataclass(frozen=True)
class W:
    """A kernel overlayfs whiteout: a character device 0/0 with mode 0000."""


@dataclass(frozen=True)
class P:
    """A FIFO."""

    mode: int = 0o644
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class C:
    """A character device."""

    major: int
    minor: int
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


Entry = F | D | L | H | W | P | C | str | bytes | None
Spec = Mapping[str, Entry]


def _norm_entry(key: str, entry: Entry) -> tuple[str, F | D | L | H | W | P | C]:
    rel = key.strip("/")
    if not rel or ".." in rel.split("/") or key.startswith("/"):
        raise ValueError(f"bad spec path {key!r}")
    if entry is None:
        if not key.endswith("/"):
            raise ValueError(f"{key!r}: None is only allowed for directories ('name/')")
        entry = D()
    elif isinstance(entry, str | bytes):
        entry = F(entry)
    if key.endswith("/") and not isinstance(entry, D):
        raise ValueError(f"{key!r} ends with '/' but is not a directory")
    return rel, entry


def build_layer(
    root: str | os.PathLike[str], spec: Spec, *, mtime_ns: int = FIXTURE_MTIME_NS
) -> Path:
    """Create ``root`` (if needed) and populate it from ``spec``. Returns ``Path(root)``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    entries = dict(_norm_entry(k, v) for k, v in spec.items())
    # Implicit parent directories.
    for rel in list(entries):
        parts = rel.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            entries.setdefault(parent, D())
            if not isinstance(entries[parent], D):
                raise ValueError(f"{parent!r} is a parent of {rel!r} but not a directory")

    def depth_key(rel: str) -> tuple[int, str]:
        return (rel.count("/"), rel)

    ordered = sorted(entries, key=depth_key)
    # Pass 1: directories (so their contents can be created), then non-links, then hard links.
    for rel in ordered:
        if isinstance(entries[rel], D):
            os.mkdir(root / rel, 0o700)
    for rel in ordered:
        e = entries[rel]
        p = root / rel
        if isinstance(e, F):
            data = e.content.encode() if isinstance(e.content, str) else e.content
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            for name, value in sorted(e.xattrs.items()):
                os.setxattr(p, name, value)
            os.chown(p, e.uid, e.gid)
            os.chmod(p, e.mode)  # after chown, which clears set-id bits
        elif isinstance(e, L):
            os.symlink(e.target, p)
            os.lchown(p, e.uid, e.gid)
        elif isinstance(e, W):
            os.mknod(p, stat.S_IFCHR | 0o000, os.makedev(0, 0))
            os.chmod(p, 0o000)
        elif isinstance(e, P):
            os.mkfifo(p, 0o600)
            os.chown(p, e.uid, e.gid)
            os.chmod(p, e.mode)
        elif isinstance(e, C):
            os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(e.major, e.minor))
            os.chown(p, e.uid, e.gid)
            os.chmod(p, e.mode)
    for rel in ordered:
        e = entries[rel]
        if isinstance(e, H):
            target = e.target.strip("/")
            if target not in entries or isinstance(entries[target], D | H):
                raise ValueError(f"hard link {rel!r}: target {e.target!r} is not a non-directory")
            os.link(root / target, root / rel)
    # Pass 2: directory attributes, deepest first.
    for rel in reversed(ordered):
        e = entries[rel]
        if isinstance(e, D):
            p = root / rel
            for name, value in sorted(e.xattrs.items()):
                os.setxattr(p, name, value)
            if e.opaque:
                os.setxattr(p, OPAQUE_XATTR, b"y")
            os.chown(p, e.uid, e.gid)
            os.chmod(p, e.mode)
    # Pass 3: timestamps, deepest first, then the root.
    for rel in reversed(ordered):
        os.utime(root / rel, ns=(mtime_ns, mtime_ns), follow_symlinks=False)
    os.utime(root, ns=(mtime_ns, mtime_ns))
    return root


# --------------------------------------------------------------------------------------------
# stacks


@dataclass(frozen=True)
class Stack:
    """Directories of one layer stack, all on the same filesystem. ``lowers`` is top first."""

    base: Path
    lowers: tuple[Path, ...]
    upper: Path
    work: Path
    mnt: Path


def build_stack(
    base: str | os.PathLike[str],
    lowers: Iterable[Spec],
    upper: Spec | None = None,
    *,
    mtime_ns: int = FIXTURE_MTIME_NS,
) -> Stack:
    """Build ``base/lower0`` (top), ``base/lower1``, ..., ``base/upper`` and empty ``base/work``
    and ``base/mnt``."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    lower_paths = []
    for i, spec in enumerate(lowers):
        lower_paths.append(build_layer(base / f"lower{i}", spec, mtime_ns=mtime_ns))
    up = build_layer(base / "upper", upper or {}, mtime_ns=mtime_ns)
    (base / "work").mkdir()
    (base / "mnt").mkdir()
    return Stack(base, tuple(lower_paths), up, base / "work", base / "mnt")


# The standard stack of the differential tests. lower0 is the top lower layer, lower1 the bottom.
# Merged view (what a mount shows), for orientation:
#   shadow        lower0's copy (lower1's is shadowed)        gone       (whited out by lower0)
#   tri           upper's copy (shadows lower0 and lower1)    gonedir    (a lower1 dir, whited out)
#   opq/          lower0 opaque: new0 only (hides lower1's hidden, sub/deep)
#   merged/       upper + lower0 + lower1: fromU, from0, shared(lower0), sub/s0 (from1 whited out)
#   d0/e/f  d1/f1  d1/nested/n1   nested dirs                 hl1 == hl2 (hard links, lower1)
#   link -> d1/f1  sym0 -> shadow  usym -> udir/x              xf, xd/ carry user.foo
#   uopq/         upper opaque: new (hides lower1's old)      uwh        (lower0 file, upper whiteout)
STANDARD_LOWER1: dict[str, Entry] = {
    "shadow": "shadow from lower1\n",
    "gone": "gone (lower1)\n",
    "gonedir/": None,
    "gonedir/inner": "inside a whited-out dir\n",
    "opq/hidden": "hidden by the opaque dir\n",
    "opq/sub/deep": "deep, hidden\n",
    "merged/from1": "merged from lower1\n",
    "merged/shared": "merged shared, lower1\n",
    "d1/": D(mode=0o750, uid=1000, gid=1000),
    "d1/f1": F("d1 f1\n", mode=0o600),
    "d1/nested/n1": "n1\n",
    "hl1": F("hard-linked\n", mode=0o640, xattrs={"user.foo": b"linked"}),
    "hl2": H("hl1"),
    "xf": F("xattr file, lower1\n", xattrs={"user.foo": b"lower1", "user.bar": b"b1"}),
    "link": L("d1/f1"),
    "exe": F("#!/bin/sh\necho hi\n", mode=0o755),
    "fifo": P(mode=0o640),
    "tri": "tri lower1\n",
    "uopq/old": "old, hidden by the upper opaque dir\n",
}
STANDARD_LOWER0: dict[str, Entry] = {
    "shadow": F("shadow from lower0\n", mode=0o640),
    "gone": W(),
    "gonedir": W(),
    "opq/": D(opaque=True),
    "opq/new0": "opq new0\n",
    "merged/from0": "merged from lower0\n",
    "merged/shared": "merged shared, lower0\n",
    "merged/sub/s0": "s0\n",
    "d0/e/f": "deep\n",
    "sym0": L("shadow"),
    "xd/": D(mode=0o775, xattrs={"user.foo": b"dir"}),
    "xd/y": "xd y\n",
    "suid": F(b"\x7fELF-ish\0\1\2", mode=0o4755),
    "owned": F("owned by 1000\n", uid=1000, gid=1000),
    "tri": "tri lower0\n",
    "uwh": "whited out by the upper\n",
    "xf": F("xattr file, lower0\n", xattrs={"user.foo": b"lower0"}),
}
STANDARD_UPPER: dict[str, Entry] = {
    "ufile": "upper only\n",
    "merged/fromU": "merged from upper\n",
    "merged/from1": W(),
    "udir/x": "udir x\n",
    "uwh": W(),
    "uopq/": D(opaque=True),
    "uopq/new": "new in the upper opaque dir\n",
    "usym": L("udir/x"),
    "tri": F("tri upper\n", mode=0o664),
}
STANDARD_STACK = (STANDARD_LOWER0, STANDARD_LOWER1, STANDARD_UPPER)


def build_standard_stack(base: str | os.PathLike[str]) -> Stack:
    """The standard stack of the differential tests (see STANDARD_*), under ``base``."""
    return build_stack(base, [STANDARD_LOWER0, STANDARD_LOWER1], STANDARD_UPPER)


# --------------------------------------------------------------------------------------------
# snapshots

_TYPE_CHARS = {
    stat.S_IFREG: "f",
    stat.S_IFDIR: "d",
    stat.S_IFLNK: "l",
    stat.S_IFCHR: "c",
    stat.S_IFBLK: "b",
    stat.S_IFIFO: "p",
    stat.S_IFSOCK: "s",
}


def _type_char(mode: int) -> str:
    return _TYPE_CHARS.get(stat.S_IFMT(mode), "?")


def _file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            h.update(chunk)
    return h.hexdigest()[:16]


def _xattrs(path: str, prefixes: tuple[str, ...] | None) -> dict[str, bytes] | str:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        return f"listxattr error {e.errno}"
    out: dict[str, bytes] | str = {}
    for name in sorted(names):
        if prefixes is not None and not name.startswith(prefixes):
            continue
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as e:
            out[name] = f"getxattr error {e.errno}".encode()
    return out


def _walk(root: str) -> Iterable[tuple[str, str, os.stat_result]]:
    """Yield (relative path, absolute path, lstat) for root ('.') and everything under it, sorted,
    without following symlinks."""
    st = os.lstat(root)
    yield ".", root, st
    stack = [("", root)]
    while stack:
        rel, path = stack.pop()
        for name in sorted(os.listdir(path), reverse=True):
            r = f"{rel}/{name}" if rel else name
            p = os.path.join(path, name)
            st = os.lstat(p)
            yield r, p, st
            if stat.S_ISDIR(st.st_mode):
                stack.append((r, p))


def _snapshot(root: str | os.PathLike[str], *, raw: bool, ctime: bool) -> dict[str, dict]:
    root = os.fspath(root)
    out: dict[str, dict] = {}
    by_ino: dict[tuple[int, int], list[str]] = {}
    for rel, path, st in sorted(_walk(root)):
        kind = _type_char(st.st_mode)
        rec: dict = {
            "type": kind,
            "mode": stat.S_IMODE(st.st_mode),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "nlink": st.st_nlink,
            "size": None if kind == "d" else st.st_size,
            "mtime_ns": st.st_mtime_ns,
        }
        if kind == "f":
            try:
                rec["sha256"] = _file_hash(path)
            except OSError as e:
                rec["sha256"] = f"read error {e.errno}"
        elif kind == "l":
            rec["target"] = os.readlink(path)
        elif kind in "cb":
            rec["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
        rec["xattrs"] = _xattrs(path, None if raw else ("user.",))
        if raw and ctime:
            rec["ctime_ns"] = st.st_ctime_ns
        if kind != "d":
            by_ino.setdefault((st.st_dev, st.st_ino), []).append(rel)
        out[rel] = rec
    for group in by_ino.values():
        links = tuple(sorted(group))
        for rel in group:
            out[rel]["links"] = links if len(links) > 1 else None
    return out


def snapshot_tree(root: str | os.PathLike[str]) -> dict[str, dict]:
    """What a (mounted) tree shows: for every path ('.' is the root) a record with type
    ('f','d','l','c','b','p','s'), mode (permission bits), uid, gid, nlink, size (None for
    directories, whose sizes are filesystem details), mtime_ns, sha256 (files), target (symlinks),
    rdev (devices, as (major, minor)), user.* xattrs and links: the sorted tuple of all paths that
    share this non-directory's inode, or None when no other path does."""
    return _snapshot(root, raw=False, ctime=False)


def snapshot_layer_raw(root: str | os.PathLike[str], *, ctime: bool = False) -> dict[str, dict]:
    """A layer's raw on-disk state: like snapshot_tree, but with all xattrs (trusted.overlay.*
    included) and, with ``ctime=True``, ctimes (to prove a directory was not written to at all;
    only meaningful when comparing one directory with itself over time). Whiteouts show up as
    type 'c' with rdev (0, 0)."""
    return _snapshot(root, raw=True, ctime=ctime)


def diff_snapshots(
    a: Mapping[str, Mapping],
    b: Mapping[str, Mapping],
    *,
    names: tuple[str, str] = ("a", "b"),
    time_threshold_ns: int | None = TIME_THRESHOLD_NS,
    ignore: Iterable[str] = (),
) -> list[str]:
    """The differences between two snapshots, one readable line each (empty when equal).

    mtimes are compared only when at least one side's is below ``time_threshold_ns`` (times set
    explicitly, or left from the fixture); later times are "now" and differ between runs. With
    ``time_threshold_ns=None`` they are compared always. Keys in ``ignore`` are not compared."""
    na, nb = names
    ignore = set(ignore)
    out = []
    for path in sorted(set(a) | set(b)):
        if path not in b:
            out.append(f"{path}: only in {na}: {_brief(a[path])}")
            continue
        if path not in a:
            out.append(f"{path}: only in {nb}: {_brief(b[path])}")
            continue
        ra, rb = a[path], b[path]
        for key in sorted(set(ra) | set(rb)):
            if key in ignore:
                continue
            va, vb = ra.get(key), rb.get(key)
            if (
                key == "mtime_ns"
                and time_threshold_ns is not None
                and va is not None
                and vb is not None
                and min(va, vb) >= time_threshold_ns
            ):
                continue
            if va != vb:
                out.append(f"{path}: {key}: {na}={_fmt(key, va)} {nb}={_fmt(key, vb)}")
    return out


def _fmt(key: str, v: object) -> str:
    if key == "mode" and isinstance(v, int):
        return oct(v)
    return repr(v)


def _brief(rec: Mapping) -> str:
    s = f"{rec.get('type')} {oct(rec.get('mode', 0))}"
    if rec.get("type") == "l":
        s += f" -> {rec.get('target')!r}"
    elif rec.get("size") is not None:
        s += f" size={rec['size']}"
    return s
