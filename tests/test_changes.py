"""lifecycle.changes: Docker-style A/C/D lines from an upper directory (hand-made uppers in every
dialect, and one made by kernel overlayfs itself), and exact disk usage."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounting import is_mounted, missing, needs, unmount

from lifecycle import changes as changes_mod
from lifecycle.changes import changes, disk_usage, upper_usage

pytestmark = needs(os.geteuid() == 0, "whiteouts and trusted xattrs: root")

OPAQUE = "trusted.overlay.opaque"


def test_public_surface() -> None:
    assert sorted(changes_mod.__all__) == ["changes", "disk_usage", "upper_usage"]


def tree(root: Path, spec: dict[str, object]) -> Path:
    """Make files from {"a/b": "text", "d/": None (dir), "w": "WHITEOUT", "o/": "OPAQUE"}."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, value in spec.items():
        p = root / rel.rstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        if value == "WHITEOUT":
            os.mknod(p, stat.S_IFCHR, os.makedev(0, 0))
        elif rel.endswith("/"):
            p.mkdir(exist_ok=True)
            if value == "OPAQUE":
                os.setxattr(p, OPAQUE, b"y")
        else:
            assert isinstance(value, str)
            p.write_text(value)
    return root


@pytest.fixture
def lower(tmp_path: Path) -> Path:
    return tree(
        tmp_path / "lower",
        {
            "etc/passwd": "root",
            "etc/hosts": "h",
            "data/a": "a",
            "data/b": "b",
            "data/sub/c": "c",
            "gone": "g",
            "gonedir/y": "y",
            "file-to-dir": "f",
            "dir-to-file/z": "z",
        },
    )


def test_add_change_delete(tmp_path: Path, lower: Path) -> None:
    upper = tree(
        tmp_path / "upper",
        {
            "etc/new": "n",
            "etc/passwd": "root2",
            "etc/hosts": "WHITEOUT",
            "gone": "WHITEOUT",
            "gonedir": "WHITEOUT",
            "nothing-below": "WHITEOUT",  # hides nothing: not a change
            "new/dir/deep": "d",
            "new/empty/": None,
            "file-to-dir/inner": "i",
            "dir-to-file": "now a file",
        },
    )
    assert changes(upper, [lower]) == [
        ("C", "/dir-to-file"),
        ("C", "/etc"),
        ("D", "/etc/hosts"),
        ("A", "/etc/new"),
        ("C", "/etc/passwd"),
        ("C", "/file-to-dir"),
        ("A", "/file-to-dir/inner"),
        ("D", "/gone"),
        ("D", "/gonedir"),
        ("A", "/new"),
        ("A", "/new/dir"),
        ("A", "/new/dir/deep"),
        ("A", "/new/empty"),
    ]


def test_opaque_dir_lists_the_lower_entries_it_hides(tmp_path: Path, lower: Path) -> None:
    upper = tree(tmp_path / "upper", {"data/": "OPAQUE", "data/a": "again", "data/z": "z"})
    assert changes(upper, [lower]) == [
        ("C", "/data"),
        ("C", "/data/a"),
        ("D", "/data/b"),
        ("D", "/data/sub"),
        ("A", "/data/z"),
    ]


def test_under_an_opaque_dir_nothing_merges(tmp_path: Path, lower: Path) -> None:
    # data/sub is re-created inside the opaque data: lower data/sub/c is hidden too.
    upper = tree(tmp_path / "upper", {"data/": "OPAQUE", "data/sub/new": "n"})
    assert changes(upper, [lower]) == [
        ("C", "/data"),
        ("D", "/data/a"),
        ("D", "/data/b"),
        ("C", "/data/sub"),
        ("D", "/data/sub/c"),
        ("A", "/data/sub/new"),
    ]


def test_other_dialects(tmp_path: Path, lower: Path) -> None:
    upper = tree(tmp_path / "upper", {"etc/.wh.hosts": "", "data/.wh..wh..opq": "", "data/a": "x"})
    # fuse-overlayfs: the stray `.wh..opq` char device next to its opaque marker
    os.mknod(upper / "data" / ".wh..opq", stat.S_IFCHR, os.makedev(0, 0))
    (upper / "etc" / "x-wh").mkdir()
    (upper / "gone").touch()  # kernel xattr whiteout
    os.setxattr(upper / "gone", "trusted.overlay.whiteout", b"")
    os.setxattr(upper / "etc", "trusted.overlay.cowfs.ino", b"\x01")  # private: no effect
    assert changes(upper, [lower]) == [
        ("C", "/data"),
        ("C", "/data/a"),
        ("D", "/data/b"),
        ("D", "/data/sub"),
        ("C", "/etc"),
        ("D", "/etc/hosts"),
        ("A", "/etc/x-wh"),
        ("D", "/gone"),
    ]


def test_several_lowers_merge_like_overlayfs(tmp_path: Path) -> None:
    bottom = tree(tmp_path / "bottom", {"d/x": "x", "d/y": "y", "o/old": "o", "w": "w", "f/": None})
    top = tree(
        tmp_path / "top", {"d/t": "t", "o/": "OPAQUE", "o/new": "n", "w": "WHITEOUT", "f": "f"}
    )
    (top / ".wh.d2").touch()  # OCI whiteout in a lower hides nothing here but must not break
    upper = tree(tmp_path / "upper", {"d/": "OPAQUE", "o/": "OPAQUE", "w": "new", "f/": None})
    assert changes(upper, [top, bottom]) == [
        ("C", "/d"),
        ("D", "/d/t"),
        ("D", "/d/x"),
        ("D", "/d/y"),
        ("C", "/f"),  # top's file f hid bottom's dir f
        ("C", "/o"),
        ("D", "/o/new"),  # o/old was already hidden by the opaque o in top
        ("A", "/w"),  # top whited out bottom's w
    ]


