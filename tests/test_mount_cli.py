"""The `cowfs` command as users and mount(8) run it: option and path errors, read-only mounts, the
mount(8)/fstab helper wiring, signals, /proc/self/mountinfo, ownership through the mount, and
persistence across remounts.

Every real mount here is unmounted and every daemon ended, even when a test fails.

About the mount-helper tests: `mount -t fuse.cowfs` runs /sbin/mount.fuse (fuse3's mount.fuse3),
which runs `/bin/sh -c "cowfs SOURCE MOUNTPOINT -o OPTIONS"`. mount(8) itself (util-linux's
environment sanitizing) drops PATH (also HOME and SHELL) from the helper's environment, so the
shell finds `cowfs` on dash's built-in default PATH only (/usr/local/sbin:/usr/local/bin:/usr/sbin:
/usr/bin:/sbin:/bin): a PATH wrapper given to mount(8) is never used. Those tests therefore need the
installed helper (scripts/setup.sh: /usr/local/bin/cowfs -> .venv/bin/cowfs); PYTHONPATH does reach
it, so it runs this checkout's code. mount.fuse3 run directly keeps PATH, which the wrapper test uses.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mounting import (
    _mount_pids,
    cowfs_cmd,
    cowfs_mount,
    is_mounted,
    missing,
    unmount,
)

REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534
# What dash (Debian's /bin/sh) searches when PATH is unset, as it is under mount(8).
SH_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
F_SETPIPE_SZ = 1031


# --------------------------------------------------------------------------- helpers


def cowfs_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
    )
    env.update(extra)
    return env


def run_cowfs(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*cowfs_cmd(), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=30,
        env=cowfs_env(),
        stdin=subprocess.DEVNULL,
    )


def mountinfo(real_mnt: str) -> list[dict[str, str]]:
    """The /proc/self/mountinfo entries at `real_mnt` (an already resolved path: this never
    touches the mount point, so it cannot hang on a stuck daemon)."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            pre, _, post = line.rstrip("\n").partition(" - ")
            fields, tail = pre.split(), post.split()
            mnt = fields[4].encode().decode("unicode_escape")
            if mnt == real_mnt:
                out.append(
                    {
                        "mount_options": fields[5],
                        "fstype": tail[0],
                        "source": tail[1].encode().decode("unicode_escape"),
                        "super_options": tail[2] if len(tail) > 2 else "",
                    }
                )
    return out


