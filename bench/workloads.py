"""The workloads: what each one times, how it proves the target gave the right answer, and how the
floor is put back afterwards.

Rules: `run` gets a freshly mounted target (after dropped caches when `cold`), times only the
operation itself inside `ctx.timed()` (which also charges the FUSE daemon's CPU to the workload),
and raises `VerifyError` when a file count, a byte total or a checksum differs from the floor's,
so a broken target cannot look fast. Verification reads happen outside the timed sections (for
warm workloads they are the warm-up). `restore_floor` undoes on the plain directory what `run`
changed; union targets need no undo because each mount gets a fresh upper directory.

The container workloads (bench/containers.py) are the exception: they bring their own storage
(cowctl mounts each container with its storage driver), so the runner calls their
`run_unmounted` instead of mounting the target, and only for the targets named in `applies_to`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from bench.config import MiB, Sizes
from bench.layers import COPYUP_BYTE, Layers, digest_tree, flatten
from bench.targets import daemon_cpu_seconds, daemon_memory_kib, run_cmd

__all__ = ["Ctx", "Metric", "VerifyError", "Workload", "workloads"]


class VerifyError(Exception):
    """The target's result differs from the floor's: the measurement is void."""


@dataclass(frozen=True)
class Metric:
    """One reported number. Speed ratios are value/ref when higher is better, ref/value when not."""

    name: str
    unit: str
    higher_is_better: bool
    label: str  # the metric with its size, for tables
    vs_floor: bool = True  # False when the floor does something else (copy-up: no copy at all)
    speed: bool = True  # False: not a time or throughput (disk bytes): no speed ratios, no chart


@dataclass
class Timer:
    start: float = 0.0
    elapsed: float = 0.0
    laps: list[float] = field(default_factory=list)

    def lap(self) -> None:
        """Time since start, kept for a second metric measured within the same section."""
        self.laps.append(time.perf_counter() - self.start)


@dataclass
class Ctx:
    """What a workload gets: the mounted root, the daemon (FUSE targets), the layers; it collects
    the daemon CPU spent inside timed sections and extra observations (memory)."""

    root: Path
    pid: int | None
    layers: Layers
    target: str
    cpu_s: float = 0.0
    extras: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def timed(self) -> Iterator[Timer]:
        t = Timer()
        cpu0 = daemon_cpu_seconds(self.pid) if self.pid else 0.0
        t.start = time.perf_counter()
        yield t
        t.elapsed = time.perf_counter() - t.start
        if self.pid:
            self.cpu_s += daemon_cpu_seconds(self.pid) - cpu0

    def memory(self, label: str) -> None:
        """Record the daemon's VmRSS/VmHWM now (FUSE targets only)."""
        if self.pid:
            for k, v in daemon_memory_kib(self.pid).items():
                self.extras[f"{label}_{k}_kib"] = v


class Workload:
    """Base: `metrics`, `cold`, the tools needed, `run` and `restore_floor`."""

    name = ""
    description = ""
    cold = False
    needs: tuple[str, ...] = ()
    mounts = True  # False: the runner calls run_unmounted(workdir, target) without mounting
    applies_to: tuple[str, ...] | None = None  # the targets it runs on (None: all of them)
    not_applicable = ""  # why the other targets are left out
    max_reps: int | None = None  # fewer repeats than --reps (a deterministic measurement)

    def __init__(self, sizes: Sizes) -> None:
        self.sizes = sizes

    @property
    def metrics(self) -> tuple[Metric, ...]:
        raise NotImplementedError

    def unavailable(self) -> str | None:
        """Why this workload cannot run here (a missing tool), or None."""
        missing = [t for t in self.needs if shutil.which(t) is None]
        if missing:
            return f"{', '.join(missing)} not installed (scripts/setup.sh --bench installs it)"
        return None

    def run(self, ctx: Ctx) -> dict[str, float]:
        raise NotImplementedError

    def run_unmounted(self, workdir: Path, target: str) -> tuple[dict[str, float], dict[str, Any]]:
        """For `mounts = False`: measure on `target` using workdir (shared by such workloads
        for the whole run); returns the metrics and the extra observations."""
        raise NotImplementedError

    def applies(self, target: str) -> bool:
        return self.applies_to is None or target in self.applies_to

    def restore_floor(self, layers: Layers) -> None:
        """Undo run's changes on the floor (the plain directory); nothing by default."""

    def prewarm(self, layers: Layers) -> None:
        """Bring the inputs into the host cache from the layers and the floor directly, so that
        a non-cold step times the target rather than the disk. Nothing by default: warm
        workloads warm up through the target themselves."""


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise VerifyError(what)


