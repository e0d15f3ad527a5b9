"""Readdir offsets that survive changes (`cowfs.listing`), without FUSE: a reader resuming at the
offset it was given sees every name that stayed the whole time exactly once, and no name twice,
however names come and go between its chunks."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from cowfs.listing import FIRST_COOKIE, Listing

names = st.sets(st.sampled_from([b"n%02d" % i for i in range(40)]), max_size=30)


@given(
    first=names,
    steps=st.lists(st.tuples(st.integers(1, 7), names), max_size=12),
)
def test_a_reader_sees_stable_names_once(
    first: set[bytes], steps: list[tuple[int, set[bytes]]]
) -> None:
    listing = Listing(sorted(first))
    current = set(first)
    stayed = set(first)
    got: list[bytes] = []
    offset = 0
    for chunk, now in [*steps, (10**6, None)]:
        batch = []
        for name, nxt in listing.since(offset):
            batch.append(name)
            offset = nxt
            if len(batch) == chunk:
                break
        got += batch
        if now is None or len(batch) < chunk:
            break  # end of directory
        listing.refresh(sorted(now))
        current = set(now)
        stayed &= current
    counts = Counter(got)
    assert all(counts[n] == 1 for n in stayed), "a name present all along was skipped or repeated"
    # A name removed and added again meanwhile is a new entry: it may come again (POSIX).
    assert all(n not in stayed for n, c in counts.items() if c > 1)


def test_survivors_keep_offsets_and_new_names_go_last() -> None:
    listing = Listing([b"a", b"b", b"c"])
    assert list(listing.since(0)) == [(b"a", 3), (b"b", 4), (b"c", 5)]
    listing.refresh([b"c", b"a", b"d"])
    assert list(listing.since(0)) == [(b"a", 3), (b"c", 5), (b"d", 6)]
    assert list(listing.since(4)) == [(b"c", 5), (b"d", 6)]  # b's slot resumes at c
    listing.refresh([b"b"])
    assert list(listing.since(FIRST_COOKIE)) == [(b"b", 7)]  # back, with a new cookie


def test_hints_are_replaced_on_refresh() -> None:
    listing = Listing([b"a"], {b"a": (1, None)})
    assert listing.hints == {b"a": (1, None)}
    listing.stale = True
    listing.refresh([b"a", b"b"], {b"b": (0, 2)})
    assert listing.hints == {b"b": (0, 2)} and not listing.stale
