"""`UnionFS`: the filesystem API (lookup, readdir, open, copy-up, whiteouts ...) without FUSE.

Handlers run as trio tasks on one thread. Everything between two `await`s is atomic with respect to
the other handlers; the only awaits are copy-up of file data and large reads, writes and fsyncs,
which run in worker threads. An inode whose data is being copied up is marked busy, and every
operation that renames, removes or modifies it waits for that first (`_wait_idle`).

Errors are `OSError` with the errno kernel overlayfs gives; the FUSE adapter turns them into
`FUSEError`.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

import trio
import xxhash

from cowfs import _sys, copyup
from cowfs.inodes import FileHandle, Inode, InodeTable, Source
from cowfs.layers import (
    O_PATH_DIR,
    O_PATH_NOFOLLOW,
    LayerStack,
    check_name,
    chmod_nofollow,
    fdpath,
    is_xattr_whiteout,
    purge_dir,
    read_opaque,
)
from cowfs.listing import Hints, Listing
from cowfs.ondisk import OCI_PREFIX, Kind, classify, is_private_xattr, is_whiteout_stat
from cowfs.union import Observation, Resolution, merge_listing, resolve

__all__ = ["Attr", "UnionFS"]

ROOT_INO = 1
BIG_IO = 128 * 1024  # reads/writes above this go to a worker thread
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 8)
BIG_COPY = 1 << 20  # copy-ups of files above this go to a worker thread
_SYNTH_BASE = 1 << 62  # inode numbers not taken from a backing object live above this
_ODIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


@dataclass(eq=False, slots=True)
class Attr:
    """An inode's attributes as the mount shows them. Treat as immutable: a lower object's `Attr`
    is cached in its inode and handed out again."""

    ino: int
    st: os.stat_result
    nlink: int
    reply: object = None  # the adapter's reply built from these attributes, reused with them


# xattr names that may be answered "absent" from an inode's cached name list: the ones the kernel
# asks for on its own (before every write, for every `ls -l`) and the user namespace. Nothing but
# this mount adds such a name to a backing object (other security.* names, e.g. IMA's, may appear
# behind our back and always go to the host).
_FAST_ABSENT_NAMES = frozenset(
    {
        "security.capability",
        "security.selinux",
        "system.posix_acl_access",
        "system.posix_acl_default",
    }
)


@dataclass(slots=True)
class _Seen:
    st: os.stat_result
    fd: int = -1  # an O_PATH fd, opened for directories only
    xwh: bool = False


class UnionFS:
    def __init__(self, stack: LayerStack) -> None:
        self.stack = stack
        self.table = InodeTable()
        self.handles: dict[int, FileHandle] = {}
        self._next_fh = 1
        self._busy: dict[int, trio.Event] = {}
        self._synth = _SYNTH_BASE + (1 << 61)
        self._devs: dict[int, int] = {}
        # (layer, name, file type) -> the errno the host gives for an absent xattr name there.
        self._absent_errno: dict[tuple[int, str, int], int] = {}
        # Inodes whose attributes changed behind the kernel's cache (copy-up): the adapter
        # drains this after each request and tells the kernel.
        self.attr_changed: set[int] = set()
        # readdir's Resolutions of plain files, one per (top layer, layer below): immutable.
        self._nondir_res: dict[tuple[int, int | None], Resolution] = {}
        self.limiter = trio.CapacityLimiter(4)
        # With the kernel's writeback cache on, it may read pages through a write-only handle:
        # such handles get an O_RDWR backing fd (see `_handle_fd`).
        self.writeback = False
        self.sync = not stack.config.volatile
        self.ino_xattr = stack.xattr_prefix + "cowfs.ino"
        self.opaque_xattr = stack.xattr_prefix + "opaque"
        for fd in stack.fds:
            if fd >= 0:
                self._devs.setdefault(os.fstat(fd).st_dev, len(self._devs))
        sources = [
            Source(i, os.open(".", O_PATH_DIR, dir_fd=fd))
            for i, fd in enumerate(stack.fds)
            if fd >= 0
        ]
        for s in sources[1:] if stack.writable else sources:
            s.xwhiteouts = read_opaque(s.fd, True, stack.config.userxattr) == "x"
        # The root merges every layer; an opaque mark on a layer root hides nothing below it here,
        # as in kernel overlayfs.
        st = os.fstat(sources[0].fd)
        root = Inode(
            ROOT_INO,
            True,
            sources[0].fd,
            sources[0].layer,
            ("o", st.st_dev, st.st_ino),
            sources=sources,
            fmt=stat.S_IFDIR,
        )
        root.nlookup = 1
        self.table.add(root)

    # ------------------------------------------------------------------ helpers

    @property
    def writable(self) -> bool:
        return self.stack.writable

    def _need_writable(self) -> None:
        if not self.stack.writable:
            raise OSError(errno.EROFS, "read-only file system")

    # Non-directories hold no fd (the fd budget is small: thousands, not millions of inodes);
    # they are reached as (parent's directory fd in their layer, name). Directories, and
    # non-directories that lost their last name while still in use ("pinned"), hold an fd.

    def _loc(self, inode: Inode) -> tuple[int, bytes]:
        for pino, name in inode.links:
            parent = self.table.inodes.get(pino)
            if parent is not None:
                src = parent.source(inode.layer)
                if src is not None:
                    return src.fd, name
        raise OSError(errno.ESTALE, "the inode has no name left")

    def _stat(self, inode: Inode) -> os.stat_result:
        if inode.fd >= 0:
            return os.fstat(inode.fd)
        dfd, name = self._loc(inode)
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)

    def _opath(self, inode: Inode) -> int:
        """A new O_PATH fd on the backing object; the caller closes it."""
        if inode.fd >= 0:
            return os.dup(inode.fd)
        dfd, name = self._loc(inode)
        return os.open(name, O_PATH_NOFOLLOW, dir_fd=dfd)

    def _reopen(self, inode: Inode, flags: int) -> int:
        if inode.fd >= 0:
            return os.open(fdpath(inode.fd), flags | os.O_CLOEXEC)
        dfd, name = self._loc(inode)
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)

    def _pin(self, inode: Inode | None) -> None:
        """Keep reaching an object whose last known name is about to go (unlink, rename over)."""
        if inode is not None and not inode.is_dir and inode.fd < 0 and len(inode.links) <= 1:
            inode.fd = self._opath(inode)

    def attr(self, inode: Inode) -> Attr:
        lower = inode.layer > 0
        if lower:
            # Lower layers never change: their objects' attributes are taken once. (The lower
            # atime may move on; the kernel caches attributes for an hour anyway.)
            a = inode.attr
            if a is not None and a.ino == inode.ino:  # type: ignore[attr-defined]
                return a  # type: ignore[return-value]
        st = self._stat(inode)
        nlink = st.st_nlink
        if inode.is_dir and len(inode.sources) > 1:
            nlink = 1  # kernel overlayfs: merged directories report 1 ("pacifies find")
        a = Attr(inode.ino, st, nlink)
        if lower:
            inode.attr = a
        return a

    @staticmethod
    def _now_upper(inode: Inode) -> None:
        """The inode's backing object was replaced by its upper copy: drop what was cached."""
        inode.attr = None
        inode.xnames = None

    async def _wait_idle(self, inode: Inode | None) -> None:
        while inode is not None and inode.ino in self._busy:
            await self._busy[inode.ino].wait()

    def _map_ino(self, st_dev: int, st_ino: int) -> int:
        idx = self._devs.get(st_dev)
        if idx is None:
            idx = self._devs[st_dev] = len(self._devs)
        ino = st_ino if idx == 0 else st_ino | (idx << 48)
        if ino <= ROOT_INO or ino >= _SYNTH_BASE:
            return self._new_synth()
        return ino

    def _new_synth(self) -> int:
        self._synth += 1
        return self._synth

    def _xpath(self, inode: Inode) -> tuple[bytes, bool]:
        """A path and follow flag for xattr calls. Following a /proc/self/fd link reaches exactly
        the object behind the fd, even a symlink (checked); otherwise the final name is not
        followed."""
        if inode.fd >= 0:
            return os.fsencode(fdpath(inode.fd)), True
        dfd, name = self._loc(inode)
        return os.fsencode(fdpath(dfd)) + b"/" + name, False

    def _link(self, inode: Inode) -> tuple[Inode, bytes]:
        for pino, name in inode.links:
            parent = self.table.inodes.get(pino)
            if parent is not None:
                return parent, name
        raise OSError(errno.ESTALE, "the inode has no name left")

    # ------------------------------------------------------------------ lookup

    def _observe(
        self, sources: list[Source], name: bytes, seen: dict[int, _Seen]
    ) -> Iterator[Observation]:
        userxattr = self.stack.config.userxattr
        for src in sources:
            layer = src.layer
            try:
                st = os.stat(name, dir_fd=src.fd, follow_symlinks=False)
            except FileNotFoundError:
                if layer and self._oci_whiteout(src.fd, name):
                    yield Observation(layer, Kind.WHITEOUT)
                else:
                    yield Observation(layer, Kind.ABSENT)
                continue
            except NotADirectoryError:
                yield Observation(layer, Kind.ABSENT)
                continue
            if layer and name.startswith(b".wh."):
                yield Observation(layer, Kind.ABSENT)  # OCI markers are never shown
                continue
            kind = classify(st.st_mode, st.st_rdev)
            if (
                kind is Kind.NONDIR
                and layer
                and src.xwhiteouts
                and stat.S_ISREG(st.st_mode)
                and st.st_size == 0
                and is_xattr_whiteout(src.fd, name)
            ):
                kind = Kind.WHITEOUT
            if kind is Kind.DIR:
                fd = os.open(name, O_PATH_DIR | os.O_NOFOLLOW, dir_fd=src.fd)
                opq = read_opaque(fd, layer > 0, userxattr)
                seen[layer] = _Seen(st, fd, opq == "x")
                yield Observation(layer, kind, opq == "y")
            else:
                seen[layer] = _Seen(st)
                yield Observation(layer, kind)

    @staticmethod
    def _oci_whiteout(dir_fd: int, name: bytes) -> bool:
        try:
            os.stat(OCI_PREFIX.encode() + name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            return False
        return True

    def _probe(
        self, parent: Inode, name: bytes, lower_only: bool = False
    ) -> tuple[Resolution, dict[int, _Seen]]:
        check_name(name)
        seen: dict[int, _Seen] = {}
        sources = parent.sources
        if lower_only:
            sources = [s for s in sources if s.layer > 0]
        res = resolve(self._observe(sources, name, seen))
        keep = set(res.layers) if res.kind is Kind.DIR else set()
        for layer, s in seen.items():
            if s.fd >= 0 and layer not in keep:
                os.close(s.fd)
                s.fd = -1
        return res, seen

    def _lower_has(self, parent: Inode, name: bytes) -> Resolution:
        """What the lower layers alone show at `name` (decides whether a whiteout is needed)."""
        res, seen = self._probe(parent, name, lower_only=True)
        for s in seen.values():
            if s.fd >= 0:
                os.close(s.fd)
        return res

    def _intern(self, parent: Inode, name: bytes, res: Resolution, seen: dict[int, _Seen]) -> Inode:
        top = res.top
        st = seen[top].st
        is_dir = res.kind is Kind.DIR
        if not is_dir and top > 0 and st.st_nlink > 1 and self.writable:
            # Lower hard links break on copy-up (kernel default, index=off): one inode per name.
            key: tuple = ("p", parent.ino, name)
        else:
            key = ("o", st.st_dev, st.st_ino)
        inode = self.table.by_key.get(key)
        if inode is not None:
            for layer in res.layers if is_dir else ():
                os.close(seen[layer].fd)
            self.table.add_link(inode, parent.ino, name)
            return inode
        if is_dir:
            sources = [Source(layer, seen[layer].fd, seen[layer].xwh) for layer in res.layers]
            fd = sources[0].fd
        else:
            sources = []
            fd = -1
        if top > 0 and key[0] == "o":
            ino = self._map_ino(st.st_dev, st.st_ino)  # `_ino_for`'s answer for a lower object
        else:
            ino = self._ino_for(res, seen, fd, key, parent, name)
        old = self.table.inodes.get(ino)
        if old is not None:
            if old.links or old.nopen or ino == ROOT_INO:
                ino = self._new_synth()  # a live object already answers to that number
            else:
                # The number belonged to an object that is gone (its backing ino was reused).
                del self.table.inodes[ino]
                self.table.by_key.pop(old.key, None)
                old.ino = self._new_synth()
                self.table.inodes[old.ino] = old
        inode = Inode(ino, is_dir, fd, top, key, sources=sources, fmt=stat.S_IFMT(st.st_mode))
        if top > 0 and not is_dir:
            inode.attr = Attr(ino, st, st.st_nlink)  # what `attr` would stat again
        self.table.add(inode)
        self.table.add_link(inode, parent.ino, name)
        return inode

    def _ino_for(
        self,
        res: Resolution,
        seen: dict[int, _Seen],
        fd: int,
        key: tuple,
        parent: Inode,
        name: bytes,
    ) -> int:
        """Stable inode numbers: the number an object had before copy-up is kept (recorded in a
        private xattr), merged directories report their top lower directory's number (as kernel
        overlayfs does with all layers on one filesystem), other objects their own."""
        top = res.top
        if top == 0:
            try:
                if res.kind is Kind.DIR:
                    v = os.getxattr(fdpath(fd), self.ino_xattr)
                else:
                    src = parent.source(0)
                    v = os.getxattr(
                        os.fsencode(fdpath(src.fd)) + b"/" + name,
                        self.ino_xattr,
                        follow_symlinks=False,
                    )
                return int(v)
            except (OSError, ValueError):
                pass
            if res.kind is Kind.DIR and len(res.layers) > 1:
                st = seen[res.layers[1]].st
                return self._map_ino(st.st_dev, st.st_ino)
        if key[0] == "p":
            st = seen[top].st
            h = xxhash.xxh64_intdigest(b"%d/%d/%s" % (st.st_ino, parent.ino, name))
            return _SYNTH_BASE + (h % (1 << 61))
        st = seen[top].st
        return self._map_ino(st.st_dev, st.st_ino)

    def _lookup_inode(self, parent: Inode, name: bytes) -> Inode | None:
        inode = self.table.cached(parent.ino, name)
        if inode is not None:
            return inode
        res, seen = self._probe(parent, name)
        if res.kind is Kind.ABSENT:
            return None
        return self._intern(parent, name, res, seen)

    def lookup(self, parent_ino: int, name: bytes) -> Attr | None:
        """None means absent: the adapter replies with a cacheable negative entry."""
        parent = self.table.get(parent_ino)
        if name == b".":
            inode = parent
        elif name == b"..":
            inode = self._parent_of(parent)
        else:
            inode = self._lookup_inode(parent, name)
            if inode is None:
                return None
        inode.nlookup += 1
        return self.attr(inode)

    def _parent_of(self, inode: Inode) -> Inode:
        if inode.ino == ROOT_INO:
            return inode
        return self._link(inode)[0]

    def getattr(self, ino: int) -> Attr:
        return self.attr(self.table.get(ino))

    def forget(self, pairs: list[tuple[int, int]]) -> None:
        for ino, n in pairs:
            self.table.forget(ino, n)

    def readlink(self, ino: int) -> bytes:
        inode = self.table.get(ino)
        if inode.fd >= 0:
            return os.fsencode(os.readlink("", dir_fd=inode.fd))
        dfd, name = self._loc(inode)
        return os.readlink(name, dir_fd=dfd)

    # ------------------------------------------------------------------ directories

    def opendir(self, ino: int) -> int:
        """A directory handle is the inode number: listings live in the inode with offsets that
        survive changes (`cowfs.listing`), so a handle needs no state of its own, and readdir
        works the same without OPENDIR (see `fuse_ops.Operations.opendir`)."""
        inode = self.table.get(ino)
        if not inode.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        inode.nopen += 1
        return ino

    def _new_fh(self) -> int:
        self._next_fh += 1
        return self._next_fh

    def _layer_entries(self, src: Source) -> list[tuple[str, Kind]]:
        fd = os.open(".", _ODIR, dir_fd=src.fd)
        out: list[tuple[str, Kind]] = []
        hidden: list[str] = []
        with os.scandir(fd) as it:
            for e in it:
                name = e.name
                if src.layer:
                    if name.startswith(OCI_PREFIX):
                        if name != ".wh..wh..opq":
                            hidden.append(name[len(OCI_PREFIX) :])
                        continue
                    if src.xwhiteouts and e.is_file(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        if st.st_size == 0 and is_xattr_whiteout(src.fd, os.fsencode(name)):
                            out.append((name, Kind.WHITEOUT))
                            continue
                if e.is_dir(follow_symlinks=False):
                    out.append((name, Kind.DIR))
                    continue
                if e.inode() and not e.is_file(follow_symlinks=False) and not e.is_symlink():
                    st = e.stat(follow_symlinks=False)
                    if is_whiteout_stat(st.st_mode, st.st_rdev):
                        out.append((name, Kind.WHITEOUT))
                        continue
                out.append((name, Kind.NONDIR))
        os.close(fd)
        # OCI whiteouts hide only the layers below; they come first so they win over a same-name
        # entry in their own layer, which the OCI spec forbids anyway.
        return [(n, Kind.WHITEOUT) for n in hidden] + out

    def _scan(self, inode: Inode) -> tuple[list[bytes], Hints]:
        """The merged names of a directory, and a lookup hint for each whose top entry is not
        a directory (directories still need their opaque xattrs read: they get no hint)."""
        per_layer = [(s.layer, self._layer_entries(s)) for s in inode.sources]
        merged = merge_listing(per_layer)
        kinds: list[tuple[int, dict[str, Kind]]] = []
        for layer, entries in per_layer:
            first: dict[str, Kind] = {}
            for name, kind in entries:
                first.setdefault(name, kind)  # as merge_listing: the first entry of a name wins
            kinds.append((layer, first))
        index = {layer: i for i, (layer, _first) in enumerate(kinds)}
        hints: Hints = {}
        fsencode = os.fsencode
        for name, top in merged.items():
            i = index[top]
            if kinds[i][1][name] is not Kind.NONDIR:
                continue
            below = None  # as `resolve`: the next layer showing the name, if a non-directory
            for layer, first in kinds[i + 1 :]:
                kind = first.get(name)
                if kind is not None:
                    below = layer if kind is Kind.NONDIR else None
                    break
            hints[fsencode(name)] = (top, below)
        return [fsencode(n) for n in merged], hints

    def _listing(self, inode: Inode) -> Listing:
        """The merged names, read from the layers once and again only after a name in the
        directory changed (only cowfs changes the upper layer; lower layers never change)."""
        listing = inode.listing
        if listing is None:
            listing = inode.listing = Listing(*self._scan(inode))
        elif listing.stale:
            listing.refresh(*self._scan(inode))
        return listing

    def _intern_hinted(
        self, parent: Inode, name: bytes, hint: tuple[int, int | None]
    ) -> Inode | None:
        """`_lookup_inode` for a plain file the directory scan just saw: one stat instead of a
        probe of every layer. None when the entry is not what the scan saw (then probe)."""
        top, below = hint
        src = parent.source(top)
        if src is None:
            return None
        try:
            st = os.stat(name, dir_fd=src.fd, follow_symlinks=False)
        except OSError:
            return None
        if classify(st.st_mode, st.st_rdev) is not Kind.NONDIR:
            return None
        res = self._nondir_res.get(hint)
        if res is None:
            res = self._nondir_res[hint] = Resolution(Kind.NONDIR, (top,), below)
        return self._intern(parent, name, res, {top: _Seen(st)})

    def _names_changed(self, inode: Inode) -> None:
        if inode.listing is not None:
            inode.listing.stale = True

    def readdir_plus(self, ino: int, start: int) -> Iterator[tuple[bytes, Attr, int, Inode | None]]:
        """Yields (name, attrs, next offset, inode) from offset `start`; offsets 0 and 1 are '.'
        and '..' (inode None). The caller adds 1 to an inode's `nlookup` if the kernel accepted
        the entry, and calls `table.maybe_drop` if not."""
        inode = self.table.get(ino)
        if not inode.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        listing = self._listing(inode)
        if start == 0:
            yield b".", self.attr(inode), 1, None
        if start <= 1:
            yield b"..", self.attr(self._parent_of(inode)), 2, None
        attr = self.attr
        cached = self.table.cached
        hints = listing.hints
        for name, nxt in listing.since(start):
            child = cached(ino, name)
            if child is None:
                hint = hints.pop(name, None)
                if hint is not None:
                    child = self._intern_hinted(inode, name, hint)
                if child is None:
                    child = self._lookup_inode(inode, name)
                    if child is None:
                        continue  # removed since the listing was read
            yield name, attr(child), nxt, child

    def releasedir(self, ino: int) -> None:
        inode = self.table.inodes.get(ino)
        if inode is not None:
            inode.nopen -= 1
            self.table.maybe_drop(inode)

    def _merged_empty(self, sources: list[Source]) -> bool:
        return not merge_listing([(s.layer, self._layer_entries(s)) for s in sources])

    # ------------------------------------------------------------------ copy-up

    def _upper_dir(self, inode: Inode) -> int:
        """The upper fd of a directory, copying it (and its parents) up first. No await inside."""
        if inode.layer == 0:
            return inode.fd
        parent, name = self._link(inode)
        pfd = self._upper_dir(parent)
        try:
            # A copy an interrupted earlier attempt installed but never adopted.
            fd = os.open(name, O_PATH_DIR | os.O_NOFOLLOW, dir_fd=pfd)
        except (FileNotFoundError, NotADirectoryError, OSError):
            st = os.fstat(inode.fd)
            copyup.copy_up(
                inode.fd,
                st,
                self.stack.work_fd,
                pfd,
                name,
                sync=self.sync,
                extra_xattrs={self.ino_xattr: b"%d" % inode.ino},
            )
            fd = os.open(name, O_PATH_DIR | os.O_NOFOLLOW, dir_fd=pfd)
        inode.sources.insert(0, Source(0, fd))
        inode.fd, inode.layer = fd, 0
        self._now_upper(inode)
        # Now merged (nlink 1): the kernel holds the lower nlink for an hour unless told.
        self.attr_changed.add(inode.ino)
        ust = os.fstat(fd)
        self.table.rekey(inode, ("o", ust.st_dev, ust.st_ino))
        return fd

    async def _copy_up(self, inode: Inode, with_data: bool = True) -> None:
        """Copy a non-directory up, keeping its inode number; retarget open handles to the copy."""
        await self._wait_idle(inode)
        if inode.layer == 0:
            return
        self._need_writable()
        parent, name = self._link(inode)
        pfd = self._upper_dir(parent)
        src = self._opath(inode)
        try:
            st = os.fstat(src)
            extra = {self.ino_xattr: b"%d" % inode.ino}
            args = (src, st, self.stack.work_fd, pfd, name, with_data, self.sync, extra)
            if stat.S_ISREG(st.st_mode) and with_data and st.st_size > BIG_COPY:
                done = self._busy[inode.ino] = trio.Event()
                try:
                    await trio.to_thread.run_sync(copyup.copy_up, *args, limiter=self.limiter)
                finally:
                    del self._busy[inode.ino]
                    done.set()
            else:
                copyup.copy_up(*args)
        finally:
            os.close(src)
        # The copy now answers for every name this inode had in the parent (kernel default:
        # copy-up breaks lower hard links, so that is exactly one).
        inode.links = {(parent.ino, name)}
        inode.layer = 0
        if parent.listing is not None:
            # The scan's hint points at the lower copy; should the kernel forget this inode
            # before a readdir reaches the name, the name must be probed afresh.
            parent.listing.hints.pop(name, None)
        self._now_upper(inode)
        self.attr_changed.add(inode.ino)  # a lower hard link's copy has nlink 1
        ust = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        self.table.rekey(inode, ("o", ust.st_dev, ust.st_ino))
        for h in inode.handles or ():
            # Readers opened before the copy-up must see the new data from now on.
            new = self._handle_fd(inode, h.flags & ~os.O_TRUNC)
            os.close(h.fd)
            h.fd = new

    # ------------------------------------------------------------------ files

    async def open(self, ino: int, flags: int) -> FileHandle:
        inode = self.table.get(ino)
        acc = flags & os.O_ACCMODE
        if acc != os.O_RDONLY or flags & os.O_TRUNC:
            self._need_writable()
            await self._copy_up(inode, with_data=not flags & os.O_TRUNC)
        return self._open_handle(inode, flags)

    def _handle_fd(self, inode: Inode, flags: int) -> int:
        """The backing fd of an open file (never O_APPEND: the kernel positions every write)."""
        flags &= ~os.O_APPEND
        if self.writeback and flags & os.O_ACCMODE == os.O_WRONLY:
            try:
                return self._reopen(inode, (flags & ~os.O_ACCMODE) | os.O_RDWR)
            except PermissionError:
                pass  # the kernel's page reads through this handle will fail, not the open
        return self._reopen(inode, flags)

    def _open_handle(self, inode: Inode, flags: int, fd: int = -1) -> FileHandle:
        flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND | os.O_DIRECT)
        if fd < 0:
            fd = self._handle_fd(inode, flags)
        h = FileHandle(inode, fd, flags & ~os.O_TRUNC)
        fh = self._new_fh()
        self.handles[fh] = h
        if inode.handles is None:
            inode.handles = set()
        inode.handles.add(h)
        inode.nopen += 1
        h.fh = fh
        return h

    async def read(self, fh: int, off: int, size: int) -> bytes:
        """Data the host has cached is read inline; what would wait for the disk is read in a
        worker thread, so a cold read does not stall the mount and the kernel's concurrent
        readahead requests reach the disk together (preadv2 RWF_NOWAIT tells the two apart)."""
        h = self.handles[fh]
        if size > BIG_IO:
            return await trio.to_thread.run_sync(os.pread, h.fd, size, off, limiter=self.limiter)
        buf = bytearray(size)
        view = memoryview(buf)
        n = 0
        while n < size:
            try:
                got = os.preadv(h.fd, [view[n:]], off + n, _RWF_NOWAIT)
            except BlockingIOError:
                break  # the rest is not in the host's cache
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                return os.pread(h.fd, size, off)  # a host filesystem without RWF_NOWAIT
            if got == 0:
                return bytes(view[:n])  # end of file
            n += got
        if n == size:
            return bytes(buf)
        rest = await trio.to_thread.run_sync(
            os.pread, h.fd, size - n, off + n, limiter=self.limiter
        )
        return bytes(view[:n]) + rest if n else rest

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self.handles[fh]
        if len(buf) > BIG_IO:
            return await trio.to_thread.run_sync(os.pwrite, h.fd, buf, off, limiter=self.limiter)
        return os.pwrite(h.fd, buf, off)

    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self.handles[fh]
        fn = os.fdatasync if datasync else os.fsync
        await trio.to_thread.run_sync(fn, h.fd, limiter=self.limiter)

    def release(self, fh: int) -> None:
        h = self.handles.pop(fh)
        os.close(h.fd)
        if h.inode.handles is not None:
            h.inode.handles.discard(h)
        h.inode.nopen -= 1
        self.table.maybe_drop(h.inode)

    # ------------------------------------------------------------------ attributes

    async def setattr(
        self,
        ino: int,
        *,
        size: int | None = None,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        fh: int | None = None,
    ) -> Attr:
        self._need_writable()
        inode = self.table.get(ino)
        await self._wait_idle(inode)
        if inode.layer != 0:
            if inode.is_dir:
                self._upper_dir(inode)
            else:
                await self._copy_up(inode, with_data=size != 0)
        inode.xnames = None  # chown drops security.capability, chmod rewrites an ACL
        cur = self._stat(inode)
        is_link = stat.S_ISLNK(cur.st_mode)
        if size is not None and size == cur.st_size and self.writeback and mtime_ns is None:
            # truncate(2) to the current size: the kernel's writeback cache keeps mtime (it owns
            # a regular file's times and changes them only when the size changes), and so does
            # the upper file, so that the mount shows the same before and after a remount.
            # (ext4, hence kernel overlayfs, would set mtime to now.)
            size = None
        if size is not None:
            h = self.handles.get(fh) if fh is not None else None
            if h is not None and h.flags & os.O_ACCMODE != os.O_RDONLY:
                os.ftruncate(h.fd, size)
            else:
                tfd = self._reopen(inode, os.O_WRONLY)
                try:
                    os.ftruncate(tfd, size)
                finally:
                    os.close(tfd)
        if uid is not None or gid is not None:
            u = -1 if uid is None else uid
            g = -1 if gid is None else gid
            if inode.fd >= 0:
                os.chown(fdpath(inode.fd), u, g)
            else:
                dfd, name = self._loc(inode)
                os.chown(name, u, g, dir_fd=dfd, follow_symlinks=False)
        if mode is not None and not is_link:
            # Linux has no chmod that refuses symlinks: pin the object, check it, chmod it.
            pfd = self._opath(inode)
            try:
                if not stat.S_ISLNK(os.fstat(pfd).st_mode):
                    os.chmod(fdpath(pfd), stat.S_IMODE(mode))
            finally:
                os.close(pfd)
        if atime_ns is not None or mtime_ns is not None:
            if atime_ns is None or mtime_ns is None:
                cur = self._stat(inode)
                atime_ns = cur.st_atime_ns if atime_ns is None else atime_ns
                mtime_ns = cur.st_mtime_ns if mtime_ns is None else mtime_ns
            if inode.fd >= 0:
                os.utime(fdpath(inode.fd), ns=(atime_ns, mtime_ns))
            else:
                dfd, name = self._loc(inode)
                os.utime(name, ns=(atime_ns, mtime_ns), dir_fd=dfd, follow_symlinks=False)
        return self.attr(inode)

    # ------------------------------------------------------------------ xattrs

    def _xnames(self, inode: Inode) -> frozenset[str] | None:
        """The backing object's xattr names, cached. Valid for "absent" answers until an
        operation that can add a name (setxattr, setattr, copy-up) drops it."""
        names = inode.xnames
        if names is None:
            path, follow = self._xpath(inode)
            try:
                names = frozenset(os.listxattr(path, follow_symlinks=follow))
            except OSError:
                return None
            inode.xnames = names
        return names

    def getxattr(self, ino: int, name: str) -> bytes:
        if is_private_xattr(name):
            raise OSError(errno.ENODATA, "no such attribute")
        inode = self.table.get(ino)
        key = None
        if inode.fmt and (name in _FAST_ABSENT_NAMES or name.startswith("user.")):
            names = self._xnames(inode)
            if names is not None and name not in names:
                key = (inode.layer, name, inode.fmt)
                err = self._absent_errno.get(key)
                if err is not None:
                    raise OSError(err, os.strerror(err))
        path, follow = self._xpath(inode)
        try:
            value = os.getxattr(path, name, follow_symlinks=follow)
        except OSError as e:
            if key is not None and e.errno in (errno.ENODATA, errno.EOPNOTSUPP):
                self._absent_errno[key] = e.errno
            raise
        if key is not None:
            inode.xnames = None  # the name list was out of date after all
        return value

    def listxattr(self, ino: int) -> list[str]:
        inode = self.table.get(ino)
        if inode.layer > 0:
            names = self._xnames(inode)
            if names is not None:
                return [n for n in names if not is_private_xattr(n)]
        path, follow = self._xpath(inode)
        return [n for n in os.listxattr(path, follow_symlinks=follow) if not is_private_xattr(n)]

    async def setxattr(self, ino: int, name: str, value: bytes, flags: int = 0) -> None:
        self._need_writable()
        if is_private_xattr(name):
            raise OSError(
                errno.EPERM if name.startswith("trusted.") else errno.EOPNOTSUPP,
                "overlay-private attribute",
            )
        inode = await self._modifiable(ino)
        path, follow = self._xpath(inode)
        inode.xnames = None
        try:
            os.setxattr(path, name, value, flags, follow_symlinks=follow)
        finally:
            inode.xnames = None

    async def removexattr(self, ino: int, name: str) -> None:
        self._need_writable()
        if is_private_xattr(name):
            raise OSError(errno.ENODATA, "no such attribute")
        inode = self.table.get(ino)
        path, follow = self._xpath(inode)
        os.getxattr(path, name, follow_symlinks=follow)  # ENODATA before any copy-up
        inode = await self._modifiable(ino)
        path, follow = self._xpath(inode)
        inode.xnames = None
        os.removexattr(path, name, follow_symlinks=follow)

    async def _modifiable(self, ino: int) -> Inode:
        inode = self.table.get(ino)
        await self._wait_idle(inode)
        if inode.layer != 0:
            if inode.is_dir:
                self._upper_dir(inode)
            else:
                await self._copy_up(inode)
        return inode

    # ------------------------------------------------------------------ namespace changes

    def _upper_entry(self, pfd: int, name: bytes) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _owner(self, pfd: int, uid: int, gid: int) -> tuple[int, int]:
        pst = os.fstat(pfd)
        if pst.st_mode & stat.S_ISGID:
            gid = pst.st_gid
        return uid, gid

    def _prepare_create(self, parent_ino: int, name: bytes) -> tuple[Inode, int, bool]:
        """Checks for a new name; returns the parent, its upper fd, and whether a whiteout sits
        at the name in the upper layer (then the object is built in work and renamed over it)."""
        self._need_writable()
        parent = self.table.get(parent_ino)
        res, seen = self._probe(parent, name)
        for s in seen.values():
            if s.fd >= 0:
                os.close(s.fd)
        if res.kind is not Kind.ABSENT:
            raise OSError(errno.EEXIST, "file exists")
        pfd = self._upper_dir(parent)
        self._names_changed(parent)
        st = self._upper_entry(pfd, name)
        over_whiteout = st is not None
        if st is not None and not is_whiteout_stat(st.st_mode, st.st_rdev):
            # Hidden by an xattr whiteout or an OCI marker in the upper layer: treat it as one.
            over_whiteout = True
        return parent, pfd, over_whiteout

    def _finish_create(self, parent: Inode, name: bytes) -> Inode:
        inode = self._lookup_inode(parent, name)
        if inode is None:
            raise OSError(errno.EIO, "created entry vanished")
        inode.nlookup += 1
        return inode

    def _place(self, tmp: bytes, pfd: int, name: bytes) -> None:
        """Move a finished object from work over the whiteout at `name`, in one step."""
        work = self.stack.work_fd
        if stat.S_ISDIR(os.stat(tmp, dir_fd=work, follow_symlinks=False).st_mode):
            # rename(2) cannot replace a non-directory with a directory: swap, then drop the
            # whiteout that is now in work.
            _sys.renameat2(work, tmp, pfd, name, _sys.RENAME_EXCHANGE)
            os.unlink(tmp, dir_fd=work)
        else:
            copyup.install(work, tmp, pfd, name, replace=True)

    async def create(
        self, parent_ino: int, name: bytes, mode: int, flags: int, uid: int, gid: int
    ) -> tuple[FileHandle, Attr]:
        parent, pfd, over = self._prepare_create(parent_ino, name)
        uid, gid = self._owner(pfd, uid, gid)
        oflags = (flags & ~(os.O_APPEND | os.O_DIRECT)) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        oflags |= os.O_CLOEXEC
        if self.writeback and oflags & os.O_ACCMODE == os.O_WRONLY:
            oflags = (oflags & ~os.O_ACCMODE) | os.O_RDWR  # a new file: no permission check
        target, dfd = (copyup.temp_name(), self.stack.work_fd) if over else (name, pfd)
        fd = os.open(target, oflags, stat.S_IMODE(mode), dir_fd=dfd)
        try:
            os.fchown(fd, uid, gid)
            if mode & (stat.S_ISUID | stat.S_ISGID):
                os.fchmod(fd, stat.S_IMODE(mode))
            if over:
                self._place(target, pfd, name)
        except BaseException:
            os.close(fd)
            os.unlink(target, dir_fd=dfd)
            raise
        inode = self._finish_create(parent, name)
        h = self._open_handle(inode, flags, fd)
        return h, self.attr(inode)

    def _make(self, parent_ino: int, name: bytes, uid: int, gid: int, build) -> Attr:
        parent, pfd, over = self._prepare_create(parent_ino, name)
        uid, gid = self._owner(pfd, uid, gid)
        target, dfd = (copyup.temp_name(), self.stack.work_fd) if over else (name, pfd)
        build(target, dfd, over)
        try:
            os.chown(target, uid, gid, dir_fd=dfd, follow_symlinks=False)
            if over and os.fstat(pfd).st_mode & stat.S_ISGID:
                # Built in work, which is not setgid: give a new directory what the parent would.
                st = os.stat(target, dir_fd=dfd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    chmod_nofollow(dfd, target, stat.S_IMODE(st.st_mode) | stat.S_ISGID)
            if over:
                self._place(target, pfd, name)
        except BaseException:
            _remove_any(dfd, target)
            raise
        return self.attr(self._finish_create(parent, name))

    def mkdir(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        def build(target: bytes, dfd: int, over: bool) -> None:
            os.mkdir(target, stat.S_IMODE(mode), dir_fd=dfd)
            if over:
                # A directory re-created where a lower one was deleted must hide the old content.
                p = os.fsencode(fdpath(dfd)) + b"/" + target
                os.setxattr(p, self.opaque_xattr, b"y", follow_symlinks=False)
            if mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX):
                # mkdir(2) drops these bits; a setgid parent's S_ISGID is inherited and kept.
                chmod_nofollow(dfd, target, stat.S_IMODE(mode), keep_setgid=True)

        return self._make(parent_ino, name, uid, gid, build)

    def mknod(self, parent_ino: int, name: bytes, mode: int, rdev: int, uid: int, gid: int) -> Attr:
        if stat.S_ISCHR(mode) and rdev == 0:
            raise OSError(errno.EPERM, "0/0 character devices are whiteouts")

        def build(target: bytes, dfd: int, over: bool) -> None:
            os.mknod(target, mode, rdev, dir_fd=dfd)

        return self._make(parent_ino, name, uid, gid, build)

    def symlink(self, parent_ino: int, name: bytes, target: bytes, uid: int, gid: int) -> Attr:
        def build(tname: bytes, dfd: int, over: bool) -> None:
            os.symlink(target, tname, dir_fd=dfd)

        return self._make(parent_ino, name, uid, gid, build)

    async def link(self, ino: int, new_parent_ino: int, new_name: bytes) -> Attr:
        self._need_writable()
        inode = self.table.get(ino)
        if inode.is_dir:
            raise OSError(errno.EPERM, "hard link to a directory")
        parent, pfd, over = self._prepare_create(new_parent_ino, new_name)
        await self._copy_up(inode)
        pfd = self._upper_dir(parent)  # again: the await may have let the parent change
        sdfd, sname = self._loc(inode)
        if over:
            tmp = copyup.temp_name()
            os.link(
                sname, tmp, src_dir_fd=sdfd, dst_dir_fd=self.stack.work_fd, follow_symlinks=False
            )
            try:
                self._place(tmp, pfd, new_name)
            except BaseException:
                os.unlink(tmp, dir_fd=self.stack.work_fd)
                raise
        else:
            os.link(sname, new_name, src_dir_fd=sdfd, dst_dir_fd=pfd, follow_symlinks=False)
        self.table.add_link(inode, parent.ino, new_name)
        return self.attr(self._finish_create(parent, new_name))

    def _whiteout_in_work(self) -> bytes:
        tmp = copyup.temp_name()
        os.mknod(tmp, stat.S_IFCHR, os.makedev(0, 0), dir_fd=self.stack.work_fd)
        return tmp

    def _drop_link(self, parent: Inode, name: bytes, inode: Inode | None) -> None:
        self._names_changed(parent)
        if inode is not None:
            self.table.drop_link(inode, parent.ino, name)

    def _known(self, parent: Inode, name: bytes, res: Resolution, seen: dict[int, _Seen]) -> Inode:
        """The inode behind a resolved name (interned without counting a kernel lookup)."""
        return self._intern(parent, name, res, seen)

    async def unlink(self, parent_ino: int, name: bytes) -> None:
        self._need_writable()
        parent = self.table.get(parent_ino)
        res, seen = self._probe(parent, name)
        if res.kind is Kind.ABSENT:
            raise OSError(errno.ENOENT, "no such file")
        inode = self._known(parent, name, res, seen)
        if res.kind is Kind.DIR:
            self.table.maybe_drop(inode)
            raise OSError(errno.EISDIR, "is a directory")
        await self._wait_idle(inode)
        pfd = self._upper_dir(parent)
        self._pin(inode)
        if inode.layer == 0:
            if self._lower_has(parent, name).kind is not Kind.ABSENT:
                tmp = self._whiteout_in_work()
                self._place(tmp, pfd, name)
            else:
                os.unlink(name, dir_fd=pfd)
        else:
            os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=pfd)
        self._drop_link(parent, name, inode)
        self.table.maybe_drop(inode)

    async def rmdir(self, parent_ino: int, name: bytes) -> None:
        self._need_writable()
        parent = self.table.get(parent_ino)
        res, seen = self._probe(parent, name)
        if res.kind is Kind.ABSENT:
            raise OSError(errno.ENOENT, "no such directory")
        inode = self._known(parent, name, res, seen)
        try:
            if res.kind is not Kind.DIR:
                raise OSError(errno.ENOTDIR, "not a directory")
            if not self._merged_empty(inode.sources):
                raise OSError(errno.ENOTEMPTY, "directory not empty")
            pfd = self._upper_dir(parent)
            need_whiteout = self._lower_has(parent, name).kind is not Kind.ABSENT
            if inode.layer == 0:
                self._remove_upper_dir(pfd, name, need_whiteout)
            else:
                os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=pfd)
            self._drop_link(parent, name, inode)
        finally:
            self.table.maybe_drop(inode)

    def _remove_upper_dir(self, pfd: int, name: bytes, need_whiteout: bool) -> None:
        """Remove an upper directory that holds nothing visible (at most whiteouts), leaving a
        whiteout in one atomic step when a lower layer still has the name."""
        work = self.stack.work_fd
        if need_whiteout:
            tmp = self._whiteout_in_work()
            _sys.renameat2(work, tmp, pfd, name, _sys.RENAME_EXCHANGE)
        else:
            try:
                os.rmdir(name, dir_fd=pfd)
                return
            except OSError as e:
                if e.errno != errno.ENOTEMPTY:
                    raise
            tmp = copyup.temp_name()
            os.rename(name, tmp, src_dir_fd=pfd, dst_dir_fd=work)
        dfd = os.open(tmp, O_PATH_DIR | os.O_NOFOLLOW, dir_fd=work)
        try:
            purge_dir(dfd)
        finally:
            os.close(dfd)
        os.rmdir(tmp, dir_fd=work)

    async def rename(
        self, old_parent_ino: int, old_name: bytes, new_parent_ino: int, new_name: bytes, flags: int
    ) -> None:
        self._need_writable()
        if flags & ~(_sys.RENAME_NOREPLACE | _sys.RENAME_EXCHANGE) or (
            flags & _sys.RENAME_NOREPLACE and flags & _sys.RENAME_EXCHANGE
        ):
            raise OSError(errno.EINVAL, "unsupported rename flags")
        exchange = bool(flags & _sys.RENAME_EXCHANGE)
        old_p = self.table.get(old_parent_ino)
        new_p = self.table.get(new_parent_ino)
        src = dst = None
        try:
            for _attempt in range(3):
                src, dst, sres, dres = self._rename_targets(old_p, old_name, new_p, new_name, flags)
                # Copy-ups may await; afterwards everything is checked again.
                if src.layer != 0 and not src.is_dir:
                    await self._copy_up(src)
                    continue
                if exchange and dst.layer != 0 and not dst.is_dir:
                    await self._copy_up(dst)
                    continue
                if src.ino in self._busy or (dst is not None and dst.ino in self._busy):
                    await self._wait_idle(src)
                    await self._wait_idle(dst)
                    continue
                break
            else:
                raise OSError(errno.EBUSY, "rename kept racing with copy-up")
            # From here to the end: no await.
            self._names_changed(old_p)
            self._names_changed(new_p)
            opfd = self._upper_dir(old_p)
            npfd = self._upper_dir(new_p)
            if src.is_dir and self._lower_has(new_p, new_name).kind is Kind.DIR:
                src.xnames = None
                os.setxattr(fdpath(src.fd), self.opaque_xattr, b"y")
            if exchange:
                if dst.is_dir and self._lower_has(old_p, old_name).kind is Kind.DIR:
                    dst.xnames = None
                    os.setxattr(fdpath(dst.fd), self.opaque_xattr, b"y")
                _sys.renameat2(opfd, old_name, npfd, new_name, _sys.RENAME_EXCHANGE)
                t = self.table
                t.add_link(src, new_p.ino, new_name)
                t.add_link(dst, old_p.ino, old_name)
                if not src.is_dir:
                    t.drop_link(src, old_p.ino, old_name)
                if not dst.is_dir:
                    t.drop_link(dst, new_p.ino, new_name)
                return
            if dst is not None and dst is not src:
                self._pin(dst)
            if dst is not None and dst.is_dir and dst.layer == 0:
                purge_dir(dst.fd)  # merged-empty: only whiteouts are left in it
            need_whiteout = self._lower_has(old_p, old_name).kind is not Kind.ABSENT
            # The merged view was checked above; on the host a whiteout may sit at the target.
            rflags = 0
            target = self._upper_entry(npfd, new_name)
            if src.is_dir and target is not None and not stat.S_ISDIR(target.st_mode):
                # A directory cannot replace the whiteout by rename(2): swap them, and keep the
                # whiteout at the old name only if a lower layer still has that name.
                _sys.renameat2(opfd, old_name, npfd, new_name, _sys.RENAME_EXCHANGE)
                if not need_whiteout:
                    os.unlink(old_name, dir_fd=opfd)
            elif need_whiteout:
                try:
                    _sys.renameat2(opfd, old_name, npfd, new_name, rflags | _sys.RENAME_WHITEOUT)
                except OSError as e:
                    if e.errno not in (errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP):
                        raise
                    # No RENAME_WHITEOUT here: a crash between these two steps shows the lower
                    # entry again at the old name (never loses data).
                    _sys.renameat2(opfd, old_name, npfd, new_name, rflags)
                    os.mknod(old_name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=opfd)
            else:
                _sys.renameat2(opfd, old_name, npfd, new_name, rflags)
            if dst is not None and dst is not src:
                self.table.drop_link(dst, new_p.ino, new_name)
            self.table.add_link(src, new_p.ino, new_name)
            if not src.is_dir:
                self.table.drop_link(src, old_p.ino, old_name)
        finally:
            for inode in (src, dst):
                if inode is not None:
                    self.table.maybe_drop(inode)

    def _rename_targets(
        self, old_p: Inode, old_name: bytes, new_p: Inode, new_name: bytes, flags: int
    ) -> tuple[Inode, Inode | None, Resolution, Resolution]:
        sres, sseen = self._probe(old_p, old_name)
        if sres.kind is Kind.ABSENT:
            raise OSError(errno.ENOENT, "no such file")
        src = self._known(old_p, old_name, sres, sseen)
        dres, dseen = self._probe(new_p, new_name)
        dst = None if dres.kind is Kind.ABSENT else self._known(new_p, new_name, dres, dseen)
        try:
            if src.is_dir and src.sources and (len(src.sources) > 1 or src.layer != 0):
                # Like kernel overlayfs without redirect_dir: callers (mv) fall back to copying.
                raise OSError(errno.EXDEV, "cannot rename a lower or merged directory")
            if flags & _sys.RENAME_EXCHANGE:
                if dst is None:
                    raise OSError(errno.ENOENT, "no such file")
                if dst.is_dir and (len(dst.sources) > 1 or dst.layer != 0):
                    raise OSError(errno.EXDEV, "cannot rename a lower or merged directory")
            elif dst is not None:
                if flags & _sys.RENAME_NOREPLACE:
                    raise OSError(errno.EEXIST, "file exists")
                if dst.is_dir and not src.is_dir:
                    raise OSError(errno.EISDIR, "is a directory")
                if src.is_dir and not dst.is_dir:
                    raise OSError(errno.ENOTDIR, "not a directory")
                if dst.is_dir and not self._merged_empty(dst.sources):
                    raise OSError(errno.ENOTEMPTY, "directory not empty")
        except BaseException:
            self.table.maybe_drop(src)
            if dst is not None:
                self.table.maybe_drop(dst)
            raise
        return src, dst, sres, dres

    # ------------------------------------------------------------------ misc

    def statfs(self) -> os.statvfs_result:
        fd = self.stack.fds[0] if self.writable else self.stack.fds[1]
        return os.statvfs(fdpath(fd))

    def close(self) -> None:
        for h in list(self.handles.values()):
            os.close(h.fd)
        self.handles.clear()
        for inode in list(self.table.inodes.values()):
            inode.close_fds()
        self.table.inodes.clear()
        self.table.by_key.clear()


def _remove_any(dfd: int, name: bytes) -> None:
    try:
        os.unlink(name, dir_fd=dfd)
    except IsADirectoryError:
        os.rmdir(name, dir_fd=dfd)
    except FileNotFoundError:
        pass