def _read_all(path: Path, digest: bool) -> tuple[int, str]:
    """Read the whole file in 1 MiB reads; digest only when asked (outside timed sections)."""
    buf = bytearray(MiB)
    view = memoryview(buf)
    h = xxhash.xxh3_128() if digest else None
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
            if h is not None:
                h.update(view[:n])
    return total, h.hexdigest() if h is not None else ""


def _verify_big(path: Path, size: int, digest: str) -> None:
    n, d = _read_all(path, digest=True)
    _check(n == size, f"{path.name}: read {n} bytes, expected {size}")
    _check(d == digest, f"{path.name}: checksum differs from the floor's")


def _stat_trees(layers: Layers, sub: str) -> None:
    """lstat every entry of sub in each layer and in the floor (host dentry and inode caches)."""
    for base in [*layers.lowers, layers.seed, layers.flat]:
        for dirpath, dirnames, filenames in os.walk(base / sub):
            for name in dirnames + filenames:
                os.lstat(os.path.join(dirpath, name))


def _run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess[bytes]:
    r = run_cmd(cmd, timeout)
    if r.returncode != 0:
        err = r.stderr.decode(errors="replace").strip().splitlines()
        raise VerifyError(f"{cmd[0]} exited {r.returncode}: {err[0] if err else ''}")
    return r


class SeqRead(Workload):
    needs = ()

    def __init__(self, sizes: Sizes, cold: bool) -> None:
        super().__init__(sizes)
        self.cold = cold
        self.name = "seqread_cold" if cold else "seqread_warm"
        self.description = "read a large lower file sequentially (1 MiB reads) " + (
            "after dropping caches on a fresh mount" if cold else "again, after a first read"
        )

    @property
    def metrics(self) -> tuple[Metric, ...]:
        return (Metric(self.name, "MiB/s", True, f"{self.name} ({self.sizes.big_mib} MiB)"),)

    def run(self, ctx: Ctx) -> dict[str, float]:
        e, path = ctx.layers.expected, ctx.root / "big.bin"
        if not self.cold:
            _verify_big(path, e.big_size, e.big_digest)  # also the warm-up
        with ctx.timed() as t:
            n, _ = _read_all(path, digest=False)
        _check(n == e.big_size, f"timed read got {n} bytes, expected {e.big_size}")
        if self.cold:
            _verify_big(path, e.big_size, e.big_digest)
        return {self.name: n / MiB / t.elapsed}


