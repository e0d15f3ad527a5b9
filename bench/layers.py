"""The prepared layers every target mounts, their flattened copy (the floor), and the values each
workload's verification expects.

Built once per run in the scratch directory, so every target sees exactly the same bytes:

    layers/lower0      top lower layer
    layers/lower1      bottom lower layer
    layers/upper-seed  copied into a fresh upper directory before every union mount (new entries
                       and overlay-format whiteouts in bigdir/, so readdir merges all three)
    flat/              the merged view materialised as a plain directory: the floor target
    stdlib.tar         a real source tree (this Python's standard library) for the untar workload

Rules: the layers are never written after `prepare` returns (union targets write only to their own
upper directory; the floor's mutations are undone by each workload's `restore_floor`). Expected
values come from walking `flat/`, so the floor is the reference and every other target must agree
with it. Opaque directories are not generated, so `flatten` does not handle them.
"""

from __future__ import annotations

import os
import shutil
import stat
import sysconfig
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import xxhash

from bench.config import MiB, Sizes

__all__ = ["Expected", "Layers", "digest_tree", "flatten", "prepare", "split_range"]

TOP, BOTTOM, SEED = "lower0", "lower1", "upper-seed"


@dataclass(frozen=True)
class Expected:
    """What a correct target shows, computed from the floor at prepare time."""

    big_size: int
    big_digest: str  # xxh3_128 of big.bin
    big_appended_digest: str  # ... after the copy-up workload appends COPYUP_BYTE
    tree_files: int
    tree_dirs: int  # including tree/ itself
    tree_file_bytes: int  # sum of regular file sizes (directory sizes differ between targets)
    deltree_entries: int  # files and directories under deltree/, itself included
    bigdir_names: frozenset[str]
    untar_digest: str  # digest_tree() of the tarball's contents
    untar_files: int


@dataclass(frozen=True)
class Layers:
    """Paths of one run's prepared layers."""

    root: Path
    sizes: Sizes
    expected: Expected

    @property
    def lowers(self) -> list[Path]:
        """Top first, as lowerdir= takes them."""
        return [self.root / "layers" / TOP, self.root / "layers" / BOTTOM]

    @property
    def seed(self) -> Path:
        return self.root / "layers" / SEED

    @property
    def flat(self) -> Path:
        return self.root / "flat"

    @property
    def tarball(self) -> Path:
        return self.root / "stdlib.tar"


COPYUP_BYTE = b"\x5a"


def split_range(n: int) -> tuple[range, range]:
    """Bottom and top layer shares of n names: 60 % each, so the middle fifth exists in both and
    the top copy shadows the bottom one."""
    b = (n * 3 + 4) // 5
    return range(0, b), range(n - b, n)


def _content(rel: str, layer: int) -> bytes:
    """Small file bytes; the length depends on the layer, so a target that shows the shadowed
    copy changes the byte total that verification checks."""
    reps = 1 + (zlib.crc32(rel.encode()) + 7 * layer) % 24
    return f"{layer}:{rel}\n".encode() * reps


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _make_big(path: Path, size: int) -> tuple[str, str]:
    """Random (incompressible, no holes) data; returns the digests before and after the copy-up
    workload's appended byte."""
    h = xxhash.xxh3_128()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(MiB, left))
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
    before = h.hexdigest()
    h.update(COPYUP_BYTE)
    return before, h.hexdigest()


def _make_tree(lowers: list[Path], name: str, dirs: list[str], files: int, prefix: str) -> None:
    bottom, top = split_range(files)
    for layer, (base, share) in enumerate([(lowers[0], top), (lowers[1], bottom)]):
        for d in dirs:
            (base / name / d).mkdir(parents=True, exist_ok=True)
            for i in share:
                rel = f"{name}/{d}/{prefix}{i:03d}"
                _write(base / rel, _content(rel, layer))


