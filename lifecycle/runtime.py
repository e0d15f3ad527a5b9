"""Starting a container process: namespaces, the root filesystem, /proc and a minimal /dev, then
exec. Python 3.11 has no os.unshare, and the exit status must reach the monitor undistorted (the
`unshare --fork` of Debian 12 reports 1 for a SIGKILLed init, lifecycle-reference 2c), so this forks
twice itself: the first child joins the cgroup and unshares, the second is PID 1 of the new pid
namespace and is re-parented to the monitor (a child subreaper) when the first exits."""

from __future__ import annotations

import os
import socket
import stat
import sys
from dataclasses import dataclass

from lifecycle import _sys

__all__ = ["Spec", "spawn"]

DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Spec:
    rootfs: str
    argv: list[str]
    env: dict[str, str]
    workdir: str
    hostname: str
    stdout_fd: int
    stderr_fd: int
    cgroup_procs: str  # the cgroup.procs file to join


class StartError(Exception):
    """The container's command could not be started; `code` is Docker's (127 not found, 126 not
    executable)."""

    def __init__(self, msg: str, code: int) -> None:
        super().__init__(msg)
        self.code = code


def spawn(spec: Spec) -> int:
    """Start the container; returns its init's host pid once it has exec'd its command, or raises
    StartError with the reason it could not."""
    info_r, info_w = os.pipe()  # first child -> us: the init's pid
    err_r, err_w = os.pipe2(os.O_CLOEXEC)  # init -> us: why exec failed (EOF = it did exec)
    pid = os.fork()
    if pid == 0:  # first child
        try:
            os.close(info_r)
            os.close(err_r)
            with open(spec.cgroup_procs, "w") as f:
                f.write(f"{os.getpid()}\n")
            _sys.unshare(
                _sys.CLONE_NEWNS | _sys.CLONE_NEWPID | _sys.CLONE_NEWUTS | _sys.CLONE_NEWIPC
            )
            init = os.fork()
            if init == 0:
                os.close(info_w)
                _init(spec, err_w)  # never returns
            os.write(info_w, b"%d\n" % init)
            os._exit(0)
        except BaseException as e:  # noqa: BLE001 - report and die, never return into the monitor
            os.write(err_w, f"126 {e}".encode())
            os._exit(126)
    os.close(info_w)
    os.close(err_w)
    _, status = os.waitpid(pid, 0)
    data = b""
    while chunk := os.read(info_r, 64):
        data += chunk
    os.close(info_r)
    err = b""
    while chunk := os.read(err_r, 4096):
        err += chunk
    os.close(err_r)
    if err:
        code, _, msg = err.decode(errors="replace").partition(" ")
        raise StartError(msg, int(code))
    if os.waitstatus_to_exitcode(status) != 0 or not data.strip():
        raise StartError("container setup failed", 126)
    return int(data)


def _init(spec: Spec, err_w: int) -> None:
    """PID 1 of the container, until exec."""
    try:
        _setup_root(spec)
        socket.sethostname(spec.hostname)
        try:
            os.chdir(spec.workdir)
        except OSError as e:
            raise StartError(
                f"cannot chdir to working directory {spec.workdir}: {e.strerror}", 126
            ) from None
        devnull = os.open("/dev/null", os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(spec.stdout_fd, 1)
        os.dup2(spec.stderr_fd, 2)
        env = {"PATH": DEFAULT_PATH, "HOSTNAME": spec.hostname, "HOME": "/root"} | spec.env
        prog = _find(spec.argv[0], env["PATH"])
        os.execve(prog, spec.argv, env)
    except StartError as e:
        _fail(err_w, e.code, str(e))
    except BaseException as e:  # noqa: BLE001
        _fail(err_w, 126, str(e))


def _fail(err_w: int, code: int, msg: str) -> None:
    try:
        os.write(err_w, f"{code} {msg}".encode())
    finally:
        os._exit(code)


def _find(cmd: str, path: str) -> str:
    """PATH lookup inside the container, with Docker's codes: 127 not found, 126 not runnable."""
    candidates = [cmd] if "/" in cmd else [os.path.join(d, cmd) for d in path.split(":") if d]
    for c in candidates:
        try:
            st = os.stat(c)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) or not os.access(c, os.X_OK):
            raise StartError(f'exec: "{cmd}": permission denied', 126)
        return c
    where = "no such file or directory" if "/" in cmd else "executable file not found in $PATH"
    raise StartError(f'exec: "{cmd}": {where}', 127)


def _setup_root(spec: Spec) -> None:
    """Private mount propagation first (nothing we mount may leak to the host, and the host's
    unmounts must not reach in), then /proc and /dev, then pivot_root into the merged view."""
    _sys.mount("none", "/", None, _sys.MS_REC | _sys.MS_PRIVATE)
    root = spec.rootfs
    # pivot_root needs the new root to be a mount point of this namespace: bind it onto itself.
    _sys.mount(root, root, None, _sys.MS_BIND | _sys.MS_REC)
    for d in ("proc", "dev", "sys", "tmp"):
        p = os.path.join(root, d)
        if not os.path.lexists(p):
            os.mkdir(p, 0o755)
    _sys.mount("proc", f"{root}/proc", "proc", _sys.MS_NOSUID | _sys.MS_NODEV | _sys.MS_NOEXEC)
    dev = f"{root}/dev"
    _sys.mount("tmpfs", dev, "tmpfs", _sys.MS_NOSUID, "mode=755,size=65536k")
    for name in DEV_NODES:
        target = f"{dev}/{name}"
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o666))
        _sys.mount(f"/dev/{name}", target, None, _sys.MS_BIND)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, f"{dev}/{name}")
    os.mkdir(f"{dev}/shm", 0o1777)
    _sys.mount(
        "shm", f"{dev}/shm", "tmpfs", _sys.MS_NOSUID | _sys.MS_NODEV, "mode=1777,size=65536k"
    )
    os.mkdir(f"{dev}/pts", 0o755)
    os.chdir(root)
    _sys.pivot_root(".", ".")
    _sys.umount2(".", _sys.MNT_DETACH)
    os.chdir("/")


if __name__ == "__main__":  # pragma: no cover
    sys.exit("lifecycle.runtime is a library")
