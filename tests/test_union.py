"""The union rules without any I/O, checked against a direct reference model."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cowfs.ondisk import Kind, classify, opaque_value
from cowfs.union import Observation, Resolution, merge_listing, resolve

kinds = st.sampled_from([Kind.ABSENT, Kind.WHITEOUT, Kind.DIR, Kind.NONDIR])
observation_lists = st.lists(st.tuples(kinds, st.booleans()), max_size=6).map(
    lambda xs: [Observation(i, k, opq and k is Kind.DIR) for i, (k, opq) in enumerate(xs)]
)


def reference(obs: list[Observation]) -> Resolution:
    """Kernel overlayfs's lookup, written out the obvious way."""
    present = [o for o in obs if o.kind is not Kind.ABSENT]
    if not present or present[0].kind is Kind.WHITEOUT:
        return Resolution(Kind.ABSENT)
    first = present[0]
    if first.kind is Kind.NONDIR:
        below = present[1].layer if len(present) > 1 and present[1].kind is Kind.NONDIR else None
        return Resolution(Kind.NONDIR, (first.layer,), below)
    layers = []
    for o in present:
        if o.kind is not Kind.DIR:
            break
        layers.append(o.layer)
        if o.opaque:
            break
    return Resolution(Kind.DIR, tuple(layers))


@given(observation_lists)
def test_resolve_matches_reference(obs: list[Observation]) -> None:
    assert resolve(obs) == reference(obs)


@given(observation_lists)
def test_resolve_reads_no_further_than_needed(obs: list[Observation]) -> None:
    consumed = []

    def gen():
        for o in obs:
            consumed.append(o)
            yield o

    res = resolve(gen())
    if res.kind is Kind.DIR:
        # Nothing below the last merged layer but at most the one entry that ended the merge.
        assert all(o.layer <= res.layers[-1] + 1 or o.kind is Kind.ABSENT for o in consumed) or (
            len(consumed) <= len(obs)
        )
    if res.kind is Kind.ABSENT and consumed and consumed[-1].kind is Kind.WHITEOUT:
        assert consumed[-1] is next(o for o in obs if o.kind is not Kind.ABSENT)


names = st.sampled_from(["a", "b", "c", "d", "e"])
listings = st.lists(
    st.dictionaries(names, st.sampled_from([Kind.WHITEOUT, Kind.DIR, Kind.NONDIR]), max_size=5),
    min_size=1,
    max_size=4,
)


@given(listings)
def test_merge_listing(per_layer: list[dict[str, Kind]]) -> None:
    merged = merge_listing([(i, list(d.items())) for i, d in enumerate(per_layer)])
    for name in {n for d in per_layer for n in d}:
        top = next(i for i, d in enumerate(per_layer) if name in d)
        if per_layer[top][name] is Kind.WHITEOUT:
            assert name not in merged
        else:
            assert merged[name] == top
    assert all(per_layer[layer][n] is not Kind.WHITEOUT for n, layer in merged.items())


def test_classify_whiteouts() -> None:
    import stat

    assert classify(stat.S_IFCHR, 0) is Kind.WHITEOUT
    assert classify(stat.S_IFCHR | 0o700, 0) is Kind.WHITEOUT  # mode bits do not matter
    assert classify(stat.S_IFCHR, 0x0501) is Kind.NONDIR  # a real device
    assert classify(stat.S_IFDIR | 0o755, 0) is Kind.DIR
    assert classify(stat.S_IFREG, 0) is Kind.NONDIR


def test_opaque_values() -> None:
    assert opaque_value([None, b"y"]) == "y"
    assert opaque_value([b"x"]) == "x"
    assert opaque_value([b"n", None]) == ""
    assert opaque_value([]) == ""
