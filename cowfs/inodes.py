"""The inode table: FUSE inode numbers, what each one is backed by, and the kernel's lookup counts.

Rules callers keep:
- `nlookup` moves only where the kernel learns (lookup, create, mkdir, mknod, symlink, link,
  readdirplus entries it accepted) or forgets an inode.
- An inode lives while `nlookup > 0` or `nopen > 0`; it is dropped (and its fds closed) only then.
- A FUSE inode number is derived from the backing object (see `engine._ino_for`), so it is stable
  across copy-up and remount; `by_key` maps the backing identity back to the live inode.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cowfs.listing import Listing

__all__ = ["FileHandle", "Inode", "InodeTable", "Source"]


@dataclass(slots=True)
class Source:
    """One layer's directory behind a merged directory: an O_PATH fd into that layer."""

    layer: int
    fd: int
    xwhiteouts: bool = False  # opaque="x": the dir may hold xattr whiteouts


@dataclass(eq=False, slots=True)
class Inode:
    ino: int
    is_dir: bool
    # Non-directories: an O_PATH fd on the backing object and the layer it lives in.
    # Directories: `sources`, top first; fd/layer mirror sources[0].
    fd: int
    layer: int
    key: tuple
    sources: list[Source] = field(default_factory=list)
    links: set[tuple[int, bytes]] = field(default_factory=set)
    nlookup: int = 0
    nopen: int = 0
    handles: set[FileHandle] | None = None  # open handles, made on the first open (most never are)
    listing: Listing | None = None  # a directory's merged names, refreshed after changes
    # Caches owned by the engine. `attr`: the attributes of a lower object (layers never change;
    # ignored once the object is in the upper layer). `xnames`: the backing object's xattr names,
    # for answering "absent" from memory; dropped by every operation that can add a name.
    attr: object = None
    xnames: frozenset[str] | None = None
    fmt: int = 0  # stat.S_IFMT of the backing object (kept by copy-up); 0 when unknown

    @property
    def in_upper(self) -> bool:
        return self.layer == 0

    def source(self, layer: int) -> Source | None:
        for s in self.sources:
            if s.layer == layer:
                return s
        return None

    def any_link(self) -> tuple[int, bytes] | None:
        return next(iter(self.links), None)

    def close_fds(self) -> None:
        fds = {s.fd for s in self.sources} | {self.fd}
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.sources = []
        self.fd = -1


@dataclass(eq=False, slots=True)
class FileHandle:
    inode: Inode
    fd: int
    flags: int
    fh: int = 0


class InodeTable:
    def __init__(self) -> None:
        self.inodes: dict[int, Inode] = {}
        self.by_key: dict[tuple, Inode] = {}
        # (parent ino, name) -> inode, valid only while that pair is in the inode's links.
        self.dcache: dict[tuple[int, bytes], Inode] = {}

    def cached(self, parent_ino: int, name: bytes) -> Inode | None:
        inode = self.dcache.get((parent_ino, name))
        if inode is not None and (parent_ino, name) in inode.links:
            return inode
        return None

    def add_link(self, inode: Inode, parent_ino: int, name: bytes) -> None:
        if inode.is_dir:
            for old in inode.links:
                self.dcache.pop(old, None)
            inode.links = set()
        inode.links.add((parent_ino, name))
        self.dcache[(parent_ino, name)] = inode

    def drop_link(self, inode: Inode, parent_ino: int, name: bytes) -> None:
        """A name stops meaning this inode; with no name left, its backing identity is retired
        too, so a new object that reuses the host inode number is never mistaken for it."""
        inode.links.discard((parent_ino, name))
        if self.dcache.get((parent_ino, name)) is inode:
            del self.dcache[(parent_ino, name)]
        if not inode.links:
            self.rekey(inode, ("gone", inode.ino))

    def __len__(self) -> int:
        return len(self.inodes)

    def get(self, ino: int) -> Inode:
        try:
            return self.inodes[ino]
        except KeyError:
            import errno

            raise OSError(errno.ESTALE, "stale inode") from None

    def add(self, inode: Inode) -> None:
        self.inodes[inode.ino] = inode
        self.by_key[inode.key] = inode

    def rekey(self, inode: Inode, key: tuple) -> None:
        if self.by_key.get(inode.key) is inode:
            del self.by_key[inode.key]
        inode.key = key
        self.by_key[key] = inode

    def maybe_drop(self, inode: Inode) -> None:
        if inode.nlookup > 0 or inode.nopen > 0 or inode.ino == 1:
            return
        if self.inodes.get(inode.ino) is inode:
            del self.inodes[inode.ino]
        if self.by_key.get(inode.key) is inode:
            del self.by_key[inode.key]
        for link in inode.links:
            if self.dcache.get(link) is inode:
                del self.dcache[link]
        inode.close_fds()

    def forget(self, ino: int, n: int) -> None:
        inode = self.inodes.get(ino)
        if inode is None:
            return
        inode.nlookup = max(0, inode.nlookup - n)
        self.maybe_drop(inode)
