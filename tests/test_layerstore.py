"""lifecycle.layerstore: import of directories and OCI tarballs into the content-addressed store,
the overlay-format conversion, the refusal of unsafe archives, and digest stability."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mounting import needs

from lifecycle import layerstore
from lifecycle.layerstore import (
    LayerError,
    LayerInfo,
    digest_tree,
    import_dir,
    import_tar,
    list_layers,
    remove_layer,
    remove_stale_temps,
)

pytestmark = needs(os.geteuid() == 0, "layers keep owners and whiteouts: root")

OPAQUE = "trusted.overlay.opaque"


def test_public_surface() -> None:
    assert sorted(layerstore.__all__) == [
        "LayerError",
        "LayerInfo",
        "digest_tree",
        "import_dir",
        "import_tar",
        "list_layers",
        "remove_layer",
        "remove_stale_temps",
    ]


# --- helpers -----------------------------------------------------------------------------------


def stored(store: Path) -> list[str]:
    return sorted(os.listdir(store / "sha256"))


def assert_clean_tmp(store: Path) -> None:
    assert os.listdir(store / "tmp") == []


def is_whiteout(p: Path) -> bool:
    st_ = os.lstat(p)
    return stat.S_ISCHR(st_.st_mode) and st_.st_rdev == 0


def xattr(p: Path, name: str) -> bytes | None:
    try:
        return os.getxattr(p, name, follow_symlinks=False)
    except OSError:
        return None


def gnu_tar(src: Path, dest: Path, *extra: str) -> Path:
    subprocess.run(
        [
            "tar",
            "--xattrs",
            "--xattrs-include=*",
            "--format=posix",
            *extra,
            "-cf",
            dest,
            "-C",
            src,
            ".",
        ],
        check=True,
    )
    return dest


def py_tar(src: Path, dest: Path) -> Path:
    """A PAX tar of `src` by the stdlib, with xattrs as `SCHILY.xattr.*` records (tarfile.add
    does not write them), walked in sorted order."""
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tf:
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            rel = os.path.relpath(dirpath, src)
            names = [
                None,
                *sorted(
                    filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
                ),
            ]
            for n in names:
                p = dirpath if n is None else os.path.join(dirpath, n)
                arc = rel if n is None else os.path.normpath(os.path.join(rel, n))
                ti = tf.gettarinfo(p, arcname=arc)
                xa = {
                    k: os.getxattr(p, k, follow_symlinks=False)
                    for k in os.listxattr(p, follow_symlinks=False)
                }
                ti.pax_headers = {
                    f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in xa.items()
                }
                ns = os.lstat(p).st_mtime_ns  # exact, as GNU tar writes it (a float would round)
                ti.pax_headers["mtime"] = f"{ns // 10**9}.{ns % 10**9:09d}"
                if ti.isreg():
                    with open(p, "rb") as f:
                        tf.addfile(ti, f)
                else:
                    tf.addfile(ti)
    return dest


def make_tar(dest: Path, members: list[tuple[str, str, dict[str, object]]]) -> Path:
    """A tar from (name, type, attrs) rows: type is f, d, l, h, c, b, p; attrs may hold data,
    linkname, devmajor/devminor, mode."""
    types = {
        "f": tarfile.REGTYPE,
        "d": tarfile.DIRTYPE,
        "l": tarfile.SYMTYPE,
        "h": tarfile.LNKTYPE,
        "c": tarfile.CHRTYPE,
        "b": tarfile.BLKTYPE,
        "p": tarfile.FIFOTYPE,
    }
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, attrs in members:
            ti = tarfile.TarInfo(name)
            ti.type = types[kind]
            ti.mode = int(attrs.get("mode", 0o755 if kind == "d" else 0o644))  # type: ignore[call-overload]
            ti.mtime = 1_600_000_000
            ti.linkname = str(attrs.get("linkname", ""))
            ti.devmajor = int(attrs.get("devmajor", 0))  # type: ignore[call-overload]
            ti.devminor = int(attrs.get("devminor", 0))  # type: ignore[call-overload]
            data = attrs.get("data", b"")
            assert isinstance(data, bytes)
            ti.size = len(data) if kind == "f" else 0
            tf.addfile(ti, io.BytesIO(data) if kind == "f" else None)
    return dest


# --- import_dir --------------------------------------------------------------------------------


def test_import_dir_keeps_metadata(tmp_path: Path) -> None:
    src, store = tmp_path / "src", tmp_path / "store"
    (src / "d" / "e").mkdir(parents=True)
    f = src / "d" / "suid"
    f.write_bytes(b"x" * 5000)
    os.chown(f, 1000, 2000)
    os.chmod(f, 0o4750)
    os.setxattr(f, "user.note", b"\x00\xffbin")
    os.setxattr(f, "trusted.keep", b"t")
    os.utime(f, ns=(1_500_000_000_123_456_789, 1_500_000_000_123_456_789))
    os.link(f, src / "hard")
    os.symlink("../etc/shadow", src / "d" / "rel")
    os.symlink("/etc/passwd", src / "abs")
    os.lchown(src / "abs", 7, 8)
    os.utime(src / "abs", ns=(1_400_000_000_000_000_000,) * 2, follow_symlinks=False)
    os.mkfifo(src / "fifo", 0o640)
    os.chmod(src / "d" / "e", 0o1777)
    os.utime(src / "d" / "e", ns=(1_300_000_000_000_000_001,) * 2)
    os.chmod(src, 0o750)

    info = import_dir(src, store)

    assert isinstance(info, LayerInfo)
    assert info.path == store / "sha256" / info.digest.removeprefix("sha256:")
    assert info.digest == digest_tree(info.path)
    assert info.size_bytes == 5000  # two names, one inode
    assert info.files == 7  # d, d/e, d/suid, d/rel, hard, abs, fifo
    out = info.path
    s = os.lstat(out / "d" / "suid")
    assert (stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid) == (0o4750, 1000, 2000)
    assert s.st_mtime_ns == 1_500_000_000_123_456_789
    assert (out / "d" / "suid").read_bytes() == b"x" * 5000
    assert xattr(out / "d" / "suid", "user.note") == b"\x00\xffbin"
    assert xattr(out / "d" / "suid", "trusted.keep") == b"t"
    assert os.lstat(out / "hard").st_ino == s.st_ino and s.st_nlink == 2
    assert os.readlink(out / "d" / "rel") == "../etc/shadow"
    a = os.lstat(out / "abs")
    assert os.readlink(out / "abs") == "/etc/passwd"
    assert (a.st_uid, a.st_gid, a.st_mtime_ns) == (7, 8, 1_400_000_000_000_000_000)
    assert stat.S_ISFIFO(os.lstat(out / "fifo").st_mode)
    assert stat.S_IMODE(os.lstat(out / "fifo").st_mode) == 0o640
    e = os.lstat(out / "d" / "e")
    assert stat.S_IMODE(e.st_mode) == 0o1777 and e.st_mtime_ns == 1_300_000_000_000_000_001
    assert stat.S_IMODE(os.lstat(out).st_mode) == 0o750
    assert_clean_tmp(store)
    assert stat.S_IMODE(os.lstat(store / "sha256").st_mode) == 0o700


def test_relative_store_gives_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    info = import_tar(make_tar(tmp_path / "empty.tar", []), Path("store"))
    assert info.path.is_absolute() and info.path.is_dir()
    assert (info.size_bytes, info.files) == (0, 0)


def test_same_content_is_stored_once(tmp_path: Path) -> None:
    src, store = tmp_path / "src", tmp_path / "store"
    src.mkdir()
    (src / "f").write_text("same")
    a = import_dir(src, store)
    b = import_dir(src, store)
    tar = import_tar(gnu_tar(src, tmp_path / "l.tar"), store)
    assert a == b == tar
    assert stored(store) == [a.digest.removeprefix("sha256:")]
    assert list_layers(store) == [a.digest]
    assert_clean_tmp(store)


def test_digest_covers_file_mtimes_but_not_directory_mtimes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_text("x")
    first = digest_tree(src)
    os.utime(src / "d", ns=(5 * 10**9, 5 * 10**9))
    assert digest_tree(src) == first
    os.utime(src / "d" / "f", ns=(5 * 10**9 + 7, 5 * 10**9 + 7))
    changed = digest_tree(src)
    assert changed != first
    os.utime(src / "d" / "f", ns=(5 * 10**9 + 9, 5 * 10**9 + 9))
    assert digest_tree(src) == changed  # whole seconds only


def test_symlinks_in_the_source_are_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    src, store = tmp_path / "src", tmp_path / "store"
    src.mkdir()
    os.symlink(outside, src / "link")
    info = import_dir(src, store)
    assert os.readlink(info.path / "link") == str(outside)
    assert os.listdir(info.path) == ["link"]


def test_import_dir_refusals(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with pytest.raises(LayerError, match="cannot import"):
        import_dir(tmp_path / "missing", store)
    dev = tmp_path / "dev"
    dev.mkdir()
    os.mknod(dev / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    with pytest.raises(LayerError, match=r"device node /null is not allowed"):
        import_dir(dev, store)
    nested = tmp_path / "nested"
    (nested / "x").mkdir(parents=True)
    with pytest.raises(LayerError, match="contains the layer store"):
        import_dir(nested, nested / "x" / "store")
    with pytest.raises(LayerError, match="the layer store itself"):
        import_dir(store / "tmp", store)
    redirected = tmp_path / "redirected"
    (redirected / "moved").mkdir(parents=True)
    os.setxattr(redirected / "moved", "trusted.overlay.redirect", b"/orig")
    with pytest.raises(LayerError, match=r"/moved has trusted.overlay.redirect, which only means"):
        import_dir(redirected, store)
    assert_clean_tmp(store)
    assert stored(store) == []


# --- overlay format ----------------------------------------------------------------------------


def oci_tree(root: Path) -> None:
    """An OCI-style layer as a directory: .wh. files and an opaque marker."""
    (root / "etc").mkdir(parents=True)
    (root / "etc" / ".wh.hosts").touch()
    (root / "opq").mkdir()
    (root / "opq" / ".wh..wh..opq").touch()
    (root / "opq" / "new").write_text("n")
    (root / ".wh.again").touch()
    (root / "again").mkdir()  # deleted and re-created in this layer
    (root / "again" / "x").write_text("x")
    (root / "same").write_text("kept")
    (root / ".wh.same").touch()  # never hides an entry of its own layer
    (root / ".wh..wh.plnk").mkdir()  # aufs metadata: skipped
    for p in sorted(root.rglob("*"), reverse=True):
        os.utime(p, ns=(10**18, 10**18), follow_symlinks=False)


def check_overlay_form(out: Path) -> None:
    assert is_whiteout(out / "etc" / "hosts")
    assert xattr(out / "opq", OPAQUE) == b"y"
    assert (out / "opq" / "new").read_text() == "n"
    assert xattr(out / "again", OPAQUE) == b"y"
    assert (out / "again" / "x").read_text() == "x"
    assert (out / "same").read_text() == "kept"
    assert not any(n.startswith(".wh.") for _, ds, fs in os.walk(out) for n in ds + fs)


def test_oci_whiteouts_become_overlay_whiteouts_from_dir_and_tar(tmp_path: Path) -> None:
    src, store = tmp_path / "src", tmp_path / "store"
    oci_tree(src)
    from_dir = import_dir(src, store)
    check_overlay_form(from_dir.path)
    for tar in (gnu_tar(src, tmp_path / "l.tar"), gnu_tar(src, tmp_path / "l.tgz", "-z")):
        assert import_tar(tar, store) == from_dir
    assert stored(store) == [from_dir.digest.removeprefix("sha256:")]


def test_overlay_format_dir_is_kept_and_matches_its_oci_form(tmp_path: Path) -> None:
    oci, ovl, store = tmp_path / "oci", tmp_path / "ovl", tmp_path / "store"
    oci_tree(oci)
    (ovl / "etc").mkdir(parents=True)
    os.mknod(ovl / "etc" / "hosts", stat.S_IFCHR | 0o700, os.makedev(0, 0))  # fuse-overlayfs mode
    (ovl / "opq").mkdir()
    os.setxattr(ovl / "opq", OPAQUE, b"y")
    (ovl / "opq" / "new").write_text("n")
    (ovl / "opq" / ".wh..wh..opq").touch()  # fuse-overlayfs writes both forms
    (ovl / "again").mkdir()
    os.setxattr(ovl / "again", "user.fuseoverlayfs.opaque", b"y")
    (ovl / "again" / "x").write_text("x")
    os.setxattr(ovl / "again", "trusted.overlay.origin", b"\x00\xfb\x1d")  # another fs: dropped
    (ovl / "same").write_text("kept")
    for p in sorted(ovl.rglob("*"), reverse=True):
        os.utime(p, ns=(10**18, 10**18), follow_symlinks=False)
    a = import_dir(oci, store)
    b = import_dir(ovl, store)
    check_overlay_form(b.path)
    assert xattr(b.path / "again", "trusted.overlay.origin") is None
    assert a == b


def test_xattr_whiteouts_become_char_whiteouts(tmp_path: Path) -> None:
    src, store = tmp_path / "src", tmp_path / "store"
    (src / "d").mkdir(parents=True)
    os.setxattr(src / "d", OPAQUE, b"x")  # "holds xattr whiteouts", not opaque
    (src / "d" / "gone").touch()
    os.setxattr(src / "d" / "gone", "trusted.overlay.whiteout", b"")
    info = import_dir(src, store)
    assert is_whiteout(info.path / "d" / "gone")
    assert xattr(info.path / "d", OPAQUE) is None


def test_tar_whiteout_then_directory_and_implicit_parents(tmp_path: Path) -> None:
    tar = make_tar(
        tmp_path / "l.tar",
        [
            ("a/.wh.b", "f", {}),
            ("a/b/c/file", "f", {"data": b"deep"}),  # parents a/b, a/b/c are implicit
            ("x/.wh..wh..opq", "f", {}),
            ("./", "d", {"mode": 0o711}),
        ],
    )
    store = tmp_path / "store"
    info = import_tar(tar, store)
    out = info.path
    assert xattr(out / "a" / "b", OPAQUE) == b"y"
    assert xattr(out / "x", OPAQUE) == b"y"
    assert (out / "a" / "b" / "c" / "file").read_bytes() == b"deep"
    assert stat.S_IMODE(os.lstat(out / "a" / "b" / "c").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(out).st_mode) == 0o711
    assert import_tar(tar, store) == info  # implicit dirs do not make the digest vary


def test_tar_xattrs_and_hardlinks(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    os.setxattr(src / "f", "user.k", b"v")
    os.setxattr(
        src / "f", "security.capability", bytes.fromhex("0100000200200000000000000000000000000000")
    )
    os.link(src / "f", src / "g")
    store = tmp_path / "store"
    a = import_tar(py_tar(src, tmp_path / "py.tar"), store)
    b = import_tar(gnu_tar(src, tmp_path / "gnu.tar"), store)
    c = import_dir(src, store)
    assert a == b == c
    assert os.lstat(a.path / "f").st_ino == os.lstat(a.path / "g").st_ino
    assert xattr(a.path / "g", "security.capability") == xattr(src / "f", "security.capability")


# --- unsafe and broken archives ----------------------------------------------------------------

UNSAFE = {
    "absolute": ([("/etc/evil", "f", {})], "absolute path"),
    "dotdot": ([("../evil", "f", {})], r"leaves the layer \('..'\)"),
    "dotdot-inside": ([("a/../../evil", "f", {})], "leaves the layer"),
    "through-symlink": (
        [("l", "l", {"linkname": "{outside}"}), ("l/evil", "f", {})],
        "goes through /l, which is not a directory",
    ),
    "through-file": ([("f", "f", {}), ("f/evil", "f", {})], "goes through /f"),
    "hardlink-outside": ([("h", "h", {"linkname": "../outside/victim"})], "leaves the layer"),
    "hardlink-absolute": ([("h", "h", {"linkname": "{outside}/victim"})], "absolute path"),
    "hardlink-missing": ([("h", "h", {"linkname": "nope"})], "earlier non-directory"),
    "hardlink-dir": ([("d", "d", {}), ("h", "h", {"linkname": "d"})], "earlier non-directory"),
    "hardlink-via-symlink": (
        [("l", "l", {"linkname": "{outside}"}), ("h", "h", {"linkname": "l/victim"})],
        "earlier non-directory",
    ),
    "chardev": ([("null", "c", {"devmajor": 1, "devminor": 3})], "device node /null"),
    "blockdev": ([("sda", "b", {"devmajor": 8})], "device node /sda"),
    "duplicate": ([("f", "f", {}), ("f", "f", {})], "duplicate entry /f"),
    "dir-then-file": ([("d/x", "f", {}), ("d", "f", {})], "both a directory and a non-directory"),
    "empty-whiteout": ([(".wh.", "f", {})], "invalid whiteout"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_archives_are_refused_without_side_effects(tmp_path: Path, case: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("v")
    rows, message = UNSAFE[case]
    rows = [
        (
            n,
            k,
            {a: (v.format(outside=outside) if isinstance(v, str) else v) for a, v in attrs.items()},
        )
        for n, k, attrs in rows
    ]
    store = tmp_path / "store"
    with pytest.raises(LayerError, match=message) as exc:
        import_tar(make_tar(tmp_path / "bad.tar", rows), store)
    assert "\n" not in str(exc.value)
    assert os.listdir(outside) == ["victim"] and (outside / "victim").read_text() == "v"
    assert not (tmp_path / "evil").exists()
    assert stored(store) == []
    assert_clean_tmp(store)


def test_broken_archives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    empty = tmp_path / "empty.tar"
    empty.touch()
    with pytest.raises(LayerError, match="not a tar archive"):
        import_tar(empty, store)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar archive at all" * 40)
    with pytest.raises(LayerError, match="not a tar archive"):
        import_tar(junk, store)
    good = make_tar(tmp_path / "good.tar", [("f", "f", {"data": b"z" * 100_000})])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(good.read_bytes()[:30_000])
    with pytest.raises(LayerError, match="corrupt or truncated"):
        import_tar(cut, store)
    with pytest.raises(LayerError, match="cannot import"):
        import_tar(tmp_path / "missing.tar", store)
    zst = tmp_path / "l.tar.zst"
    zst.write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 64)
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as if not installed
    with pytest.raises(
        LayerError, match="zstd-compressed layers need the Python module 'zstandard'"
    ):
        import_tar(zst, store)
    assert stored(store) == []
    assert_clean_tmp(store)


# --- removal -----------------------------------------------------------------------------------


def test_remove_layer(tmp_path: Path) -> None:
    src, store = tmp_path / "src", tmp_path / "store"
    src.mkdir()
    os.mknod(src / "wh", stat.S_IFCHR, os.makedev(0, 0))
    (src / "ro").mkdir(mode=0o500)
    info = import_dir(src, store)
    assert remove_layer(store, info.digest) is True
    assert not info.path.exists() and list_layers(store) == []
    assert remove_layer(store, info.digest) is False
    assert_clean_tmp(store)


@pytest.mark.parametrize(
    "digest", ["sha256:../../x", "sha256:" + "A" * 64, "md5:" + "0" * 64, "0" * 64, "sha256:/etc"]
)
def test_remove_layer_refuses_bad_digests(tmp_path: Path, digest: str) -> None:
    with pytest.raises(LayerError, match="invalid layer digest"):
        remove_layer(tmp_path, digest)


def test_remove_layer_does_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    store, victim = tmp_path / "store", tmp_path / "victim"
    victim.mkdir()
    (victim / "f").write_text("v")
    (store / "sha256").mkdir(parents=True)
    os.symlink(victim, store / "sha256" / ("0" * 64))
    with pytest.raises(LayerError, match="is not a layer directory"):
        remove_layer(store, "sha256:" + "0" * 64)
    assert (victim / "f").read_text() == "v"
    assert list_layers(store) == []


def test_remove_stale_temps(tmp_path: Path) -> None:
    store = tmp_path / "store"
    (store / "tmp" / "import-dead" / "d").mkdir(parents=True)
    (store / "tmp" / "stray").touch()
    assert remove_stale_temps(store) == 2
    assert_clean_tmp(store)
    assert remove_stale_temps(tmp_path / "none") == 0


# --- digest stability, generated trees ---------------------------------------------------------

DIR_NAMES = ["a", "b", "c", "é", "x y"]
ENTRY = st.tuples(
    st.builds(
        lambda parents, last: [*parents, last],
        st.lists(st.sampled_from(DIR_NAMES), max_size=2),
        st.sampled_from([*DIR_NAMES, ".wh.a", ".wh.b"]),
    ),
    st.sampled_from("fdlhpw"),
    st.binary(max_size=300),
    st.sampled_from([0o644, 0o600, 0o755, 0o4755, 0o2711]),
    st.sampled_from([0, 1000]),
    st.integers(min_value=1, max_value=2**33),
    st.integers(min_value=0, max_value=999_999_999),
    st.sampled_from([None, b"", b"v", b"\x00\xff"]),
)


def build_tree(root: Path, entries: list[tuple]) -> None:  # type: ignore[type-arg]
    """Create what the generated entries allow (skipping names that clash), then fix dir times."""
    root.mkdir()
    files: list[Path] = []
    for parts, kind, data, mode, uid, sec, nsec, xval in entries:
        p = root.joinpath(*parts)
        if any(q.is_symlink() or (q.exists() and not q.is_dir()) for q in list(p.parents)[:-1]):
            continue
        if os.path.lexists(p) or (parts[-1].startswith(".wh.") and kind != "w"):
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        if kind == "w":
            if not parts[-1].startswith(".wh."):
                continue
            p.touch()
        elif kind == "f":
            p.write_bytes(data)
            files.append(p)
        elif kind == "d":
            p.mkdir()
        elif kind == "l":
            os.symlink(data.replace(b"\0", b"").decode("latin-1") or "t", p)
        elif kind == "h":
            if not files:
                continue
            os.link(files[len(data) % len(files)], p)
            continue
        elif kind == "p":
            os.mkfifo(p)
        os.lchown(p, uid, uid)
        if kind in "fdp":
            os.chmod(p, mode if kind == "f" else 0o755)
        if xval is not None and kind != "l":
            os.setxattr(p, "trusted.gen", xval)
        os.utime(p, ns=(sec * 10**9 + nsec,) * 2, follow_symlinks=False)


@settings(max_examples=40, deadline=None)
@given(st.lists(ENTRY, max_size=12))
def test_dir_and_tar_give_one_digest_and_one_copy(entries: list[tuple]) -> None:  # type: ignore[type-arg]
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        src, store = tmp / "src", tmp / "store"
        build_tree(src, entries)
        a = import_dir(src, store)
        b = import_tar(py_tar(src, tmp / "l.tar"), store)
        c = import_dir(src, store)
        assert a == b == c
        assert stored(store) == [a.digest.removeprefix("sha256:")]
        assert_clean_tmp(store)
        assert digest_tree(a.path) == a.digest
        # A copy of the stored layer is the same layer.
        subprocess.run(["cp", "-a", "--preserve=all", a.path, tmp / "copy"], check=True)
        assert import_dir(tmp / "copy", store) == a
