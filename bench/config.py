"""Sizes of one benchmark run (full or --quick). Pure values: nothing here touches the machine.

The full sizes are the issue's (a ~20k-file tree in ~1k directories, 10k small files, a 10k-entry
directory) with the large file at 512 MiB, so that a full run of 5 interleaved repeats stays
within ~15 minutes on a 2-core machine. The quick sizes only have to exercise every code path
(mount, workload, verification, report) in a few seconds per target. The container workloads
use busybox (a ~2 MB image) in both modes; only the number of containers scales.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["FULL", "QUICK", "Sizes"]

MiB = 1 << 20


@dataclass(frozen=True)
class Sizes:
    """Everything that scales. `tree_*` shape the lower tree walked by find/ls -lR; each of its
    leaf directories holds `tree_files` files split across the two lower layers (some names in
    both, so that the top layer shadows the bottom one)."""

    name: str
    reps: int
    big_mib: int  # the large lower file (seqread, randread, copy-up) and the seqwrite file
    tree_top: int  # directories directly under tree/
    tree_sub: int  # leaf directories under each of those
    tree_files: int  # files per leaf directory (merged view)
    small_files: int  # create/delete workload
    small_size: int  # bytes per created file
    deltree_dirs: int  # lower tree removed by rm -rf (whiteouts)
    deltree_files: int  # files per deltree directory (merged view)
    bigdir_entries: int  # the mixed upper/lower directory listed by readdir
    randread_seconds: int  # fio runtime
    untar_subdirs: tuple[str, ...] | None  # stdlib subpackages to tar; None = the whole stdlib
    containers: int  # container_footprint: containers created from one image
    container_write_kib: int  # container_footprint: the file each container writes

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, recorded in results.json so a result says what it measured."""
        return asdict(self)

    @property
    def tree_entries(self) -> int:
        """Entries find sees under tree/ (itself, its directories and files)."""
        leaves = self.tree_top * self.tree_sub
        return 1 + self.tree_top + leaves + leaves * self.tree_files

    @property
    def big_bytes(self) -> int:
        return self.big_mib * MiB


FULL = Sizes(
    name="full",
    reps=5,
    big_mib=512,
    tree_top=32,
    tree_sub=32,
    tree_files=20,
    small_files=10_000,
    small_size=1024,
    deltree_dirs=50,
    deltree_files=100,
    bigdir_entries=10_000,
    randread_seconds=3,
    untar_subdirs=None,
    containers=10,
    container_write_kib=100,
)

QUICK = Sizes(
    name="quick",
    reps=1,
    big_mib=8,
    tree_top=4,
    tree_sub=4,
    tree_files=10,
    small_files=200,
    small_size=1024,
    deltree_dirs=4,
    deltree_files=20,
    bigdir_entries=400,
    randread_seconds=1,
    untar_subdirs=("json", "email"),
    containers=3,
    container_write_kib=100,
)
