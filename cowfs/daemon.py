"""One mount's life: open and check the layers, mount, serve until unmounted or signalled, clean up.

In the background mode the checks run in the calling process, so a bad option or path fails the
command itself; the forked daemon reports through a pipe whether the mount succeeded, and the
command returns only then.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import resource
import signal
import stat
import tempfile

from cowfs.errors import EXIT_MOUNT, EXIT_PATH, UserError
from cowfs.layers import LayerStack
from cowfs.options import MountConfig

__all__ = ["check_mountpoint", "mount"]

log = logging.getLogger(__name__)
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def check_mountpoint(path: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"mount point {path!r} does not exist", EXIT_PATH) from None
    except OSError as e:
        raise UserError(f"mount point {path!r}: {e.strerror}", EXIT_PATH) from None
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"mount point {path!r} is not a directory", EXIT_PATH)
    if os.path.ismount(path):
        raise UserError(
            f"mount point {path!r} is busy: something is already mounted there", EXIT_MOUNT
        )


def fuse_option_set(config: MountConfig, fsname: str) -> set[str]:
    opts = set(config.fuse_options)
    opts.add("default_permissions")  # the kernel checks permissions, as on overlayfs
    if not config.writable:
        opts.add("ro")  # the kernel then refuses writes itself, as on a read-only overlayfs
    if not any(o.startswith("fsname=") for o in opts):
        opts.add("fsname=" + fsname.replace("\\", "\\\\").replace(",", "\\,"))
    if not any(o.startswith("subtype=") for o in opts):
        opts.add("subtype=cowfs")
    if os.geteuid() == 0:
        # Mounted by root for others (container root filesystems): like kernel overlayfs, let
        # everyone in, and keep setuid binaries and device nodes working unless told otherwise.
        if "allow_root" not in opts:
            opts.add("allow_other")
        if "nosuid" not in opts:
            opts.add("suid")
        if "nodev" not in opts:
            opts.add("dev")
    return opts


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open("/proc/sys/fs/nr_open") as f:
            want = int(f.read())
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    except (OSError, ValueError):
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def mount(
    config: MountConfig, mountpoint: str, fsname: str, foreground: bool, debug_fuse: bool = False
) -> int:
    """Mount and serve. Returns the process exit code (in the background mode, the caller's)."""
    check_mountpoint(mountpoint)
    stack = LayerStack.open(config)
    mountpoint = os.path.abspath(mountpoint)
    opts = fuse_option_set(config, fsname)
    if debug_fuse:
        opts.add("debug")
    if foreground:
        return _serve(stack, mountpoint, opts, None)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(rfd)
        os.setsid()
        os.chdir("/")  # never pin the directory we were started from
        code = 1
        try:
            code = _serve(stack, mountpoint, opts, wfd)
        except UserError as e:
            _report(wfd, f"E{e.exit_code}:{e}")
        except BaseException as e:  # noqa: BLE001 - reported to the waiting parent
            _report(wfd, f"E1:{type(e).__name__}: {e}")
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        msg = r.read().decode(errors="replace")
    if msg == "OK":
        return 0
    os.waitpid(pid, 0)
    if msg.startswith("E") and ":" in msg:
        code_s, _, text = msg[1:].partition(":")
        raise UserError(text, int(code_s))
    raise UserError("cowfs daemon exited before the mount was ready", EXIT_MOUNT)


def _report(wfd: int | None, msg: str) -> None:
    if wfd is None:
        return
    with contextlib.suppress(OSError):
        os.write(wfd, msg.encode())
        os.close(wfd)


def _serve(stack: LayerStack, mountpoint: str, opts: set[str], ready_fd: int | None) -> int:
    import pyfuse3
    import trio

    from cowfs.engine import UnionFS
    from cowfs.fuse_ops import Operations

    _raise_fd_limit()
    os.umask(0)  # the kernel has already applied the caller's umask to every mode we get
    faulthandler.enable()
    with contextlib.suppress(AttributeError, ValueError):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    fs = UnionFS(stack)
    ops = Operations(fs)
    # Until the trio signal receiver runs, a SIGTERM/SIGINT would kill us with the mount up:
    # hold them back (they stay pending) until then.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    # libfuse explains a refusal on stderr: catch that line for our own one-line error.
    saved_err = os.dup(2)
    with tempfile.TemporaryFile() as errf:
        os.dup2(errf.fileno(), 2)
        try:
            pyfuse3.init(ops, mountpoint, opts)
        except RuntimeError as e:
            os.dup2(saved_err, 2)
            errf.seek(0)
            lines = [ln.strip() for ln in errf.read().decode(errors="replace").splitlines()]
            why = next((ln for ln in reversed(lines) if ln), str(e))
            fs.close()
            stack.close()
            raise UserError(f"mounting {mountpoint!r} failed: {why}", EXIT_MOUNT) from None
        finally:
            os.dup2(saved_err, 2)
            os.close(saved_err)
    log.info("mounted %s", mountpoint)
    if ready_fd is not None:
        # Nothing else may write to the terminal of the command that started us.
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        _report(ready_fd, "OK")

    async def run() -> None:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                with trio.open_signal_receiver(*_STOP_SIGNALS) as it:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
                    async for signum in it:
                        log.info("signal %d: unmounting", signum)
                        pyfuse3.terminate()
                        return

            nursery.start_soon(on_signal)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    code = 0
    try:
        trio.run(run)
    except BaseException:
        log.exception("cowfs daemon failed")
        code = 1
    finally:
        pyfuse3.close(unmount=True)
        fs.close()
        stack.close()
    if ops.internal_errors:
        log.error("%d internal errors while mounted", ops.internal_errors)
    return code
