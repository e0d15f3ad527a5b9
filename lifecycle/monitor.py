"""The per-container monitor (podman's conmon): a detached process that owns one container's cowfs
daemon and init process while it runs. It is a child subreaper, so it collects the init's real exit
status and records it in the state database even when no `cowctl` is running; it applies the
restart policy with Docker's backoff; and it tears the mount down when the container ends.

Started by `cowctl start` as `python -m lifecycle.monitor ROOT ID READY_FD` after a double fork; it
reports "OK" or "E<code> <message>" on READY_FD once the container's command has been exec'd."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
import time
from pathlib import Path
from typing import Any

from lifecycle import _sys, mounts, runtime
from lifecycle.cgroups import cgroup_for
from lifecycle.states import Status
from lifecycle.store import Store, now_iso

__all__ = ["main", "proc_start_time"]

BACKOFF_START = 0.1
BACKOFF_MAX = 60.0
BACKOFF_RESET_AFTER = 10.0


def proc_start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat: tells a live process from a new one that reused its pid; 0 for
    a process that is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0
    fields = data.rsplit(b")", 1)[1].split()
    if fields[0] in (b"Z", b"X"):
        return 0  # exited, waiting to be reaped (slow or never under some init processes)
    return int(fields[19])


def _log(msg: str) -> None:
    sys.stderr.write(f"{now_iso()} monitor[{os.getpid()}]: {msg}\n")
    sys.stderr.flush()


class Monitor:
    def __init__(self, root: Path, cid: str, ready_fd: int) -> None:
        self.store = Store(root)
        self.cid = cid
        self.ready_fd = ready_fd
        # Inherited through exec on purpose; the container and the daemon must not keep it open
        # or the starter would never see end-of-file.
        os.set_inheritable(ready_fd, False)
        self.dir = self.store.container_dir(cid)
        self.merged = self.dir / "merged"
        self.daemon = None
        self.init_pid = 0
        self.pipes: dict[int, str] = {}
        self.cgroup = cgroup_for(cid)

    def ready(self, msg: str) -> None:
        fd, self.ready_fd = self.ready_fd, -1
        if fd >= 0:
            try:
                os.write(fd, msg.encode())
            except BrokenPipeError:
                pass  # the starter is gone; the database has the news
            finally:
                os.close(fd)

    # ----------------------------------------------------------------- one run

    def _start(self) -> None:
        """Mount, then spawn the init; raises with a one-line reason on failure (all undone)."""
        c = self.store.get(self.cid)
        image = self.store.find_image(c.image_id)
        lowers = [self.store.layer_path(d) for d in reversed(image.layers)]
        for p in ("upper", "work", "merged"):
            (self.dir / p).mkdir(exist_ok=True)
        mounts.unmount(self.merged)  # a stale mount left by a crash
        if c.config.get("fs", "cowfs") == "overlay":
            # Kernel overlayfs over the same layers: the reference the benchmarks compare with.
            mounts.mount_overlay(lowers, self.dir / "upper", self.dir / "work", self.merged)
        else:
            self.daemon = mounts.start_daemon(
                f"cowctl:{self.cid[:12]}",
                lowers,
                self.dir / "upper",
                self.dir / "work",
                self.merged,
                self.dir / "cowfs.log",
            )
        try:
            self.cgroup.create()
            cfg = c.config
            # Pipes, not the log file: the monitor stamps each chunk with its stream and time
            # (Docker's json-file format), so `logs` can keep stdout and stderr apart.
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            self.pipes = {out_r: "stdout", err_r: "stderr"}
            try:
                spec = runtime.Spec(
                    rootfs=str(self.merged),
                    argv=cfg["cmd"],
                    env=dict(kv.split("=", 1) for kv in cfg.get("env", [])),
                    workdir=cfg.get("workdir") or "/",
                    hostname=self.cid[:12],
                    stdout_fd=out_w,
                    stderr_fd=err_w,
                    cgroup_procs=str(self.cgroup.path / "cgroup.procs"),
                )
                self.init_pid = runtime.spawn(spec)
            finally:
                os.close(out_w)
                os.close(err_w)
        except BaseException:
            self._close_pipes()
            self._teardown()
            raise

    def _close_pipes(self) -> None:
        for fd in self.pipes:
            os.close(fd)
        self.pipes = {}

    def _teardown(self) -> str:
        """Kill what is left, unmount, end the daemon. Returns an error worth recording, or ''."""
        problems = []
        try:
            self.cgroup.kill()
            self.cgroup.remove()
        except OSError as e:
            problems.append(f"cgroup: {e}")
        try:
            mounts.unmount(self.merged)
        except mounts.MountError as e:
            problems.append(str(e))
        if self.daemon is not None:
            try:
                self.daemon.wait(timeout=10)
            except Exception:  # noqa: BLE001 - a daemon that will not go is killed
                self.daemon.kill()
                self.daemon.wait()
            self.daemon = None
        return "; ".join(problems)

    def _wait(self) -> tuple[int, str]:
        """Relay the container's output to its log and wait for its init; (exit code, error).
        A daemon that dies first takes the container down with it: its root filesystem answers
        ENOTCONN from then on. SIGCHLD wakes the poll through a self-pipe."""
        error = ""
        code: int | None = None
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_fd = signal.set_wakeup_fd(wake_w)
        old_handler = signal.signal(signal.SIGCHLD, lambda *_: None)
        poller = select.poll()
        poller.register(wake_r, select.POLLIN)
        for fd in self.pipes:
            poller.register(fd, select.POLLIN)
        log = open(self.dir / "container.log", "ab", buffering=0)  # noqa: SIM115
        try:
            while code is None or self.pipes:
                # Once the init is gone, the pipes close when its last descendant does (the
                # kernel kills the rest of the pid namespace); do not wait forever for that.
                events = poller.poll(None if code is None else 2000)
                if not events and code is not None:
                    break
                for fd, _ in events:
                    if fd == wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(wake_r, 512)
                    elif fd in self.pipes:
                        data = os.read(fd, 65536)
                        if data:
                            _log_chunk(log, self.pipes[fd], data)
                        else:
                            poller.unregister(fd)
                            os.close(fd)
                            del self.pipes[fd]
                while True:  # reap everything that is ready: init, daemon, re-parented orphans
                    try:
                        pid, status = os.waitpid(-1, os.WNOHANG)
                    except ChildProcessError:
                        if code is None:
                            code, error = 255, error or "container process lost"
                        break
                    if pid == 0:
                        break
                    if pid == self.init_pid:
                        code = _exit_code(status)
                    elif self.daemon is not None and pid == self.daemon.pid:
                        self.daemon.returncode = os.waitstatus_to_exitcode(status)
                        self.daemon = None
                        error = (
                            f"cowfs daemon exited unexpectedly ({_describe(status)}); "
                            "container killed"
                        )
                        _log(error)
                        self.cgroup.kill()
        finally:
            log.close()
            self._close_pipes()
            signal.set_wakeup_fd(old_fd)
            signal.signal(signal.SIGCHLD, old_handler)
            os.close(wake_r)
            os.close(wake_w)
        return code if code is not None else 255, error

    # ----------------------------------------------------------------- the loop

    def run(self) -> None:
        delay = BACKOFF_START
        first = True
        while True:
            with self.store.tx():
                c = self.store.get(self.cid)
                if not first and (c.manually_stopped or c.status != Status.RESTARTING):
                    if c.status == Status.RESTARTING:  # stop or rm -f during the backoff
                        self.store.update(self.cid, status=Status.EXITED, monitor_pid=0)
                    return
                self.store.update(
                    self.cid,
                    monitor_pid=os.getpid(),
                    monitor_start=proc_start_time(os.getpid()),
                )
            try:
                self._start()
            except Exception as e:  # noqa: BLE001 - recorded, reported, never raised further
                code = e.code if isinstance(e, runtime.StartError) else 125
                msg = str(e)
                _log(f"start failed: {msg}")
                with self.store.tx():
                    self.store.update(
                        self.cid,
                        status=Status.EXITED,
                        pid=0,
                        monitor_pid=0,
                        exit_code=code,
                        error=msg,
                        finished_at=now_iso(),
                    )
                    self.store.event("container", "die", self.cid, exitCode=str(code), error=msg)
                self.ready(f"E{code} {msg}")
                return
            started = time.monotonic()
            with self.store.tx():
                c = self.store.get(self.cid)
                fields = dict(status=Status.RUNNING, pid=self.init_pid, exit_code=0, error="")
                fields["daemon_pid"] = self.daemon.pid if self.daemon else 0
                if first or c.started_at.startswith("0001"):
                    fields["started_at"] = now_iso()
                self.store.update(self.cid, **fields)
                if not first:
                    self.store.event("container", "restart", self.cid)
                self.store.event("container", "start", self.cid, name=c.name)
            self.ready("OK")
            first = False
            code, error = self._wait()
            ran = time.monotonic() - started
            problem = self._teardown()
            error = "; ".join(x for x in (error, problem) if x)
            with self.store.tx():
                c = self.store.get(self.cid)
                restart = _should_restart(c.config.get("restart", "no"), code, c.restart_count)
                restart = restart and not c.manually_stopped and not error
                fields = dict(
                    pid=0, exit_code=code, error=error, finished_at=now_iso(), daemon_pid=0
                )
                if restart:
                    delay = BACKOFF_START if ran >= BACKOFF_RESET_AFTER else delay
                    fields.update(status=Status.RESTARTING, restart_count=c.restart_count + 1)
                else:
                    fields.update(status=Status.EXITED, monitor_pid=0)
                self.store.update(self.cid, **fields)
                self.store.event("container", "die", self.cid, exitCode=str(code), name=c.name)
            if not restart:
                if c.config.get("auto_remove"):
                    from lifecycle.controller import remove_files

                    remove_files(self.store, self.cid)
                return
            self._backoff(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    def _backoff(self, delay: float) -> None:
        """Sleep, but wake early when `stop` or `rm -f` cancels the restart."""
        end = time.monotonic() + delay
        while time.monotonic() < end:
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))
            c = self.store.get(self.cid)
            if c.manually_stopped or c.status != Status.RESTARTING:
                return


def _log_chunk(log: Any, stream: str, data: bytes) -> None:
    """One JSON line per output line (a trailing partial line is a record of its own), as
    Docker's json-file driver writes them; one write per chunk, so readers never see half a
    record once they read up to a newline."""
    t = now_iso()
    text = data.decode("utf-8", errors="replace")
    lines = text.splitlines(keepends=True)
    out = "".join(
        json.dumps({"log": line, "stream": stream, "time": t}, ensure_ascii=False) + "\n"
        for line in lines
    )
    log.write(out.encode())


def _should_restart(policy: str, code: int, count: int) -> bool:
    name, _, arg = policy.partition(":")
    if name in ("always", "unless-stopped"):
        return True
    if name == "on-failure":
        return code != 0 and (not arg or int(arg) == 0 or count < int(arg))
    return False


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _describe(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"signal {-code}" if code < 0 else f"exit status {code}"


def main(argv: list[str]) -> int:
    root, cid, ready_fd = Path(argv[0]), argv[1], int(argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _sys.set_child_subreaper()
    m = None
    try:
        m = Monitor(root, cid, ready_fd)
        m.run()
    except Exception as e:  # noqa: BLE001 - the last word goes to the log and the starter
        _log(f"monitor failed: {e!r}")
        if m is not None:
            m.ready(f"E125 monitor failed: {e}")
            m._teardown()
        else:
            os.write(ready_fd, f"E125 monitor failed: {e}".encode())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
