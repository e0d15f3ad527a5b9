"""Content-addressed storage of image layers, kept in the kernel overlayfs format.

This module owns the directory `layers_root`. A layer is stored at `layers_root/sha256/<hex>/`,
ready to be used as a `lowerdir`, where `sha256:<hex>` is the layer's digest (`digest_tree`).
Layers come from a directory (`import_dir`) or from an OCI layer tarball (`import_tar`, plain,
gzip, bzip2, xz, and zstd when the `zstandard` module is installed). Both go through one builder,
so a directory and a tar of the same content give the same layer and the same digest.

Conversion to the overlay format (what `overlay-format.md` §3 calls the runtimes' mapping):
- an OCI whiteout `.wh.NAME` becomes a whiteout `NAME` (char device 0/0, mode 0000, as the kernel
  writes it); `.wh..wh..opq` becomes `trusted.overlay.opaque=y` on its directory;
- a `.wh.NAME` and a directory `NAME` in the same layer mean "delete the lower NAME, then create a
  new one", so the directory is made opaque; a `.wh.NAME` next to a non-directory `NAME` is dropped
  (whiteouts never hide entries of their own layer, OCI `layer.md`);
- a directory already in the overlay format keeps its whiteouts and opaque directories; the kernel's
  xattr whiteouts and the `user.overlay.` / fuse-overlayfs opaque xattrs are rewritten to the form
  above; other overlay-private xattrs (`trusted.overlay.*` such as origin, impure, the cowfs inode
  xattr) describe another filesystem and are dropped; tool metadata `.wh..wh.*` (and whatever
  is below a `.wh.` directory) and the stray fuse-overlayfs `.wh..opq` are skipped;
- an upper with `overlay.redirect` or `overlay.metacopy` is refused: those entries take their
  content from the lowers they were made over, so alone they would be a silently wrong layer.

Kept: file data, mode (with setuid/setgid/sticky), uid/gid, mtimes (to the nanosecond when the
source has them), symlinks, fifos, hard links inside the layer, and xattrs (PAX `SCHILY.xattr.*` and
`LIBARCHIVE.xattr.*` in tars). Sockets in a source directory are skipped, as tar does.

Rules the importer keeps, and callers may rely on:
1. Nothing outside a private temp dir under `layers_root/tmp` is written while importing: every
   path is resolved one component at a time from a directory fd with `O_NOFOLLOW`, so no symlink in
   the layer, however it points, is ever followed; hard links must name an earlier non-directory of
   the same layer. Absolute names, `..`, device nodes (other than 0/0 whiteouts) are refused with a
   one-line `LayerError`, and the temp dir is removed.
2. Symlinks in a source directory are copied, never followed (only `src` itself is resolved).
3. A layer appears in `sha256/` complete (files and directories fsync'ed, then one `rename`), or not
   at all. Importing content that is already stored removes the temp copy and returns the stored one.
4. `sha256/` and `tmp/` are mode 0700: layers hold setuid binaries and must not be reachable by
   unprivileged users except through a mount.

Callers (the controller) serialise imports and removals of one store with their own lock; two
concurrent imports of the same content are still safe (one rename wins, the other deduplicates).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import lzma
import os
import re
import secrets
import shutil
import stat
import tarfile
import urllib.parse
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import IO

__all__ = [
    "LayerError",
    "LayerInfo",
    "digest_tree",
    "import_dir",
    "import_tar",
    "list_layers",
    "remove_layer",
    "remove_stale_temps",
]

OPAQUE_XATTR = "trusted.overlay.opaque"
_OPAQUE_XATTRS = (OPAQUE_XATTR, "user.overlay.opaque", "user.fuseoverlayfs.opaque")
_WHITEOUT_XATTRS = ("trusted.overlay.whiteout", "user.overlay.whiteout")
_PRIVATE_PREFIXES = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.")
# Redirected dirs and metacopy files take data from the lowers they were made over.
_NEEDS_LOWERS = tuple(
    p + n for p in ("trusted.overlay.", "user.overlay.") for n in ("redirect", "metacopy")
)
_OCI_PREFIX = ".wh."
_OCI_OPAQUE = ".wh..wh..opq"
_OCI_META_PREFIX = ".wh..wh."
_FUSE_OVERLAYFS_STRAY = ".wh..opq"

_DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})")
_HEX_RE = re.compile(r"[0-9a-f]{64}")
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_DIGEST_VERSION = b"cowfs-layer-v1"
_COPY_CHUNK = 1 << 20

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class LayerError(Exception):
    """A layer cannot be imported or removed; the message is one line, fit for the user."""


@dataclass(frozen=True)
class LayerInfo:
    """A stored layer. `size_bytes` is the apparent size of its regular files (each inode once, as
    Docker reports a layer's size); `files` counts its entries other than the root directory,
    whiteouts included."""

    digest: str
    path: Path
    size_bytes: int
    files: int


@dataclass
class _Meta:
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime_ns: int | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Public API


def import_dir(src: Path, layers_root: Path) -> LayerInfo:
    """Store the tree under `src` as a layer (see the module docstring for the conversions).

    `src` itself is resolved like any path; nothing below it is followed. Refused with a
    `LayerError`: a missing source, device nodes other than whiteouts, and a source containing
    the layer store itself (the import would copy its own output)."""
    src = Path(src)
    try:
        src_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise LayerError(f"cannot import {src}: {e.strerror}") from None
    try:
        store = _prepare_store(Path(layers_root))
        avoid = {(s.st_dev, s.st_ino) for s in (os.stat(store), os.stat(store / "tmp"))}
        return _import(lambda b: _feed_dir(src_fd, b, avoid), store, str(src))
    finally:
        os.close(src_fd)


def import_tar(path: Path, layers_root: Path) -> LayerInfo:
    """Store an OCI layer tarball (tar, tar.gz, tar.bz2, tar.xz; tar.zst needs `zstandard`).

    The archive is read as a stream, once, in order: a hard link must follow its target. Refused
    with a `LayerError`: absolute names, `..` components, hard links to anything but an earlier
    non-directory of the archive, device nodes other than 0/0 whiteouts, duplicate non-directory
    entries (OCI forbids them), names going through a symlink or a file of the archive, and
    corrupt or truncated archives."""
    path = Path(path)
    store = _prepare_store(Path(layers_root))
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed in the finally below
    except OSError as e:
        raise LayerError(f"cannot import {path}: {e.strerror}") from None
    try:
        magic = raw.read(4)
        raw.seek(0)
        stream: IO[bytes] = raw
        if magic == _ZSTD_MAGIC:
            stream = _zstd_reader(raw, path)
        try:
            tf = tarfile.open(fileobj=stream, mode="r|*")  # noqa: SIM115 - `with tf` below
        except tarfile.TarError as e:
            raise LayerError(f"{path}: not a tar archive ({e})") from None
        with tf:
            return _import(lambda b: _feed_tar(tf, b, str(path)), store, str(path))
    finally:
        raw.close()


def remove_layer(layers_root: Path, digest: str) -> bool:
    """Remove a stored layer; True if it was there, False if it was already gone (removal is
    idempotent, so an interrupted `rm` can be retried). Only `layers_root/sha256/<hex>` is ever
    touched: the digest must be `sha256:` and 64 lowercase hex digits. The layer is first renamed
    into `tmp/`, so it disappears at once and a crash leaves only a stale temp."""
    m = _DIGEST_RE.fullmatch(digest)
    if m is None:
        raise LayerError(f"invalid layer digest {digest!r}")
    layers_root = Path(layers_root)
    final = layers_root / "sha256" / m.group(1)
    try:
        st = os.lstat(final)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        raise LayerError(f"{final} is not a layer directory")
    tmp_root = layers_root / "tmp"
    tmp_root.mkdir(mode=0o700, exist_ok=True)
    trash = tmp_root / f"rm-{m.group(1)[:12]}-{secrets.token_hex(4)}"
    os.rename(final, trash)
    shutil.rmtree(trash)
    return True


def list_layers(layers_root: Path) -> list[str]:
    """Digests of the stored layers, sorted (for `df` and for finding unreferenced layers)."""
    d = Path(layers_root) / "sha256"
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    return sorted(
        f"sha256:{n}"
        for n in names
        if _HEX_RE.fullmatch(n) and (d / n).is_dir() and not (d / n).is_symlink()
    )


def remove_stale_temps(layers_root: Path) -> int:
    """Remove what interrupted imports and removals left in `layers_root/tmp`; returns how many.
    Call it only while no import or removal of this store is running (under the caller's lock)."""
    d = Path(layers_root) / "tmp"
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return 0
    for n in names:
        p = d / n
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return len(names)


def digest_tree(path: Path) -> str:
    """The digest of a layer directory: `sha256:` + SHA-256 of a canonical serialization.

    Why not Docker's diff id (the SHA-256 of the tar)? Tars of one tree differ with the writer
    (order, header format, time precision); ours must only be stable, and equal for a directory
    and a tar of the same content. So it is computed from the stored tree: a depth-first walk with
    names sorted by bytes; for each entry, a record of netstring fields:
      path (`/`-rooted, bytes), type (`d` dir, `f` file, `l` symlink, `p` fifo, `w` whiteout),
      then for non-whiteouts: mode (permission bits with setuid/setgid/sticky), uid, gid,
      mtime in whole seconds (not for directories), size and SHA-256 (files), target (symlinks),
      the hard-link group (path of the first name of the inode in walk order, for every name of
      an inode with several names), and the sorted xattrs (name, value).
    Left out on purpose: directory mtimes (they record how the tree was assembled: implicit
    parents in tars, whiteout conversion), sub-second mtimes (ustar keeps whole seconds), atimes,
    ctimes, inode numbers, and a whiteout's mode and owner (the kernel ignores them).
    Consequence: two imports that differ only there share one stored layer, the first one's."""
    fd = os.open(path, _O_DIR)
    try:
        return "sha256:" + _digest_fd(fd)[0]
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Import driver


def _prepare_store(layers_root: Path) -> Path:
    layers_root = layers_root.absolute()  # LayerInfo.path is used as a lowerdir: never relative
    layers_root.mkdir(parents=True, exist_ok=True)
    for sub in ("sha256", "tmp"):
        p = layers_root / sub
        p.mkdir(mode=0o700, exist_ok=True)
        if p.is_symlink() or not p.is_dir():
            raise LayerError(f"{p} is not a directory")
    return layers_root


def _import(feed: Callable[[_Builder], None], layers_root: Path, label: str) -> LayerInfo:
    tmp: Path | None = layers_root / "tmp" / f"import-{secrets.token_hex(8)}"
    os.mkdir(tmp, 0o700)
    try:
        root_fd = os.open(tmp, _O_DIR)
        builder = _Builder(root_fd, label)
        try:
            feed(builder)
            builder.finish()
            hexd, size, files = _digest_fd(root_fd)
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as e:
            raise LayerError(f"{label}: corrupt or truncated archive ({e})") from None
        except RecursionError:
            raise LayerError(f"{label}: directory tree too deep to import") from None
        except OSError as e:
            where = f" ({e.filename})" if e.filename else ""
            raise LayerError(f"{label}: {e.strerror or e}{where}") from None
        finally:
            builder.close()
            os.close(root_fd)
        sha_dir = layers_root / "sha256"
        final = sha_dir / hexd
        try:
            os.rename(tmp, final)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            # Already stored (by an earlier import, or by a concurrent one that won the rename).
        else:
            tmp = None
            _fsync_path(sha_dir)
        return LayerInfo(f"sha256:{hexd}", final, size, files)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, _O_DIR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# The builder: the only code that writes into the temp dir


class _Builder:
    """Writes entries into the temp dir, converting OCI whiteouts, enforcing rule 1.

    `kinds` mirrors what was created (path tuple -> d/f/l/p/w), so names are checked against
    the layer itself, never against the host. Directory metadata is applied in `finish`,
    deepest first, because creating children changes a directory's mtime."""

    def __init__(self, root_fd: int, label: str) -> None:
        self.root_fd = root_fd
        self.label = label
        self.kinds: dict[tuple[str, ...], str] = {(): "d"}
        self.explicit: set[tuple[str, ...]] = set()
        self.dir_meta: dict[tuple[str, ...], _Meta] = {(): _Meta()}
        self.opaque: set[tuple[str, ...]] = set()
        self._cached: tuple[tuple[str, ...], int] | None = None

    # -- entry points used by the feeders ---------------------------------------------------

    def add(
        self,
        parts: tuple[str, ...],
        kind: str,
        meta: _Meta,
        *,
        data: Callable[[int], None] | None = None,
        target: str | None = None,
        link: tuple[str, ...] | None = None,
    ) -> None:
        """Add one entry. `kind` is d, f, l, p, w (whiteout) or h (hard link to `link`)."""
        xattrs, is_opaque, is_xwhiteout, refused = _split_xattrs(meta.xattrs)
        if refused is not None:
            raise LayerError(
                f"{self.label}: {_show(parts)} has {refused}, which only means something"
                " over its original lower layers; it cannot become a layer on its own"
            )
        meta.xattrs = xattrs
        if not parts:
            if kind != "d":
                raise LayerError(f"{self.label}: the layer root must be a directory")
            self.dir_meta[()] = meta
            if is_opaque:
                self.opaque.add(())
            return
        name = parts[-1]
        if any(p.startswith(_OCI_PREFIX) for p in parts[:-1]):
            return  # under a whiteout or tool metadata (`.wh..wh.plnk/...`): not image content
        if name == _OCI_OPAQUE:
            self._ensure_dir(parts[:-1])
            self.opaque.add(parts[:-1])
            return
        if name == _FUSE_OVERLAYFS_STRAY or name.startswith(_OCI_META_PREFIX):
            return
        if name.startswith(_OCI_PREFIX):
            real = name[len(_OCI_PREFIX) :]
            if real in ("", ".", ".."):
                raise LayerError(f"{self.label}: invalid whiteout {_show(parts)}")
            self._whiteout(parts[:-1] + (real,))
            return
        if kind == "w" or (kind == "f" and is_xwhiteout):
            self._whiteout(parts)
            return
        self._explicit(parts, kind, meta, data, target, link, is_opaque)

    def finish(self) -> None:
        """Apply directory metadata (and opaque markers), deepest first, and fsync directories."""
        self._drop_cache()
        for parts in sorted(self.dir_meta, key=len, reverse=True):
            meta = self.dir_meta[parts]
            fd = self._open_dir(parts, create=False) if parts else os.dup(self.root_fd)
            try:
                xattrs = dict(meta.xattrs)
                if parts in self.opaque:
                    xattrs[OPAQUE_XATTR] = b"y"
                os.fchown(fd, meta.uid, meta.gid)
                os.fchmod(fd, meta.mode & 0o7777)
                self._set_xattrs(fd, xattrs, parts)
                if meta.mtime_ns is not None:
                    os.utime(fd, ns=(meta.mtime_ns, meta.mtime_ns))
                os.fsync(fd)
            finally:
                os.close(fd)

    def close(self) -> None:
        self._drop_cache()

    # -- internals ---------------------------------------------------------------------------

    def _explicit(
        self,
        parts: tuple[str, ...],
        kind: str,
        meta: _Meta,
        data: Callable[[int], None] | None,
        target: str | None,
        link: tuple[str, ...] | None,
        is_opaque: bool,
    ) -> None:
        existing = self.kinds.get(parts)
        if parts in self.explicit and not (kind == "d" and existing == "d"):
            raise LayerError(f"{self.label}: duplicate entry {_show(parts)}")
        pfd = self._parent(parts)
        name = parts[-1]
        if existing == "w":
            os.unlink(name, dir_fd=pfd)
            del self.kinds[parts]
            if kind == "d":
                self.opaque.add(parts)
        elif existing == "d" and kind != "d":
            raise LayerError(
                f"{self.label}: {_show(parts)} is both a directory and a non-directory"
            )
        self.explicit.add(parts)
        if kind == "d":
            if parts not in self.kinds:
                os.mkdir(name, 0o700, dir_fd=pfd)
                self.kinds[parts] = "d"
            self.dir_meta[parts] = meta
            if is_opaque:
                self.opaque.add(parts)
        elif kind == "f":
            assert data is not None
            fd = os.open(
                name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=pfd,
            )
            try:
                self.kinds[parts] = "f"
                data(fd)
                os.fchown(fd, meta.uid, meta.gid)
                os.fchmod(fd, meta.mode & 0o7777)  # after chown, which clears setuid/setgid
                self._set_xattrs(fd, meta.xattrs, parts)  # after chown: it drops capabilities
                if meta.mtime_ns is not None:
                    os.utime(fd, ns=(meta.mtime_ns, meta.mtime_ns))
                os.fsync(fd)
            finally:
                os.close(fd)
        elif kind in ("l", "p"):
            if kind == "l":
                assert target is not None
                os.symlink(target, name, dir_fd=pfd)
            else:
                os.mkfifo(name, 0o600, dir_fd=pfd)
            self.kinds[parts] = kind
            os.chown(name, meta.uid, meta.gid, dir_fd=pfd, follow_symlinks=False)
            if kind == "p":
                # fchmodat cannot refuse symlinks here, but `kinds` says this name is our fifo.
                os.chmod(name, meta.mode & 0o7777, dir_fd=pfd)
            self._set_xattrs(_proc_path(pfd, name), meta.xattrs, parts)
            if meta.mtime_ns is not None:
                os.utime(name, ns=(meta.mtime_ns, meta.mtime_ns), dir_fd=pfd, follow_symlinks=False)
        elif kind == "h":
            assert link is not None
            tkind = self.kinds.get(link)
            if link not in self.explicit or tkind not in ("f", "l", "p"):
                raise LayerError(
                    f"{self.label}: hard link {_show(parts)} must point to an earlier"
                    f" non-directory of the layer, not {_show(link)}"
                )
            tfd = self._open_dir(link[:-1], create=False) if link[:-1] else os.dup(self.root_fd)
            try:
                os.link(link[-1], name, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
            finally:
                os.close(tfd)
            self.kinds[parts] = tkind
        else:  # pragma: no cover - the feeders only pass the kinds above
            raise AssertionError(kind)

    def _whiteout(self, parts: tuple[str, ...]) -> None:
        existing = self.kinds.get(parts)
        if existing == "d":
            # Deleted and re-created in this layer: the new directory hides the lower one.
            self.opaque.add(parts)
            return
        if existing is not None:
            return  # a whiteout never hides an entry of its own layer
        pfd = self._parent(parts)
        os.mknod(parts[-1], stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=pfd)
        self.kinds[parts] = "w"

    def _ensure_dir(self, parts: tuple[str, ...]) -> None:
        if parts:
            fd = self._open_dir(parts, create=True)
            os.close(fd)

    def _parent(self, parts: tuple[str, ...]) -> int:
        """A cached fd of the parent directory of `parts`, creating implicit parents."""
        parent = parts[:-1]
        if self._cached is not None and self._cached[0] == parent:
            return self._cached[1]
        self._drop_cache()
        fd = self._open_dir(parent, create=True) if parent else os.dup(self.root_fd)
        self._cached = (parent, fd)
        return fd

    def _drop_cache(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    def _open_dir(self, parts: tuple[str, ...], *, create: bool) -> int:
        """Open a directory of the layer one component at a time, never following a symlink.
        With `create`, missing parents are made (0755 root:root, as tar does) and a whiteout of
        this layer in the way becomes an opaque directory."""
        fd = os.dup(self.root_fd)
        try:
            for i, comp in enumerate(parts):
                sub = parts[: i + 1]
                kind = self.kinds.get(sub)
                if kind is None and create:
                    os.mkdir(comp, 0o700, dir_fd=fd)
                    self.kinds[sub] = "d"
                    self.dir_meta[sub] = _Meta()
                elif kind == "w" and create:
                    os.unlink(comp, dir_fd=fd)
                    os.mkdir(comp, 0o700, dir_fd=fd)
                    self.kinds[sub] = "d"
                    self.dir_meta[sub] = _Meta()
                    self.opaque.add(sub)
                elif kind != "d":
                    raise LayerError(
                        f"{self.label}: {_show(parts)} goes through {_show(sub)},"
                        " which is not a directory of the layer"
                    )
                nfd = os.open(comp, _O_DIR, dir_fd=fd)
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _set_xattrs(
        self, target: int | str, xattrs: dict[str, bytes], parts: tuple[str, ...]
    ) -> None:
        for k in sorted(xattrs):
            try:
                os.setxattr(target, k, xattrs[k], follow_symlinks=isinstance(target, int))
            except OSError as e:
                raise LayerError(
                    f"{self.label}: cannot set xattr {k} on {_show(parts)}: {e.strerror}"
                ) from None


def _split_xattrs(xattrs: dict[str, bytes]) -> tuple[dict[str, bytes], bool, bool, str | None]:
    """(xattrs to keep, opaque marker seen, xattr-whiteout marker seen, a refused xattr)."""
    keep: dict[str, bytes] = {}
    opaque = whiteout = False
    refused = None
    for k, v in xattrs.items():
        if k in _NEEDS_LOWERS:
            refused = k
        elif k in _OPAQUE_XATTRS:
            opaque = opaque or v[:1] == b"y"
        elif k in _WHITEOUT_XATTRS:
            whiteout = True
        elif not k.startswith(_PRIVATE_PREFIXES):
            keep[k] = v
    return keep, opaque, whiteout, refused


def _proc_path(dir_fd: int, name: str) -> str:
    """Path for the xattr calls Python only offers by path: the magic link pins the directory,
    and the last component is not followed (`follow_symlinks=False`)."""
    return f"/proc/self/fd/{dir_fd}/{name}"


def _show(parts: tuple[str, ...]) -> str:
    return "/" + "/".join(parts) if parts else "/"


# ---------------------------------------------------------------------------------------------
# Feeding from a directory


def _feed_dir(src_fd: int, b: _Builder, avoid: set[tuple[int, int]]) -> None:
    st = os.fstat(src_fd)
    if (st.st_dev, st.st_ino) in avoid:
        raise LayerError(f"{b.label}: cannot import the layer store itself")
    b.add((), "d", _meta_of(st, _read_xattrs(src_fd)))
    links: dict[tuple[int, int], tuple[str, ...]] = {}
    _walk_src(src_fd, (), b, links, avoid)


def _walk_src(
    dfd: int,
    parts: tuple[str, ...],
    b: _Builder,
    links: dict[tuple[int, int], tuple[str, ...]],
    avoid: set[tuple[int, int]],
) -> None:
    with os.scandir(dfd) as it:
        entries = sorted(it, key=lambda e: os.fsencode(e.name))
    for e in entries:
        name = e.name
        cparts = parts + (name,)
        try:
            st = e.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # removed while we walk
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            if (st.st_dev, st.st_ino) in avoid:
                raise LayerError(f"{b.label}: the source contains the layer store {_show(cparts)}")
            cfd = os.open(name, _O_DIR, dir_fd=dfd)
            try:
                cst = os.fstat(cfd)
                b.add(cparts, "d", _meta_of(cst, _read_xattrs(cfd)))
                if not name.startswith(_OCI_PREFIX):  # the builder drops what is below one
                    _walk_src(cfd, cparts, b, links, avoid)
            finally:
                os.close(cfd)
            continue
        if stat.S_ISSOCK(mode):
            continue
        if stat.S_ISCHR(mode) and st.st_rdev == 0:
            b.add(cparts, "w", _Meta())
            continue
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            raise LayerError(f"{b.label}: device node {_show(cparts)} is not allowed in a layer")
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in links and not name.startswith(_OCI_PREFIX):
            b.add(cparts, "h", _Meta(), link=links[key])
            continue
        if stat.S_ISREG(mode):
            fd = os.open(
                name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd
            )
            try:
                fst = os.fstat(fd)
                if not stat.S_ISREG(fst.st_mode):
                    raise LayerError(f"{b.label}: {_show(cparts)} changed while importing")
                meta = _meta_of(fst, _read_xattrs(fd))
                b.add(cparts, "f", meta, data=lambda out, fd=fd: _copy_fd(fd, out))
            finally:
                os.close(fd)
        elif stat.S_ISLNK(mode):
            target = os.readlink(name, dir_fd=dfd)
            b.add(cparts, "l", _meta_of(st, _read_xattrs(_proc_path(dfd, name))), target=target)
        elif stat.S_ISFIFO(mode):
            b.add(cparts, "p", _meta_of(st, _read_xattrs(_proc_path(dfd, name))))
        else:  # pragma: no cover - no other file types exist on Linux
            raise LayerError(f"{b.label}: unsupported file type at {_show(cparts)}")
        if st.st_nlink > 1 and b.kinds.get(cparts) in ("f", "l", "p"):
            links[key] = cparts


def _meta_of(st: os.stat_result, xattrs: dict[str, bytes]) -> _Meta:
    return _Meta(stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, xattrs)


def _read_xattrs(target: int | str) -> dict[str, bytes]:
    """All xattrs of an fd, or of a path without following its last component."""
    follow = isinstance(target, int)  # fds refuse follow_symlinks=False; they follow nothing
    try:
        names = os.listxattr(target, follow_symlinks=follow)
    except OSError as e:
        if e.errno == errno.ENOTSUP:
            return {}
        raise
    out: dict[str, bytes] = {}
    for n in names:
        try:
            out[n] = os.getxattr(target, n, follow_symlinks=follow)
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise
    return out


def _copy_fd(src: int, dst: int) -> None:
    try:
        while os.copy_file_range(src, dst, _COPY_CHUNK):
            pass
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    os.lseek(src, 0, os.SEEK_SET)
    os.lseek(dst, 0, os.SEEK_SET)
    os.ftruncate(dst, 0)
    while chunk := os.read(src, _COPY_CHUNK):
        _write_all(dst, chunk)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# ---------------------------------------------------------------------------------------------
# Feeding from a tar stream


def _zstd_reader(raw: IO[bytes], path: Path) -> IO[bytes]:
    try:
        import zstandard  # type: ignore[import-not-found]
    except ImportError:
        raise LayerError(
            f"{path}: zstd-compressed layers need the Python module 'zstandard'"
            " (pip install zstandard), or decompress it first with 'zstd -d'"
        ) from None
    return zstandard.ZstdDecompressor().stream_reader(raw)  # type: ignore[no-any-return]


def _tar_parts(name: str, label: str) -> tuple[str, ...]:
    if name.startswith("/"):
        raise LayerError(f"{label}: absolute path {name!r} in archive")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise LayerError(f"{label}: path {name!r} in archive leaves the layer ('..')")
    return parts


def _tar_mtime_ns(m: tarfile.TarInfo) -> int:
    text = m.pax_headers.get("mtime")
    if text is not None:
        try:
            return int(Decimal(text) * 1_000_000_000)
        except InvalidOperation:
            pass
    return int(m.mtime) * 1_000_000_000


def _tar_xattrs(m: tarfile.TarInfo) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for k, v in m.pax_headers.items():
        if k.startswith("SCHILY.xattr."):
            out[k[len("SCHILY.xattr.") :]] = v.encode("utf-8", "surrogateescape")
        elif k.startswith("LIBARCHIVE.xattr."):
            key = urllib.parse.unquote(k[len("LIBARCHIVE.xattr.") :], errors="surrogateescape")
            out[key] = base64.b64decode(v + "=" * (-len(v) % 4))
    return out


def _feed_tar(tf: tarfile.TarFile, b: _Builder, label: str) -> None:
    for m in tf:
        parts = _tar_parts(m.name, label)
        meta = _Meta(stat.S_IMODE(m.mode), m.uid, m.gid, _tar_mtime_ns(m), _tar_xattrs(m))
        if m.isdir():
            b.add(parts, "d", meta)
        elif m.isreg():
            src = tf.extractfile(m)
            assert src is not None
            b.add(parts, "f", meta, data=lambda out, src=src: _copy_stream(src, out))
        elif m.issym():
            b.add(parts, "l", meta, target=m.linkname)
        elif m.islnk():
            b.add(parts, "h", meta, link=_tar_parts(m.linkname, label))
        elif m.isfifo():
            b.add(parts, "p", meta)
        elif m.ischr() and m.devmajor == 0 and m.devminor == 0:
            b.add(parts, "w", meta)
        elif m.ischr() or m.isblk():
            raise LayerError(f"{label}: device node {_show(parts)} is not allowed in a layer")
        else:  # pragma: no cover - tarfile maps unknown types to regular files
            raise LayerError(f"{label}: unsupported tar entry type at {_show(parts)}")


def _copy_stream(src: IO[bytes], dst: int) -> None:
    while chunk := src.read(_COPY_CHUNK):
        _write_all(dst, chunk)


# ---------------------------------------------------------------------------------------------
# The digest


def _ns(b: bytes) -> bytes:
    return b"%d:%s," % (len(b), b)


def _digest_fd(root_fd: int) -> tuple[str, int, int]:
    """(hex digest, apparent bytes of regular files, entries except the root)."""
    h = hashlib.sha256(_ns(_DIGEST_VERSION))
    groups: dict[tuple[int, int], bytes] = {}
    counted: set[tuple[int, int]] = set()
    total = [0, 0]

    def record(fields: list[bytes]) -> None:
        h.update(_ns(b"".join(_ns(f) for f in fields)))

    def common(path: bytes, kind: bytes, st: os.stat_result) -> list[bytes]:
        return [path, kind, b"%o" % stat.S_IMODE(st.st_mode), b"%d" % st.st_uid, b"%d" % st.st_gid]

    def xattr_field(xattrs: dict[str, bytes]) -> bytes:
        items = sorted((k.encode("utf-8", "surrogateescape"), v) for k, v in xattrs.items())
        return b"".join(_ns(k) + _ns(v) for k, v in items)

    def walk(dfd: int, path: bytes) -> None:
        with os.scandir(dfd) as it:
            entries = sorted(it, key=lambda e: os.fsencode(e.name))
        for e in entries:
            name = e.name
            cpath = path + b"/" + os.fsencode(name)
            st = e.stat(follow_symlinks=False)
            total[1] += 1
            mode = st.st_mode
            if stat.S_ISCHR(mode) and st.st_rdev == 0:
                record([cpath, b"w"])
                continue
            if stat.S_ISDIR(mode):
                cfd = os.open(name, _O_DIR, dir_fd=dfd)
                try:
                    xattrs = _read_xattrs(cfd)
                    record([*common(cpath, b"d", st), xattr_field(xattrs)])
                    walk(cfd, cpath)
                finally:
                    os.close(cfd)
                continue
            key = (st.st_dev, st.st_ino)
            group = b""
            if st.st_nlink > 1:
                group = groups.setdefault(key, cpath)
            mtime = b"%d" % (st.st_mtime_ns // 1_000_000_000)
            if stat.S_ISREG(mode):
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                with open(fd, "rb") as f:
                    content = hashlib.file_digest(f, "sha256").hexdigest().encode()
                    xattrs = _read_xattrs(f.fileno())
                if key not in counted:
                    counted.add(key)
                    total[0] += st.st_size
                extra = [b"f", mtime, b"%d" % st.st_size, content]
            elif stat.S_ISLNK(mode):
                xattrs = _read_xattrs(_proc_path(dfd, name))
                extra = [b"l", mtime, os.fsencode(os.readlink(name, dir_fd=dfd))]
            elif stat.S_ISFIFO(mode):
                xattrs = _read_xattrs(_proc_path(dfd, name))
                extra = [b"p", mtime]
            else:
                raise LayerError(
                    f"unexpected file type in layer at {cpath.decode(errors='replace')}"
                )
            fields = common(cpath, extra[0], st)
            record([*fields, *extra[1:], group, xattr_field(xattrs)])

    st = os.fstat(root_fd)
    xattrs = _read_xattrs(root_fd)
    record([*common(b"/", b"d", st), xattr_field(xattrs)])
    walk(root_fd, b"")
    return h.hexdigest(), total[0], total[1]