def test_empty_upper_and_no_lowers(tmp_path: Path) -> None:
    upper = tree(tmp_path / "upper", {})
    assert changes(upper, []) == []
    tree(upper, {"a/b": "b", "wh": "WHITEOUT"})
    assert changes(upper, []) == [("A", "/a"), ("A", "/a/b")]


def test_symlinks_are_not_followed(tmp_path: Path, lower: Path) -> None:
    outside = tree(tmp_path / "outside", {"secret": "s"})
    upper = tree(tmp_path / "upper", {})
    os.symlink(outside, upper / "etc")  # a symlink replaced the lower dir /etc
    os.symlink(outside, lower / "linkdir")
    (upper / "linkdir").mkdir()
    (upper / "linkdir" / "secret").write_text("mine")
    assert changes(upper, [lower]) == [
        ("C", "/etc"),
        ("C", "/linkdir"),
        ("A", "/linkdir/secret"),  # not C: the lower's linkdir is a symlink, not a directory
    ]


# --- the reference: an upper written by kernel overlayfs ----------------------------------------


@pytest.fixture
def kernel_overlay(tmp_path: Path, lower: Path) -> Iterator[tuple[Path, Path, list[Path]]]:
    top = tree(tmp_path / "top", {"top-file": "t", "etc/hostname": "box"})
    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    for d in (upper, work, mnt):
        d.mkdir()
    opts = f"lowerdir={top}:{lower},upperdir={upper},workdir={work}"
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, mnt], capture_output=True)
    if r.returncode != 0:
        missing(f"kernel overlayfs not available: {r.stderr.decode().strip()}")
    try:
        yield mnt, upper, [top, lower]
    finally:
        unmount(mnt)
        assert not is_mounted(mnt)


def test_changes_of_a_kernel_overlayfs_upper(kernel_overlay: tuple[Path, Path, list[Path]]) -> None:
    mnt, upper, lowers = kernel_overlay
    (mnt / "etc" / "new").write_text("n")  # create in a lower dir
    with open(mnt / "etc" / "passwd", "a") as f:  # modify a lower file
        f.write("more")
    (mnt / "etc" / "hosts").unlink()  # delete a lower file
    (mnt / "gone").unlink()
    os.chmod(mnt / "top-file", 0o600)  # metadata-only change of the top lower's file
    for p in sorted((mnt / "data").rglob("*"), reverse=True):  # rm -r a lower dir ...
        p.rmdir() if p.is_dir() else p.unlink()
    (mnt / "data").rmdir()
    (mnt / "data").mkdir()  # ... and re-create it: opaque
    (mnt / "data" / "a").write_text("again")
    (mnt / "data" / "z").write_text("z")
    (mnt / "new" / "dir").mkdir(parents=True)  # new dir with children
    (mnt / "new" / "dir" / "f").write_text("f")
    (mnt / "gonedir" / "y").unlink()
    (mnt / "gonedir").rmdir()
    (mnt / "tmpfile").write_text("t")  # created then deleted: leaves nothing
    (mnt / "tmpfile").unlink()
    os.sync()
    expected = [
        ("C", "/data"),
        ("C", "/data/a"),
        ("D", "/data/b"),
        ("D", "/data/sub"),
        ("A", "/data/z"),
        ("C", "/etc"),
        ("D", "/etc/hosts"),
        ("A", "/etc/new"),
        ("C", "/etc/passwd"),
        ("D", "/gone"),
        ("D", "/gonedir"),
        ("A", "/new"),
        ("A", "/new/dir"),
        ("A", "/new/dir/f"),
        ("C", "/top-file"),
    ]
    assert changes(upper, lowers) == expected  # while mounted, as `diff` on a running container
    unmount(mnt)
    assert changes(upper, lowers) == expected
    assert os.getxattr(upper / "data", OPAQUE) == b"y"  # the case really is the opaque one


# --- disk usage ----------------------------------------------------------------------------------


def du_total(*paths: Path) -> int:
    out = subprocess.run(
        ["du", "-scB1", *map(str, paths)], capture_output=True, check=True, text=True
    )
    return int(out.stdout.strip().splitlines()[-1].split()[0])


def test_disk_usage_counts_each_inode_once_and_follows_no_symlink(tmp_path: Path) -> None:
    a = tree(tmp_path / "a", {"big": "x" * 100_000, "d/small": "s"})
    b = tree(tmp_path / "b", {"own": "y" * 50_000})
    os.link(a / "big", b / "shared")
    os.symlink(a, b / "link-to-a")
    os.symlink(a / "big", b / "link-to-big")
    with open(b / "sparse", "wb") as f:
        f.truncate(1 << 30)
        f.write(b"z")
    ua, ub, both = disk_usage([a]), disk_usage([b]), disk_usage([a, b])
    assert ua == du_total(a) and ub == du_total(b) and both == du_total(a, b)
    big = os.lstat(a / "big").st_blocks * 512
    assert both == ua + ub - big  # the hard-linked file is shared
    assert disk_usage([a, a]) == ua
    assert upper_usage(b) == ub
    assert ub < 1 << 20  # the sparse GiB costs a block, not its length
