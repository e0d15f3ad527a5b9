"""A merged directory's names with readdir offsets that survive changes to the directory.

The kernel reads a directory in chunks, each READDIRPLUS resuming at the offset the previous one
ended on, and it keeps its own cache of the listing keyed by those offsets. Without OPENDIR
(cowfs answers it with ENOSYS, so the kernel caches listings) there is no per-open snapshot to
index into: offsets must stay meaningful while names come and go under a reader that is halfway
through. So every name gets a cookie when it first appears, cookies only grow, and an offset
means "the first name whose cookie is at least this". A name present for the whole of a read is
returned exactly once; one added or removed meanwhile may or may not be (as POSIX allows).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator

__all__ = ["FIRST_COOKIE", "Listing"]

# Offsets 0 and 1 belong to "." and ".."; names start at 2.
FIRST_COOKIE = 2


# name -> (top layer, the first non-directory below it or None): what a lookup would resolve for
# a name whose top entry is a non-directory, read off the layer scan that built the listing.
Hints = dict[bytes, tuple[int, int | None]]


class Listing:
    """`hints` saves readdir the per-layer probe of each plain file it reports: one stat of the
    top entry instead of one per layer (plus one per OCI whiteout name). Each hint is used once;
    later lookups of the name hit the inode table."""

    __slots__ = ("cookies", "hints", "names", "next_cookie", "stale")

    def __init__(self, names: Iterable[bytes], hints: Hints | None = None) -> None:
        self.names: list[bytes] = list(names)
        self.cookies: list[int] = list(range(FIRST_COOKIE, FIRST_COOKIE + len(self.names)))
        self.next_cookie = FIRST_COOKIE + len(self.names)
        self.stale = False
        self.hints: Hints = hints if hints is not None else {}

    def refresh(self, names: Iterable[bytes], hints: Hints | None = None) -> None:
        """Adopt the directory's current names: survivors keep their cookies and order, new
        names go to the end with new cookies."""
        self.hints = hints if hints is not None else {}
        current = set(names)
        kept_names: list[bytes] = []
        kept_cookies: list[int] = []
        for cookie, name in zip(self.cookies, self.names, strict=True):
            if name in current:
                kept_names.append(name)
                kept_cookies.append(cookie)
                current.discard(name)
        # The order of brand-new names is free; sorted makes it reproducible.
        for name in sorted(current):
            kept_names.append(name)
            kept_cookies.append(self.next_cookie)
            self.next_cookie += 1
        self.names, self.cookies = kept_names, kept_cookies
        self.stale = False

    def since(self, offset: int) -> Iterator[tuple[bytes, int]]:
        """(name, offset of the next entry) for every name at or after `offset`."""
        names, cookies = self.names, self.cookies
        for i in range(bisect_left(cookies, max(offset, FIRST_COOKIE)), len(names)):
            yield names[i], cookies[i] + 1