class RandRead(Workload):
    name = "randread_4k"
    description = "fio: 4 KiB random reads (psync, 1 job) of the large lower file, page cache warm"
    needs = ("fio",)

    @property
    def metrics(self) -> tuple[Metric, ...]:
        return (Metric(self.name, "IOPS", True, f"randread_4k ({self.sizes.randread_seconds} s)"),)

    def run(self, ctx: Ctx) -> dict[str, float]:
        e, path = ctx.layers.expected, ctx.root / "big.bin"
        _verify_big(path, e.big_size, e.big_digest)  # warm-up
        cmd = [
            "fio",
            "--name=randread",
            f"--filename={path}",
            "--rw=randread",
            "--bs=4k",
            "--ioengine=psync",
            "--invalidate=0",
            "--readonly",
            "--time_based",
            "--thread",  # one process: killing it ends the job too
            f"--runtime={self.sizes.randread_seconds}",
            "--output-format=json",
        ]
        with ctx.timed():
            r = _run(cmd, timeout=60 + self.sizes.randread_seconds)
        job = json.loads(r.stdout)["jobs"][0]
        rd = job["read"]
        _check(job["error"] == 0, f"fio job error {job['error']}")
        _check(
            rd["total_ios"] > 0 and rd["io_bytes"] == rd["total_ios"] * 4096,
            f"fio read {rd['io_bytes']} bytes in {rd['total_ios']} ios",
        )
        # fio cannot check data it did not write: compare random blocks with the layer itself.
        rng = random.Random(0)
        with open(path, "rb") as got, open(ctx.layers.lowers[1] / "big.bin", "rb") as want:
            for _ in range(64):
                off = rng.randrange(e.big_size // 4096) * 4096
                got.seek(off)
                want.seek(off)
                _check(got.read(4096) == want.read(4096), f"block at {off} differs")
        return {self.name: float(rd["iops"])}


class CopyUp(Workload):
    name = "copyup"
    description = (
        "first 1-byte append to the large lower file (open O_APPEND + write + close), "
        "source in the host page cache; the floor appends in place"
    )

    @property
    def metrics(self) -> tuple[Metric, ...]:
        label = f"copyup ({self.sizes.big_mib} MiB, 1st write)"
        return (Metric("copyup", "ms", False, label, vs_floor=False),)

    def run(self, ctx: Ctx) -> dict[str, float]:
        e, path = ctx.layers.expected, ctx.root / "big.bin"
        lower = ctx.layers.lowers[1] / "big.bin"
        _read_all(lower, digest=False)  # same host cache state for every target
        with ctx.timed() as t:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                n = os.write(fd, COPYUP_BYTE)
            finally:
                os.close(fd)
        _check(n == 1, f"write returned {n}")
        _verify_big(path, e.big_size + 1, e.big_appended_digest)
        _check(lower.stat().st_size == e.big_size, "the lower file changed")
        return {"copyup": t.elapsed * 1000}

    def restore_floor(self, layers: Layers) -> None:
        os.truncate(layers.flat / "big.bin", layers.expected.big_size)


class SeqWrite(Workload):
    name = "seqwrite"
    description = "write a new file sequentially (1 MiB writes), then fsync and close"

    @property
    def metrics(self) -> tuple[Metric, ...]:
        mib = self.sizes.big_mib
        return (
            Metric("seqwrite", "MiB/s", True, f"seqwrite ({mib} MiB, until the last write)"),
            Metric("seqwrite_fsync", "MiB/s", True, f"seqwrite_fsync ({mib} MiB, incl. fsync)"),
        )

    def run(self, ctx: Ctx) -> dict[str, float]:
        block = random.Random(1).randbytes(MiB)
        n = self.sizes.big_mib
        path = ctx.root / "seqwrite.bin"
        with ctx.timed() as t:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                for _ in range(n):
                    view = memoryview(block)
                    while view:
                        view = view[os.write(fd, view) :]
                t.lap()
                os.fsync(fd)
            finally:
                os.close(fd)
        h = xxhash.xxh3_128()
        for _ in range(n):
            h.update(block)
        _verify_big(path, n * MiB, h.hexdigest())
        return {"seqwrite": n / t.laps[0], "seqwrite_fsync": n / t.elapsed}

    def restore_floor(self, layers: Layers) -> None:
        (layers.flat / "seqwrite.bin").unlink(missing_ok=True)


class Walk(Workload):
    """find + lstat of every entry; the cold variant also samples the daemon's memory."""

    def __init__(self, sizes: Sizes, cold: bool) -> None:
        super().__init__(sizes)
        self.cold = cold
        self.name = "walk_cold" if cold else "walk_warm"
        self.description = "find TREE -printf '%y %s' (lstat of every entry) " + (
            "after dropping caches on a fresh mount" if cold else "again, after a first walk"
        )

    @property
    def metrics(self) -> tuple[Metric, ...]:
        n = self.sizes.tree_entries
        return (Metric(self.name, "entries/s", True, f"{self.name} ({n:,} entries)"),)

    def _walk(self, ctx: Ctx) -> tuple[float, int]:
        e = ctx.layers.expected
        with ctx.timed() as t:
            r = _run(["find", str(ctx.root / "tree"), "-printf", "%y %s\n"])
        files = dirs = fbytes = 0
        for line in r.stdout.splitlines():
            kind, size = line.split()
            if kind == b"f":
                files += 1
                fbytes += int(size)
            elif kind == b"d":
                dirs += 1
        _check(
            (files, dirs) == (e.tree_files, e.tree_dirs),
            f"find saw {files} files and {dirs} dirs, not {e.tree_files} and {e.tree_dirs}",
        )
        _check(fbytes == e.tree_file_bytes, f"file bytes {fbytes} != {e.tree_file_bytes}")
        return t.elapsed, files + dirs

    def run(self, ctx: Ctx) -> dict[str, float]:
        ctx.memory("before")
        if not self.cold:
            self._walk(ctx)
            ctx.cpu_s = 0.0
        elapsed, entries = self._walk(ctx)
        ctx.memory("after")
        ctx.extras["entries"] = entries
        return {self.name: entries / elapsed}


class LsLR(Workload):
    name = "ls_lR"
    description = "ls -lR of the tree on a fresh mount (host caches as left by earlier steps)"

    @property
    def metrics(self) -> tuple[Metric, ...]:
        return (Metric("ls_lR", "s", False, f"ls_lR ({self.sizes.tree_entries:,} entries)"),)

    def prewarm(self, layers: Layers) -> None:
        _stat_trees(layers, "tree")

    def run(self, ctx: Ctx) -> dict[str, float]:
        e = ctx.layers.expected
        with ctx.timed() as t:
            r = _run(["ls", "-lR", "--color=never", str(ctx.root / "tree")])
        lines = r.stdout.splitlines()
        files = sum(1 for x in lines if x.startswith(b"-"))
        dirs = sum(1 for x in lines if x.startswith(b"d"))
        _check(
            (files, dirs) == (e.tree_files, e.tree_dirs - 1),
            f"ls listed {files} files and {dirs} dirs",
        )
        return {"ls_lR": t.elapsed}


class Readdir(Workload):
    def __init__(self, sizes: Sizes, cold: bool) -> None:
        super().__init__(sizes)
        self.cold = cold
        self.name = "readdir_cold" if cold else "readdir_warm"
        self.description = (
            "os.listdir of a directory merging upper, lower and whited-out names "
            + ("after dropping caches on a fresh mount" if cold else "again, after a first listing")
        )

    @property
    def metrics(self) -> tuple[Metric, ...]:
        n = self.sizes.bigdir_entries
        return (Metric(self.name, "entries/s", True, f"{self.name} ({n:,} entries)"),)

    def _list(self, ctx: Ctx) -> tuple[float, int]:
        want = ctx.layers.expected.bigdir_names
        with ctx.timed() as t:
            names = os.listdir(ctx.root / "bigdir")
        _check(
            len(names) == len(want) and set(names) == want,
            f"listed {len(names)} names, {len(set(names) ^ want)} differ from the floor's",
        )
        return t.elapsed, len(names)

    def run(self, ctx: Ctx) -> dict[str, float]:
        if not self.cold:
            self._list(ctx)
            ctx.cpu_s = 0.0
        elapsed, n = self._list(ctx)
        return {self.name: n / elapsed}


class CreateDelete(Workload):
    name = "create_delete"
    description = (
        "create N small files in a new directory (open O_CREAT|O_EXCL, write, close), "
        "then unlink them"
    )

    @property
    def metrics(self) -> tuple[Metric, ...]:
        n, kib = self.sizes.small_files, self.sizes.small_size / 1024
        return (
            Metric("create", "files/s", True, f"create ({n:,} × {kib:g} KiB)"),
            Metric("delete", "files/s", True, f"delete ({n:,} files)"),
        )

    def run(self, ctx: Ctx) -> dict[str, float]:
        n, size = self.sizes.small_files, self.sizes.small_size
        d = ctx.root / "smallfiles"
        d.mkdir()
        paths = [str(d / f"s{i:05d}") for i in range(n)]
        data = [(f"{i:07d}\n" * (size // 8 + 1)).encode()[:size] for i in range(n)]
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        with ctx.timed() as tc:
            for p, b in zip(paths, data, strict=True):
                fd = os.open(p, flags, 0o644)
                try:
                    os.write(fd, b)
                finally:
                    os.close(fd)
        _check(len(os.listdir(d)) == n, "wrong number of files created")
        _check(all(os.stat(p).st_size == size for p in paths), "a created file has the wrong size")
        for i in random.Random(2).sample(range(n), min(n, 32)):
            with open(paths[i], "rb") as f:
                _check(f.read() == data[i], f"{paths[i]}: wrong content")
        with ctx.timed() as td:
            for p in paths:
                os.unlink(p)
            os.rmdir(d)
        _check(not d.exists() and "smallfiles" not in os.listdir(ctx.root), "delete left names")
        return {"create": n / tc.elapsed, "delete": n / td.elapsed}

    def restore_floor(self, layers: Layers) -> None:
        shutil.rmtree(layers.flat / "smallfiles", ignore_errors=True)


class RmLower(Workload):
    name = "rm_lower"
    description = "rm -rf of a tree that lives in the lower layers (whiteouts on union targets)"

    @property
    def metrics(self) -> tuple[Metric, ...]:
        s = self.sizes
        n = s.deltree_dirs * (s.deltree_files + 1) + 1
        return (Metric("rm_lower", "entries/s", True, f"rm_lower ({n:,} entries)"),)

    def prewarm(self, layers: Layers) -> None:
        _stat_trees(layers, "deltree")

    def run(self, ctx: Ctx) -> dict[str, float]:
        e, path = ctx.layers.expected, ctx.root / "deltree"
        with ctx.timed() as t:
            _run(["rm", "-rf", str(path)])
        _check(
            not os.path.lexists(path) and "deltree" not in os.listdir(ctx.root),
            "deltree still visible",
        )
        left = sum(
            len(f) for lower in ctx.layers.lowers for _d, _s, f in os.walk(lower / "deltree")
        )
        s = self.sizes
        bottom_top = 2 * ((s.deltree_files * 3 + 4) // 5) * s.deltree_dirs
        _check(left == bottom_top, "files were removed from a lower layer")
        return {"rm_lower": e.deltree_entries / t.elapsed}

    def restore_floor(self, layers: Layers) -> None:
        flatten([layers.seed, *layers.lowers], layers.flat, "deltree")


class Untar(Workload):
    name = "untar"
    description = (
        "tar -xf of this Python's standard library (a real source tree) into a new directory"
    )

    @property
    def metrics(self) -> tuple[Metric, ...]:
        what = "stdlib" if self.sizes.untar_subdirs is None else "+".join(self.sizes.untar_subdirs)
        return (Metric("untar", "s", False, f"untar ({what})"),)

    def prewarm(self, layers: Layers) -> None:
        _read_all(layers.tarball, digest=False)

    def run(self, ctx: Ctx) -> dict[str, float]:
        e, dst = ctx.layers.expected, ctx.root / "untar"
        dst.mkdir()
        with ctx.timed() as t:
            _run(["tar", "-xf", str(ctx.layers.tarball), "-C", str(dst)])
        digest, files = digest_tree(dst)
        _check(files == e.untar_files, f"{files} files extracted, expected {e.untar_files}")
        _check(digest == e.untar_digest, "extracted tree differs from the tarball")
        return {"untar": t.elapsed}

    def restore_floor(self, layers: Layers) -> None:
        shutil.rmtree(layers.flat / "untar", ignore_errors=True)


def workloads(sizes: Sizes) -> list[Workload]:
    """All workloads in run order (reads before the writes that dirty the page cache; the
    container workloads, which mount nothing of the prepared layers, last)."""
    from bench.containers import container_workloads  # it builds on this module's classes

    return [
        SeqRead(sizes, cold=True),
        SeqRead(sizes, cold=False),
        RandRead(sizes),
        CopyUp(sizes),
        SeqWrite(sizes),
        Walk(sizes, cold=True),
        Walk(sizes, cold=False),
        LsLR(sizes),
        Readdir(sizes, cold=True),
        Readdir(sizes, cold=False),
        CreateDelete(sizes),
        RmLower(sizes),
        Untar(sizes),
        *container_workloads(sizes),
    ]