def _make_bigdir(lowers: list[Path], seed: Path, n: int) -> None:
    """n visible entries: half from the bottom layer, some shadowed by the top layer, 30 % new in
    the upper, and 5 % of the bottom names hidden by upper whiteouts (char 0/0)."""
    new, wh = (3 * n) // 10, n // 20
    lower_n = n - new + wh
    shares = {
        lowers[1]: range(0, n // 2),
        lowers[0]: range(n // 2 - n // 10, lower_n),
        seed: range(lower_n, lower_n + new),
    }
    for base, share in shares.items():
        (base / "bigdir").mkdir(parents=True)
        for i in share:
            (base / "bigdir" / f"b{i:05d}").touch()
    for i in range(wh):
        os.mknod(seed / "bigdir" / f"b{i:05d}", stat.S_IFCHR | 0o600, os.makedev(0, 0))


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _merge(src: Path, dst: Path) -> None:
    for entry in os.scandir(src):
        d = dst / entry.name
        st = entry.stat(follow_symlinks=False)
        if _is_whiteout(st):
            _remove(d)
        elif stat.S_ISDIR(st.st_mode):
            if d.is_symlink() or (d.exists() and not d.is_dir()):
                _remove(d)
            d.mkdir(exist_ok=True)
            _merge(Path(entry.path), d)
        else:
            _remove(d)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(entry.path), d)
            else:
                shutil.copyfile(entry.path, d)


def flatten(layers_top_first: list[Path], dest: Path, sub: str = "") -> None:
    """Materialise the merged view of `sub` (overlay rules: upper names win, whiteouts hide) into
    dest/sub. Used to build the floor and to put back what a workload removed from it."""
    (dest / sub).mkdir(parents=True, exist_ok=True)
    for layer in reversed(layers_top_first):
        if (layer / sub).is_dir():
            _merge(layer / sub, dest / sub)


def digest_tree(root: Path) -> tuple[str, int]:
    """Digest of a tree's names, types, sizes, link targets and file contents, and its number of
    regular files: what the untar workload compares, read through the target."""
    lines = []
    files = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(f"{dirpath}/{d}")]):
            p = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if os.path.islink(p):
                lines.append(f"L {rel} {os.readlink(p)}")
                continue
            with open(p, "rb") as f:
                data = f.read()
            files += 1
            lines.append(f"F {rel} {len(data)} {xxhash.xxh3_64_hexdigest(data)}")
        lines.extend(f"D {os.path.normpath(os.path.join(rel_dir, d))}" for d in dirnames)
    return xxhash.xxh3_128_hexdigest("\n".join(sorted(lines)).encode()), files


def _tar_stdlib(tarball: Path, subdirs: tuple[str, ...] | None) -> None:
    """A real source tree available offline: this interpreter's standard library, without byte
    code, site-packages and the config-* build directory (a 40 MiB static library)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"__pycache__", "site-packages", "dist-packages"}

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = Path(info.name).parts
        if any(p in skip or p.startswith("config-3") for p in parts):
            return None
        if not (info.isfile() or info.isdir() or info.issym()):
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    with tarfile.open(tarball, "w") as tar:
        if subdirs is None:
            tar.add(stdlib, arcname="stdlib", filter=keep)
        else:
            tar.add(stdlib, arcname="stdlib", recursive=False, filter=keep)
            for s in subdirs:
                tar.add(stdlib / s, arcname=f"stdlib/{s}", filter=keep)


def prepare(root: Path, sizes: Sizes) -> Layers:
    """Generate the layers, the floor and the tarball under root (an empty directory on a disk
    filesystem) and compute the expected values."""
    lowers = [root / "layers" / TOP, root / "layers" / BOTTOM]
    seed = root / "layers" / SEED
    for p in [*lowers, seed]:
        p.mkdir(parents=True)

    big_digest, appended = _make_big(lowers[1] / "big.bin", sizes.big_bytes)
    tree_dirs = [f"t{a:02d}/s{b:02d}" for a in range(sizes.tree_top) for b in range(sizes.tree_sub)]
    _make_tree(lowers, "tree", tree_dirs, sizes.tree_files, "f")
    _make_tree(
        lowers,
        "deltree",
        [f"d{i:02d}" for i in range(sizes.deltree_dirs)],
        sizes.deltree_files,
        "g",
    )
    _make_bigdir(lowers, seed, sizes.bigdir_entries)

    flat = root / "flat"
    flatten([seed, *lowers], flat)
    _tar_stdlib(root / "stdlib.tar", sizes.untar_subdirs)
    extracted = root / "untar-reference"
    extracted.mkdir()
    with tarfile.open(root / "stdlib.tar") as tar:
        tar.extractall(extracted, filter="tar")
    untar_digest, untar_files = digest_tree(extracted)
    shutil.rmtree(extracted)

    files = dirs = fbytes = 0
    for dirpath, _dirnames, filenames in os.walk(flat / "tree"):
        dirs += 1
        files += len(filenames)
        fbytes += sum(os.lstat(os.path.join(dirpath, f)).st_size for f in filenames)
    deltree = sum(1 + len(f) for _d, _s, f in os.walk(flat / "deltree"))
    expected = Expected(
        big_size=sizes.big_bytes,
        big_digest=big_digest,
        big_appended_digest=appended,
        tree_files=files,
        tree_dirs=dirs,
        tree_file_bytes=fbytes,
        deltree_entries=deltree,
        bigdir_names=frozenset(os.listdir(flat / "bigdir")),
        untar_digest=untar_digest,
        untar_files=untar_files,
    )
    if files + dirs != sizes.tree_entries or len(expected.bigdir_names) != sizes.bigdir_entries:
        raise AssertionError("prepared layers do not have the planned shape")  # a bench bug
    return Layers(root=root, sizes=sizes, expected=expected)
