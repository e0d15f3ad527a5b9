"""Summaries and speed ratios: pure functions over numbers, so the report logic is testable
without mounting anything."""

from __future__ import annotations

import statistics

__all__ = ["RATIO_PAIRS", "speed_ratio", "summarize"]

# (target, reference) pairs reported: every target against the floor, then the FUSE targets against
# kernel overlayfs, then cowfs against fuse-overlayfs (the bar).
RATIO_PAIRS: tuple[tuple[str, str], ...] = (
    ("overlay", "floor"),
    ("fuse-overlayfs", "floor"),
    ("cowfs", "floor"),
    ("fuse-overlayfs", "overlay"),
    ("cowfs", "overlay"),
    ("cowfs", "fuse-overlayfs"),
)


def summarize(values: list[float]) -> dict[str, float]:
    """Median and range: the median resists the odd disturbed repeat on a shared machine, the
    range shows how much to trust it."""
    if not values:
        raise ValueError("no values")
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def speed_ratio(value: float, ref: float, higher_is_better: bool) -> float | None:
    """How many times faster than ref (1.0 = as fast, 0.5 = half as fast): value/ref for
    throughputs, ref/value for times. None when either side is not positive."""
    if value <= 0 or ref <= 0:
        return None
    return value / ref if higher_is_better else ref / value
