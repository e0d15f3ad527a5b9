"""The union rules, sans I/O: which layer answers a name, and what a merged listing holds.

Layers are numbered top to bottom: index 0 is the upper layer (absent in read-only mounts), 1..N
the lowers in `lowerdir=` order. A lookup sees one `Observation` per layer in which the parent
directory exists (its "sources"), top first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cowfs.ondisk import Kind

__all__ = ["Observation", "Resolution", "merge_listing", "resolve"]


@dataclass(frozen=True, slots=True)
class Observation:
    layer: int
    kind: Kind
    opaque: bool = False  # only meaningful for directories


@dataclass(frozen=True, slots=True)
class Resolution:
    """What a merged name is: `kind` ABSENT when nothing (or a whiteout) answers it.

    `layers` are the layers holding the object, top first: one for a non-directory, and for a
    directory every layer down to (and including) the first opaque one. `below` is the first
    non-directory found under a non-directory's top layer, which kernel overlayfs treats as the
    copy-up origin of an upper file.
    """

    kind: Kind
    layers: tuple[int, ...] = ()
    below: int | None = None

    @property
    def top(self) -> int:
        return self.layers[0]


ABSENT = Resolution(Kind.ABSENT)


def resolve(observations: Iterable[Observation]) -> Resolution:
    """Kernel overlayfs lookup: the first hit wins; directories merge down to an opaque one."""
    it = iter(observations)
    for obs in it:
        if obs.kind is Kind.ABSENT:
            continue
        if obs.kind is Kind.WHITEOUT:
            return ABSENT
        if obs.kind is Kind.NONDIR:
            below = None
            for rest in it:
                if rest.kind is Kind.ABSENT:
                    continue
                if rest.kind is Kind.NONDIR:
                    below = rest.layer
                break
            return Resolution(Kind.NONDIR, (obs.layer,), below)
        layers = [obs.layer]
        if not obs.opaque:
            for rest in it:
                if rest.kind is Kind.ABSENT:
                    continue
                if rest.kind is not Kind.DIR:
                    break  # a whiteout or a file ends the merge
                layers.append(rest.layer)
                if rest.opaque:
                    break
        return Resolution(Kind.DIR, tuple(layers))
    return ABSENT


def merge_listing(per_layer: Sequence[tuple[int, Iterable[tuple[str, Kind]]]]) -> dict[str, int]:
    """Merge the listings of a directory's source layers (top first) into name -> top layer.

    A whiteout hides the name in the layers below it; the first layer to show a name owns it.
    Each layer's listing must already be free of its own private names (OCI markers and the like).
    """
    seen: dict[str, int | None] = {}
    for layer, entries in per_layer:
        for name, kind in entries:
            if name in seen:
                continue
            seen[name] = None if kind is Kind.WHITEOUT else layer
    return {name: layer for name, layer in seen.items() if layer is not None}