def wait_for(cond: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def end_daemons(mnt: str | os.PathLike[str], timeout: float = 10) -> list[int]:
    """Wait for the daemons serving `mnt` to exit; kill the ones that do not. Returns those."""
    deadline = time.monotonic() + timeout
    while _mount_pids(str(mnt)) and time.monotonic() < deadline:
        time.sleep(0.02)
    left = _mount_pids(str(mnt))
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


@contextlib.contextmanager
def cleanup_mount(mnt: str | os.PathLike[str]) -> Iterator[None]:
    """Whatever mounted `mnt` inside the block: unmount it and end its daemon afterwards."""
    try:
        yield
    finally:
        unmount(mnt)
        end_daemons(mnt)


def assert_refused(r: subprocess.CompletedProcess[str], code: int, mnt: Path, *words: str) -> None:
    lines = r.stderr.splitlines()
    assert r.returncode == code, f"exit {r.returncode}, expected {code}; stderr: {r.stderr!r}"
    assert len(lines) == 1, f"expected exactly one line on stderr, got {r.stderr!r}"
    assert lines[0].startswith("cowfs: "), lines[0]
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    assert "Traceback" not in r.stderr
    assert r.stdout == ""
    assert not is_mounted(mnt)
    assert _mount_pids(str(mnt)) == []


def tree(root: Path) -> dict[str, tuple[int, int, int, bytes | str]]:
    """Every entry under root with its mode, owner and content (or link target)."""
    out: dict[str, tuple[int, int, int, bytes | str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            if stat.S_ISREG(st.st_mode):
                body: bytes | str = p.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(p)
            else:
                body = ""
            out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, body)
    return out


def lowers_opt(*dirs: Path) -> str:
    return "lowerdir=" + ":".join(str(d).replace(":", "\\:") for d in dirs)


def rw_opts(layers: dict[str, Path]) -> str:
    return (
        f"{lowers_opt(layers['lower0'], layers['lower1'])},"
        f"upperdir={layers['upper']},workdir={layers['work']}"
    )


def populate(layers: dict[str, Path]) -> None:
    (layers["lower0"] / "top").write_text("from lower0\n")
    (layers["lower0"] / "shadowed").write_text("lower0 wins\n")
    (layers["lower0"] / "dir").mkdir()
    (layers["lower0"] / "dir" / "inner").write_text("inner\n")
    (layers["lower0"] / "dir" / "sub").mkdir()
    (layers["lower1"] / "bottom").write_text("from lower1\n")
    (layers["lower1"] / "shadowed").write_text("lower1 loses\n")


def installed_helper() -> str | None:
    """The `cowfs` that mount(8) -> mount.fuse3 -> /bin/sh would run, or None."""
    return shutil.which("cowfs", path=SH_DEFAULT_PATH)


def need_mount_helper() -> None:
    problems = []
    if not any(os.access(p, os.X_OK) for p in ("/sbin/mount.fuse", "/sbin/mount.fuse3")):
        problems.append("/sbin/mount.fuse is missing (package fuse3)")
    if installed_helper() is None:
        problems.append(
            "no `cowfs` on /bin/sh's default PATH (mount(8) drops PATH): run scripts/setup.sh,"
            " which links /usr/local/bin/cowfs -> .venv/bin/cowfs"
        )
    if problems:
        missing("; ".join(problems))


# --------------------------------------------------------------------------- 1. refusals


def _args(opts: str, mnt: str = "{mnt}") -> Callable[[dict[str, Path]], list[str]]:
    def build(L: dict[str, Path]) -> list[str]:
        names = {k: str(v) for k, v in L.items()}
        names["tmp"] = str(L["mnt"].parent)
        return ["-o", opts.format(**names), mnt.format(**names)]

    return build


REFUSALS = {
    "unknown option": (_args("lowerdir={lower0},bogus_option"), 2, ["bogus_option"]),
    "unknown option, helper form": (
        lambda L: ["mysource", str(L["mnt"]), "-o", f"lowerdir={L['lower0']},nope=1"],
        2,
        ["nope"],
    ),
    "missing lowerdir": (_args("upperdir={upper},workdir={work}"), 2, ["lowerdir"]),
    "empty lowerdir": (_args("lowerdir=,upperdir={upper},workdir={work}"), 2, ["lowerdir"]),
    "upperdir without workdir": (_args("lowerdir={lower0},upperdir={upper}"), 2, ["workdir"]),
    "workdir without upperdir": (_args("lowerdir={lower0},workdir={work}"), 2, ["upperdir"]),
    "writeback_cache": (_args("lowerdir={lower0},writeback_cache"), 2, ["writeback_cache"]),
    "max_write=1": (_args("lowerdir={lower0},max_write=1"), 2, ["max_write"]),
    "lowerdir missing": (_args("lowerdir={lower0}:{tmp}/nonexistent"), 3, ["nonexistent"]),
    "lowerdir is a file": (_args("lowerdir={tmp}/plainfile"), 3, ["plainfile", "directory"]),
    "upperdir missing": (
        _args("lowerdir={lower0},upperdir={tmp}/noupper,workdir={work}"),
        3,
        ["noupper"],
    ),
    "upper and work the same": (_args("lowerdir={lower0},upperdir={upper},workdir={upper}"), 3, []),
    "work inside upper": (
        _args("lowerdir={lower0},upperdir={upper},workdir={upper}/w"),
        3,
        ["inside"],
    ),
    "upper inside work": (
        _args("lowerdir={lower0},upperdir={work}/u,workdir={work}"),
        3,
        ["inside"],
    ),
    "upper inside a lower": (
        _args("lowerdir={lower1}:{lower0},upperdir={lower0}/u,workdir={work}"),
        3,
        ["lower0"],
    ),
    "lower inside upper": (
        _args("lowerdir={upper}/l,upperdir={upper},workdir={work}"),
        3,
        ["overlap"],
    ),
    "mountpoint missing": (_args("lowerdir={lower0}", "{tmp}/nomnt"), 3, ["nomnt"]),
    "mountpoint is a file": (_args("lowerdir={lower0}", "{tmp}/plainfile"), 3, ["plainfile"]),
    "no arguments": (lambda L: [], 2, []),
    "too many arguments": (lambda L: ["a", "b", str(L["mnt"]), "-o", "lowerdir=/"], 2, []),
    "data-only lower": (_args("lowerdir={lower0}::{lower1}"), 2, ["data-only"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused(layers: dict[str, Path], case: str) -> None:
    build, code, words = REFUSALS[case]
    tmp = layers["mnt"].parent
    (tmp / "plainfile").write_text("x")
    for d in (
        layers["upper"] / "w",
        layers["work"] / "u",
        layers["lower0"] / "u",
        layers["upper"] / "l",
    ):
        d.mkdir()
    before = {k: tree(v) for k, v in layers.items()}
    r = run_cowfs(*build(layers))
    assert_refused(r, code, layers["mnt"], *words)
    # A refused mount changes nothing: no work/work, no probe xattrs, nothing in upper.
    assert {k: tree(v) for k, v in layers.items()} == before
    assert os.listxattr(layers["upper"]) == []


@pytest.mark.fuse
def test_mountpoint_busy(layers: dict[str, Path]) -> None:
    populate(layers)
    mnt = layers["mnt"]
    real = os.path.realpath(mnt)
    with cowfs_mount(mnt, [layers["lower0"]]):
        pids = _mount_pids(str(mnt))
        r = run_cowfs("-o", rw_opts(layers), mnt)
        assert r.returncode == 4, r.stderr
        assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("cowfs: "), r.stderr
        assert "busy" in r.stderr
        # The first mount is untouched and still served by the same daemon.
        assert len(mountinfo(real)) == 1
        assert (mnt / "top").read_text() == "from lower0\n"
        assert _mount_pids(str(mnt)) == pids
        assert list(layers["work"].iterdir()) == []
    assert mountinfo(real) == []


@pytest.mark.fuse
def test_escaped_colon_and_comma_in_layer_paths(tmp_path: Path) -> None:
    """`\\:` and `\\,` in lowerdir=, upperdir= and workdir= are literal, as in overlayfs."""
    low_a, low_b = tmp_path / "low:a", tmp_path / "low,b:c"
    upper, work, mnt = tmp_path / "up:per", tmp_path / "wo,rk", tmp_path / "mnt"
    for d in (low_a, low_b, upper, work, mnt):
        d.mkdir()
    (low_a / "a").write_text("A")
    (low_b / "b").write_text("B")
    (low_b / "a").write_text("hidden")
    esc = lambda p: str(p).replace(":", "\\:").replace(",", "\\,")  # noqa: E731
    opts = f"lowerdir={esc(low_a)}:{esc(low_b)},upperdir={esc(upper)},workdir={esc(work)}"
    with cleanup_mount(mnt):
        r = run_cowfs("-o", opts, mnt)
        assert r.returncode == 0, r.stderr
        assert sorted(os.listdir(mnt)) == ["a", "b"]
        assert (mnt / "a").read_text() == "A"
        assert (mnt / "b").read_text() == "B"
        (mnt / "new").write_text("N")
        assert (upper / "new").read_text() == "N"
        assert (work / "work").is_dir()


@pytest.mark.fuse
def test_libfuse_refusal_is_one_line(layers: dict[str, Path]) -> None:
    # blksize= is valid for libfuse but only for fuseblk: the kernel's mount(2) says EINVAL.
    r = run_cowfs("-o", f"lowerdir={layers['lower0']},blksize=4096", layers["mnt"])
    assert_refused(r, 4, layers["mnt"])


@pytest.mark.fuse
def test_source_with_a_comma(layers: dict[str, Path]) -> None:
    populate(layers)
    real = os.path.realpath(layers["mnt"])
    with cleanup_mount(layers["mnt"]):
        r = run_cowfs("src,with,commas", layers["mnt"], "-o", rw_opts(layers))
        assert r.returncode == 0, r.stderr
        (info,) = mountinfo(real)
        assert info["source"] == "src,with,commas"


# --------------------------------------------------------------------------- 2. read-only


def _assert_all_erofs(mnt: Path) -> None:
    f, d = mnt / "top", mnt / "dir"
    attempts: dict[str, Callable[[], object]] = {
        "open O_WRONLY": lambda: os.close(os.open(f, os.O_WRONLY)),
        "open O_RDWR lower1 file": lambda: os.close(os.open(mnt / "bottom", os.O_RDWR)),
        "open O_CREAT": lambda: os.close(os.open(mnt / "newfile", os.O_WRONLY | os.O_CREAT, 0o644)),
        "truncate": lambda: os.truncate(f, 0),
        "mkdir": lambda: os.mkdir(mnt / "newdir"),
        "mknod fifo": lambda: os.mkfifo(mnt / "fifo"),
        "symlink": lambda: os.symlink("top", mnt / "link"),
        "link": lambda: os.link(f, mnt / "hardlink"),
        "unlink": lambda: os.unlink(f),
        "rmdir": lambda: os.rmdir(d / "sub"),
        "rename": lambda: os.rename(f, mnt / "renamed"),
        "chmod": lambda: os.chmod(f, 0o600),
        "chown": lambda: os.chown(f, 1, 1),
        "utime": lambda: os.utime(f, (1, 1)),
        "setxattr": lambda: os.setxattr(f, "user.test", b"1"),
        "removexattr": lambda: os.removexattr(f, "user.test"),
    }
    wrong = {}
    for what, fn in attempts.items():
        try:
            fn()
        except OSError as e:
            if e.errno != errno.EROFS:
                wrong[what] = errno.errorcode.get(e.errno, e.errno)
        else:
            wrong[what] = "succeeded"
    assert wrong == {}, f"expected EROFS from every write, got {wrong}"


def _assert_reads(mnt: Path) -> None:
    assert sorted(os.listdir(mnt)) == ["bottom", "dir", "shadowed", "top"]
    assert (mnt / "top").read_text() == "from lower0\n"
    assert (mnt / "bottom").read_text() == "from lower1\n"
    assert (mnt / "shadowed").read_text() == "lower0 wins\n"
    assert (mnt / "dir" / "inner").read_text() == "inner\n"
    with open(mnt / "top", "rb") as fh:  # O_RDONLY opens are fine
        assert fh.read(4) == b"from"


@pytest.mark.fuse
def test_read_only_without_upperdir(layers: dict[str, Path]) -> None:
    populate(layers)
    (layers["lower0"] / "top").chmod(0o644)
    before = {k: tree(v) for k, v in layers.items() if k != "mnt"}
    with cowfs_mount(layers["mnt"], [layers["lower0"], layers["lower1"]]) as mnt:
        _assert_reads(mnt)
        _assert_all_erofs(mnt)
        _assert_reads(mnt)
    assert {k: tree(v) for k, v in layers.items() if k != "mnt"} == before


@pytest.mark.fuse
def test_lower_only_mount_is_read_only_to_the_kernel(layers: dict[str, Path]) -> None:
    populate(layers)
    (layers["lower0"] / "top").chmod(0o666)
    real = os.path.realpath(layers["mnt"])
    with cowfs_mount(layers["mnt"], [layers["lower0"], layers["lower1"]]) as mnt:
        (info,) = mountinfo(real)
        writable = os.access(mnt / "top", os.W_OK)
    assert not writable, "access(W_OK) is true on a read-only mount"
    assert "ro" in info["mount_options"].split(",") + info["super_options"].split(","), info


@pytest.mark.fuse
def test_read_only_option_with_upperdir(layers: dict[str, Path]) -> None:
    populate(layers)
    before = {k: tree(v) for k, v in layers.items() if k not in ("mnt", "work")}
    real = os.path.realpath(layers["mnt"])
    with cowfs_mount(
        layers["mnt"], [layers["lower0"], layers["lower1"]], layers["upper"], layers["work"], "ro"
    ) as mnt:
        (info,) = mountinfo(real)
        assert info["mount_options"].split(",")[0] == "ro", info
        _assert_reads(mnt)
        _assert_all_erofs(mnt)
        assert not os.access(mnt / "top", os.W_OK)
    assert {k: tree(v) for k, v in layers.items() if k not in ("mnt", "work")} == before


@pytest.mark.fuse
def test_read_only_option_still_shows_upper_layer(layers: dict[str, Path]) -> None:
    populate(layers)
    (layers["upper"] / "from_upper").write_text("upper\n")
    os.mknod(layers["upper"] / "bottom", stat.S_IFCHR | 0o600, 0)  # whiteout: deletes lower1's
    with cowfs_mount(
        layers["mnt"], [layers["lower0"], layers["lower1"]], layers["upper"], layers["work"], "ro"
    ) as mnt:
        names = sorted(os.listdir(mnt))
    assert names == ["dir", "from_upper", "shadowed", "top"]


# --------------------------------------------------------------------------- 3./4. mount(8)


def _check_served(mnt: Path, layers: dict[str, Path], source: str) -> None:
    real = os.path.realpath(mnt)
    (info,) = mountinfo(real)
    assert info["fstype"] == "fuse.cowfs", info
    assert info["source"] == source, info
    assert (mnt / "top").read_text() == "from lower0\n"
    (mnt / "via_helper").write_text("written\n")
    assert (layers["upper"] / "via_helper").read_text() == "written\n"


def _wait_unmounted_and_gone(mnt: Path) -> None:
    real = os.path.realpath(mnt)
    assert mountinfo(real) == []
    left = end_daemons(mnt, timeout=10)
    assert left == [], f"daemon(s) {left} still running 10 s after the unmount"


@pytest.mark.fuse
def test_mount_t_fuse_cowfs_and_umount(layers: dict[str, Path], tmp_path: Path) -> None:
    need_mount_helper()
    populate(layers)
    mnt = layers["mnt"]
    # A wrapper first in PATH: mount(8) drops PATH, so it must NOT be what runs (see the module
    # docstring); the installed helper runs, with PYTHONPATH pointing at this checkout.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    marker = tmp_path / "wrapper-ran"
    wrapper = bindir / "cowfs"
    wrapper.write_text(f"#!/bin/sh\ntouch '{marker}'\nexit 1\n")
    wrapper.chmod(0o755)
    env = cowfs_env(PATH=f"{bindir}:{os.environ.get('PATH', SH_DEFAULT_PATH)}")
    with cleanup_mount(mnt):
        r = subprocess.run(
            ["mount", "-t", "fuse.cowfs", "mysource", str(mnt), "-o", rw_opts(layers)],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            stdin=subprocess.DEVNULL,
            cwd=tmp_path,
        )
        assert r.returncode == 0, r.stderr
        assert not marker.exists(), "mount(8) kept PATH: the test's wrapper ran"
        _check_served(mnt, layers, "mysource")
        r = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        _wait_unmounted_and_gone(mnt)


@pytest.mark.fuse
def test_mount_helper_error_reaches_mount(layers: dict[str, Path]) -> None:
    need_mount_helper()
    mnt = layers["mnt"]
    with cleanup_mount(mnt):
        r = subprocess.run(
            [
                "mount",
                "-t",
                "fuse.cowfs",
                "cowfs",
                str(mnt),
                "-o",
                f"lowerdir={layers['lower0']},writeback_cache",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env=cowfs_env(),
            stdin=subprocess.DEVNULL,
        )
        assert r.returncode != 0
        assert "writeback_cache" in r.stderr
        assert mountinfo(os.path.realpath(mnt)) == []


@pytest.mark.fuse
def test_mount_fuse3_with_path_wrapper_and_fusermount(
    layers: dict[str, Path], tmp_path: Path
) -> None:
    """What mount(8) runs, run directly: mount.fuse3 finds `cowfs` on PATH (it keeps PATH)."""
    helper = next(
        (p for p in ("/sbin/mount.fuse3", "/sbin/mount.fuse") if os.access(p, os.X_OK)), None
    )
    if helper is None:
        missing("/sbin/mount.fuse3 is missing (package fuse3)")
    populate(layers)
    mnt = layers["mnt"]
    bindir = tmp_path / "bin"
    bindir.mkdir()
    marker = tmp_path / "wrapper-ran"
    wrapper = bindir / "cowfs"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"echo \"$@\" > '{marker}'\n"
        f"PYTHONPATH='{REPO}' exec '{sys.executable}' -m cowfs \"$@\"\n"
    )
    wrapper.chmod(0o755)
    env = cowfs_env(PATH=f"{bindir}:{os.environ.get('PATH', SH_DEFAULT_PATH)}")
    with cleanup_mount(mnt):
        # The exact argument list libmount gives mount.fuse for `mount -t fuse.cowfs`.
        r = subprocess.run(
            [helper, "cowfs", str(mnt), "-o", "rw," + rw_opts(layers), "-t", "fuse.cowfs"],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        assert r.returncode == 0, r.stderr
        assert marker.read_text().split()[:2] == ["cowfs", str(mnt)]
        _check_served(mnt, layers, "cowfs")
        r = subprocess.run(
            ["fusermount3", "-u", str(mnt)], capture_output=True, text=True, timeout=30
        )
        assert r.returncode == 0, r.stderr
        _wait_unmounted_and_gone(mnt)


@pytest.mark.fuse
def test_fstab_line_with_mount_T(layers: dict[str, Path], tmp_path: Path) -> None:
    need_mount_helper()
    populate(layers)
    mnt = layers["mnt"]
    real = os.path.realpath(mnt)
    fstab = tmp_path / "fstab"
    fstab.write_text(
        "# cowfs test fstab\n"
        f"cowfs {real} fuse.cowfs defaults,nofail,x-cowfs.test,{rw_opts(layers)} 0 0\n"
    )
    with cleanup_mount(mnt):
        # cwd: libmount turns a source that names an existing relative path (./cowfs in the
        # repository) into an absolute path.
        r = subprocess.run(
            ["mount", "-T", str(fstab), real],
            capture_output=True,
            text=True,
            timeout=30,
            env=cowfs_env(),
            stdin=subprocess.DEVNULL,
            cwd=tmp_path,
        )
        assert r.returncode == 0, r.stderr
        _check_served(mnt, layers, "cowfs")
        r = subprocess.run(["umount", real], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        _wait_unmounted_and_gone(mnt)


# --------------------------------------------------------------------------- 5. signals


def _wait_served(real: str, mnt: Path, proc: subprocess.Popen[str]) -> None:
    wait_for(lambda: mountinfo(real) or proc.poll() is not None, 15, "the mount")
    assert proc.poll() is None, f"cowfs exited {proc.returncode}"
    # Answered requests mean pyfuse3.main() (and the signal watcher beside it) is running.
    assert (mnt / "top").read_text() == "from lower0\n"
    os.statvfs(mnt)


@pytest.mark.fuse
@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name
)
def test_foreground_signal_unmounts(layers: dict[str, Path], sig: signal.Signals) -> None:
    populate(layers)
    mnt = layers["mnt"]
    real = os.path.realpath(mnt)
    proc = subprocess.Popen(
        [*cowfs_cmd(), "-f", "-o", rw_opts(layers), str(mnt)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cowfs_env(),
    )
    try:
        _wait_served(real, mnt, proc)
        (mnt / "during").write_text("x")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        assert "Traceback" not in err, err
        assert mountinfo(real) == []
        assert (layers["upper"] / "during").read_text() == "x"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        unmount(mnt)


HARNESS = r"""
import ctypes, json, os, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER: the daemon becomes our child
    raise OSError(ctypes.get_errno(), "prctl")
r = subprocess.run(sys.argv[1:], capture_output=True, text=True, stdin=subprocess.DEVNULL)
with open(f"/proc/self/task/{os.getpid()}/children") as f:
    kids = [int(x) for x in f.read().split()]
print(json.dumps({"rc": r.returncode, "stderr": r.stderr, "kids": kids}), flush=True)
for k in kids:
    pid, status = os.waitpid(k, 0)
    print(json.dumps({"pid": pid, "code": os.waitstatus_to_exitcode(status)}), flush=True)
"""


def _readline(proc: subprocess.Popen[str], timeout: float) -> dict:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "harness said nothing"
    line = proc.stdout.readline()
    assert line, f"harness ended: {proc.stderr.read() if proc.stderr else ''}"
    return json.loads(line)


@pytest.mark.fuse
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_background_daemon_signal_unmounts(layers: dict[str, Path], sig: signal.Signals) -> None:
    """The default (background) mode: the command returns once mounted; the daemon it leaves
    behind unmounts and exits 0 on a signal (its status is collected by a subreaper harness)."""
    populate(layers)
    mnt = layers["mnt"]
    real = os.path.realpath(mnt)
    proc = subprocess.Popen(
        [sys.executable, "-c", HARNESS, *cowfs_cmd(), "-o", rw_opts(layers), str(mnt)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cowfs_env(),
    )
    try:
        first = _readline(proc, 30)
        assert first["rc"] == 0, first["stderr"]
        assert first["stderr"] == ""
        assert len(first["kids"]) == 1, f"expected one daemon, got {first['kids']}"
        (daemon,) = first["kids"]
        assert mountinfo(real)
        assert daemon in _mount_pids(str(mnt))
        assert (mnt / "top").read_text() == "from lower0\n"
        os.kill(daemon, sig)
        second = _readline(proc, 15)
        assert second == {"pid": daemon, "code": 0}
        assert mountinfo(real) == []
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        unmount(mnt)
        end_daemons(mnt, timeout=2)


@pytest.mark.fuse
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_just_after_mount_unmounts(
    layers: dict[str, Path], tmp_path: Path, sig: signal.Signals
) -> None:
    """Deterministic version of a race: the daemon's first log line after mounting goes to a full
    FIFO (a slow log sink), which holds it between the mount and its signal handling."""
    populate(layers)
    mnt = layers["mnt"]
    real = os.path.realpath(mnt)
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    wfd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    proc = None
    try:
        fcntl.fcntl(wfd, F_SETPIPE_SZ, 4096)
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(wfd, b"#" * 512)
        proc = subprocess.Popen(
            [*cowfs_cmd(), "-f", "--log", str(fifo), "-o", rw_opts(layers), str(mnt)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=cowfs_env(),
        )
        wait_for(lambda: mountinfo(real) or proc.poll() is not None, 15, "the mount")
        assert proc.poll() is None
        proc.send_signal(sig)
        os.close(wfd)
        wfd = -1
        deadline = time.monotonic() + 15
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError):
                os.read(rfd, 65536)  # let a daemon that survived go on logging
            time.sleep(0.01)
        assert proc.poll() == 0, f"daemon ended with {proc.poll()}"
        assert mountinfo(real) == [], "a dead mount was left behind"
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        for fd in (rfd, wfd):
            if fd >= 0:
                os.close(fd)
        unmount(mnt)
        end_daemons(mnt, timeout=2)


@pytest.mark.fuse
def test_daemon_does_not_pin_its_starting_directory(
    layers: dict[str, Path], tmp_path: Path
) -> None:
    populate(layers)
    fs = tmp_path / "somefs"
    fs.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "cowfs-test-tmpfs", str(fs)], check=True
    )
    mnt = layers["mnt"]
    try:
        with cleanup_mount(mnt):
            r = subprocess.run(
                [*cowfs_cmd(), "-o", rw_opts(layers), str(mnt)],
                cwd=fs,
                capture_output=True,
                text=True,
                timeout=30,
                env=cowfs_env(),
                stdin=subprocess.DEVNULL,
            )
            assert r.returncode == 0, r.stderr
            cwds = {pid: os.readlink(f"/proc/{pid}/cwd") for pid in _mount_pids(str(mnt))}
            r = subprocess.run(["umount", str(fs)], capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, f"{r.stderr.strip()} (daemon cwd: {cwds})"
    finally:
        unmount(fs)


# --------------------------------------------------------------------------- 6. mountinfo


@pytest.mark.fuse
@pytest.mark.parametrize("source", [None, "mysource", "/dev/not-a-device"])
def test_mountinfo_fstype_and_source(layers: dict[str, Path], source: str | None) -> None:
    populate(layers)
    mnt = layers["mnt"]
    real = os.path.realpath(mnt)
    with cleanup_mount(mnt):
        args = ([source] if source else []) + [str(mnt), "-o", rw_opts(layers)]
        r = run_cowfs(*args)
        assert r.returncode == 0, r.stderr
        assert r.stderr == "" and r.stdout == ""
        (info,) = mountinfo(real)
        assert info["fstype"] == "fuse.cowfs"
        assert info["source"] == (source or "cowfs")
        assert info["mount_options"].split(",")[0] == "rw"
        assert "default_permissions" in info["super_options"].split(",")


# --------------------------------------------------------------------------- 7. statfs, owners


@pytest.mark.fuse
def test_statfs_reports_the_upper_filesystem(layers: dict[str, Path]) -> None:
    populate(layers)
    with cowfs_mount(
        layers["mnt"], [layers["lower0"], layers["lower1"]], layers["upper"], layers["work"]
    ) as mnt:
        got, want = os.statvfs(mnt), os.statvfs(layers["upper"])
        assert got.f_bsize == want.f_bsize > 0
        assert got.f_blocks == want.f_blocks > 0
        assert got.f_files == want.f_files
        assert got.f_namemax == want.f_namemax
        assert abs(got.f_bavail - want.f_bavail) < want.f_blocks // 100 + 1024


def _as_nobody(cwd: Path, script: str) -> None:
    r = subprocess.run(
        ["/bin/sh", "-ec", script],
        cwd=cwd,
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        umask=0o022,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": SH_DEFAULT_PATH, "LANG": "C"},
    )
    assert r.returncode == 0, f"as uid {NOBODY}: {r.stderr}"


@pytest.mark.fuse
def test_non_root_creations_owned_by_caller(layers: dict[str, Path]) -> None:
    populate(layers)
    pub = layers["lower0"] / "pub"
    pub.mkdir()
    pub.chmod(0o1777)
    (pub / "old").write_text("old")  # to be replaced: the new one is built over a whiteout
    os.chown(pub / "old", NOBODY, NOBODY)
    with cowfs_mount(
        layers["mnt"], [layers["lower0"], layers["lower1"]], layers["upper"], layers["work"]
    ) as mnt:
        _as_nobody(
            mnt / "pub",
            "echo hi > file; mkdir dir; ln -s file link; mkfifo fifo;"
            ' rm old; mkdir old; test "$(id -u)" = 65534',
        )
        for name, kind in [
            ("file", stat.S_ISREG),
            ("dir", stat.S_ISDIR),
            ("link", stat.S_ISLNK),
            ("fifo", stat.S_ISFIFO),
            ("old", stat.S_ISDIR),
        ]:
            for where in (mnt / "pub", layers["upper"] / "pub"):
                st = os.lstat(where / name)
                assert kind(st.st_mode), (where, name)
                assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY), (where / name, st)
        assert stat.S_IMODE(os.stat(mnt / "pub" / "file").st_mode) == 0o644
        assert stat.S_IMODE(os.stat(mnt / "pub" / "dir").st_mode) == 0o755
        assert stat.S_IMODE(os.stat(mnt / "pub").st_mode) == 0o1777
        assert os.listdir(mnt / "pub" / "old") == []


def _setgid_dir(layers: dict[str, Path], gid: int) -> Path:
    """lower1/sg: root:gid, mode 2777, with an old directory and file owned by nobody."""
    populate(layers)
    sg = layers["lower1"] / "sg"
    sg.mkdir()
    os.chown(sg, 0, gid)
    sg.chmod(0o2777)
    (sg / "olddir").mkdir()
    os.chown(sg / "olddir", NOBODY, gid)
    (sg / "oldfile").write_text("x")
    os.chown(sg / "oldfile", NOBODY, gid)
    return sg


def _check_setgid_children(dirs: list[Path], names: list[str], gid: int) -> dict[str, object]:
    bad: dict[str, object] = {}
    for name in names:
        for where in dirs:
            st = os.lstat(where / name)
            if (st.st_uid, st.st_gid) != (NOBODY, gid):
                bad[str(where / name)] = (st.st_uid, st.st_gid)
            # mkdir in a setgid directory makes a setgid directory; files stay plain.
            if bool(st.st_mode & stat.S_ISGID) != stat.S_ISDIR(st.st_mode):
                bad[str(where / name)] = oct(st.st_mode)
    return bad


@pytest.mark.fuse
def test_setgid_directory_gives_its_group(layers: dict[str, Path]) -> None:
    gid = 4321
    _setgid_dir(layers, gid)
    with cowfs_mount(
        layers["mnt"], [layers["lower0"], layers["lower1"]], layers["upper"], layers["work"]
    ) as mnt:
        st = os.stat(mnt / "sg")
        assert st.st_gid == gid and st.st_mode & stat.S_ISGID
        # oldfile is re-created where a lower file was deleted (over a whiteout).
        _as_nobody(mnt / "sg", "echo hi > file; mkdir dir; rm oldfile; echo y > oldfile")
        bad = _check_setgid_children(
            [mnt / "sg", layers["upper"] / "sg"], ["file", "dir", "oldfile"], gid
        )
        assert bad == {}
        st = os.stat(layers["upper"] / "sg")  # the copied-up directory keeps its group and bit
        assert st.st_gid == gid and st.st_mode & stat.S_ISGID


@pytest.mark.fuse
def test_setgid_inherited_by_directory_made_over_whiteout(layers: dict[str, Path]) -> None:
    gid = 4321
    _setgid_dir(layers, gid)
    with cowfs_mount(
        layers["mnt"], [layers["lower0"], layers["lower1"]], layers["upper"], layers["work"]
    ) as mnt:
        _as_nobody(mnt / "sg", "rmdir olddir; mkdir olddir")
        bad = _check_setgid_children([mnt / "sg", layers["upper"] / "sg"], ["olddir"], gid)
    assert bad == {}


# --------------------------------------------------------------------------- 8. persistence


@pytest.mark.fuse
def test_changes_and_inode_numbers_survive_remount(layers: dict[str, Path]) -> None:
    populate(layers)
    lowers = [layers["lower0"], layers["lower1"]]
    up, work, mnt = layers["upper"], layers["work"], layers["mnt"]
    with cowfs_mount(mnt, lowers, up, work):
        ino_before = os.stat(mnt / "bottom").st_ino
        dir_ino_before = os.stat(mnt / "dir").st_ino
        with open(mnt / "bottom", "a") as f:  # copy-up
            f.write("appended\n")
        assert (up / "bottom").exists()
        ino_after = os.stat(mnt / "bottom").st_ino
        (mnt / "dir" / "added").write_text("added\n")  # copies up dir
        dir_ino_after = os.stat(mnt / "dir").st_ino
        (mnt / "new").write_text("new\n")
        new_ino = os.stat(mnt / "new").st_ino
        os.unlink(mnt / "top")
        os.rename(mnt / "shadowed", mnt / "moved")
        os.mkdir(mnt / "newdir")
        os.chmod(mnt / "dir" / "inner", 0o600)
        os.setxattr(mnt / "new", "user.k", b"v")
        os.symlink("new", mnt / "sym")
        with open(mnt / "new", "rb") as f:
            os.fsync(f.fileno())
    assert ino_after == ino_before, "copy-up changed st_ino"
    assert dir_ino_after == dir_ino_before, "directory copy-up changed st_ino"
    assert stat.S_ISCHR(os.lstat(up / "top").st_mode) and os.lstat(up / "top").st_rdev == 0
    with cowfs_mount(mnt, lowers, up, work):
        assert sorted(os.listdir(mnt)) == ["bottom", "dir", "moved", "new", "newdir", "sym"]
        assert (mnt / "bottom").read_text() == "from lower1\nappended\n"
        assert (mnt / "moved").read_text() == "lower0 wins\n"
        assert sorted(os.listdir(mnt / "dir")) == ["added", "inner", "sub"]
        assert (mnt / "dir" / "added").read_text() == "added\n"
        assert stat.S_IMODE(os.stat(mnt / "dir" / "inner").st_mode) == 0o600
        assert os.getxattr(mnt / "new", "user.k") == b"v"
        assert os.readlink(mnt / "sym") == "new"
        assert os.stat(mnt / "bottom").st_ino == ino_before, "st_ino changed across remount"
        assert os.stat(mnt / "dir").st_ino == dir_ino_before
        assert os.stat(mnt / "new").st_ino == new_ino
    # The lower layers were never written.
    assert (layers["lower1"] / "bottom").read_text() == "from lower1\n"
    assert (layers["lower0"] / "top").exists()
    assert (layers["lower0"] / "shadowed").exists()
