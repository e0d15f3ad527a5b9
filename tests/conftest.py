"""Shared fixtures. Real-mount tests carry the `fuse` marker: they are skipped when the machine has
no FUSE, unless COWFS_REQUIRE_FUSE=1 (set by .ci/run), which turns that skip into a failure."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from mounting import REQUIRE_FUSE_ENV, fuse_problem  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    problem = fuse_problem()
    if problem is None:
        return
    for item in items:
        if "fuse" in item.keywords:
            if os.environ.get(REQUIRE_FUSE_ENV) == "1":
                item.add_marker(pytest.mark.usefixtures("_fuse_required_but_missing"))
            else:
                item.add_marker(pytest.mark.skip(reason=f"FUSE not available: {problem}"))


@pytest.fixture
def _fuse_required_but_missing() -> None:
    pytest.fail(f"FUSE not available ({fuse_problem()}) and {REQUIRE_FUSE_ENV}=1")


@pytest.fixture
def layers(tmp_path: Path) -> dict[str, Path]:
    """Empty lower0 (top), lower1, upper, work and mnt directories on one filesystem."""
    d = {name: tmp_path / name for name in ("lower0", "lower1", "upper", "work", "mnt")}
    for p in d.values():
        p.mkdir()
    return d
