"""Executing the verbs: check the transition table, record the intent, act, record the result.
Every command first reconciles the database with the machine (dead monitors, stale or leftover
mounts, half-done transitions), so the state it acts on is the real one."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import select
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lifecycle import mounts, states
from lifecycle.cgroups import FreezeTimeout, cgroup_for
from lifecycle.errors import CtlError, NotFound
from lifecycle.monitor import proc_start_time
from lifecycle.states import Status, Verb
from lifecycle.store import ZERO_TIME, Container, Image, Store, now_iso, split_ref

__all__ = ["Controller", "remove_files", "DEFAULT_ROOT"]

DEFAULT_ROOT = Path("/var/lib/cowfs")
FREEZE_TIMEOUT = float(os.environ.get("COWCTL_FREEZE_TIMEOUT", "5"))
START_TIMEOUT = 60.0

_ADJ = [
    "brave",
    "calm",
    "eager",
    "fancy",
    "gentle",
    "happy",
    "jolly",
    "keen",
    "lucid",
    "merry",
    "nifty",
    "proud",
    "quirky",
    "sharp",
    "witty",
    "zen",
]
_NOUN = [
    "babbage",
    "curie",
    "darwin",
    "euler",
    "fermi",
    "galois",
    "hopper",
    "knuth",
    "lovelace",
    "noether",
    "pascal",
    "ritchie",
    "turing",
]


def _alive(pid: int, start: int) -> bool:
    return pid > 0 and proc_start_time(pid) == start and start != 0


def remove_files(store: Store, cid: str) -> None:
    """The last step of rm: nothing mounted, the upper gone, the row and the name freed."""
    d = store.container_dir(cid)
    mounts.unmount(d / "merged")
    try:
        cgroup_for(cid).remove()
    except OSError:
        pass
    if d.exists():
        shutil.rmtree(d)
    with store.tx():
        try:
            c = store.get(cid)
        except CtlError:
            return
        store.delete(cid)
        store.event("container", "destroy", cid, name=c.name)


class Controller:
    def __init__(self, root: Path) -> None:
        self.store = Store(root)
        self.reconcile()

    # ================================================================ recovery

    def reconcile(self) -> None:
        """Make every record honest: a container recorded as active whose monitor is gone is
        killed, unmounted and marked exited with an error; leftovers of interrupted starts and
        removals are cleaned. Nothing here deletes upper data of a live container."""
        mounted = mounts.mount_table()  # read once, not once per container
        for c in self.store.containers():
            try:
                self._reconcile_one(c, mounted)
            except CtlError:
                raise
            except Exception as e:  # noqa: BLE001 - one broken container must not block the rest
                print(f"cowctl: warning: cannot reconcile {c.id[:12]}: {e}", file=sys.stderr)

    def _reconcile_one(self, c: Container, mounted: dict[str, str]) -> None:
        merged = self.store.container_dir(c.id) / "merged"
        monitor_alive = _alive(c.monitor_pid, c.monitor_start)
        if c.status == Status.REMOVING:
            if not monitor_alive:
                self._finish_remove(c, stop_first=True)
            return
        if states.is_active(c.status):
            if monitor_alive:
                if c.status in (Status.RUNNING, Status.PAUSED):
                    frozen = cgroup_for(c.id).is_frozen()
                    want = Status.PAUSED if frozen else Status.RUNNING
                    if want != c.status:
                        with self.store.tx():
                            self.store.update(c.id, status=want)
                return
            # The monitor is gone: nobody will collect the exit status or tear down.
            self._kill_tree(c)
            with self.store.tx():
                cur = self.store.get(c.id)
                if cur.monitor_pid == c.monitor_pid and states.is_active(cur.status):
                    self.store.update(
                        c.id,
                        status=Status.EXITED,
                        pid=0,
                        monitor_pid=0,
                        daemon_pid=0,
                        exit_code=137 if c.pid else 255,
                        error="container monitor died; the container was stopped by recovery",
                        finished_at=now_iso(),
                    )
                    self.store.event("container", "die", c.id, exitCode="137", name=c.name)
            return
        # created / exited / dead: nothing should be mounted unless a start is under way.
        if not monitor_alive:
            if c.monitor_pid:
                with self.store.tx():
                    self.store.update(c.id, monitor_pid=0, monitor_start=0)
            if os.path.realpath(merged) in mounted:
                self._kill_tree(c)

    def _kill_tree(self, c: Container) -> None:
        cg = cgroup_for(c.id)
        cg.kill()
        _wait_until(lambda: not cg.pids(), 5.0)
        try:
            cg.remove()
        except OSError:
            pass
        d = self.store.container_dir(c.id)
        mounts.unmount(d / "merged")
        if c.daemon_pid and _cmdline_has(c.daemon_pid, str(d / "merged")):
            try:
                os.kill(c.daemon_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # ================================================================ images

    def image_import(self, paths: list[Path], ref: str, cmd: list[str] | None = None) -> Image:
        from lifecycle import layerstore

        name, tag = split_ref(ref)
        infos = []
        for p in paths:
            if not p.exists():
                raise CtlError(f"image import: {p}: no such file or directory")
            try:
                if p.is_dir():
                    info = layerstore.import_dir(p, self.store.layers_dir)
                else:
                    info = layerstore.import_tar(p, self.store.layers_dir)
            except layerstore.LayerError as e:
                raise CtlError(f"image import: {e}") from None
            infos.append(info)
        config = {"cmd": cmd or ["/bin/sh"], "env": [], "workdir": "/"}
        digests = [i.digest for i in infos]
        h = hashlib.sha256(json.dumps({"layers": digests, "config": config}).encode())
        image = Image("sha256:" + h.hexdigest(), name, tag, now_iso(), config, digests)
        with self.store.tx():
            for i in infos:
                self.store.add_layer(i.digest, i.size_bytes, i.files)
            try:
                old = self.store.find_image(f"{name}:{tag}")
            except CtlError:
                old = None
            if old is not None:
                if old.id == image.id:
                    return old
                if self.store.image_users(old.id):
                    raise CtlError(
                        f"image {name}:{tag} is in use by a container; remove the container first"
                    )
                self.store.remove_image(old)
            self.store.add_image(image)
            self.store.event("image", "import", image.id, name=image.ref)
        return image

    def images(self) -> list[Image]:
        return self.store.images()

    def image_rm(self, ref: str) -> list[str]:
        from lifecycle import layerstore

        with self.store.tx():
            image = self.store.find_image(ref)
            users = self.store.image_users(image.id)
            if users:
                raise CtlError(
                    f'conflict: unable to remove repository reference "{ref}" (must force) - '
                    f"container {users[0][:12]} is using its referenced image {image.id[7:19]}"
                )
            orphans = self.store.remove_image(image)
            self.store.event("image", "delete", image.id, name=image.ref)
        for d in orphans:
            layerstore.remove_layer(self.store.layers_dir, d)
        return [f"Untagged: {image.ref}", f"Deleted: {image.id}"] + [
            f"Deleted: {d}" for d in orphans
        ]

    # ================================================================ containers

    def find(self, ref: str) -> Container:
        return self.store.find(ref)

    def create(
        self,
        image_ref: str,
        cmd: list[str],
        name: str | None = None,
        env: list[str] | None = None,
        workdir: str | None = None,
        restart: str = "no",
        auto_remove: bool = False,
        fs: str = "cowfs",
    ) -> Container:
        _check_restart_policy(restart, auto_remove)
        if fs not in ("cowfs", "overlay"):
            raise CtlError(f"unknown storage driver {fs!r} (cowfs or overlay)")
        for kv in env or []:
            if "=" not in kv or kv.startswith("="):
                raise CtlError(f"invalid environment variable: {kv} (expected KEY=VALUE)")
        if workdir is not None and not workdir.startswith("/"):
            raise CtlError(
                f"the working directory '{workdir}' is invalid, it needs to be an absolute path"
            )
        if name is not None and not _valid_name(name):
            raise CtlError(
                f"Invalid container name ({name}), only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"
            )
        image = self.store.find_image(image_ref)
        cid = secrets.token_hex(32)
        config = {
            "cmd": cmd or image.config.get("cmd") or ["/bin/sh"],
            "env": list(image.config.get("env", [])) + list(env or []),
            "workdir": workdir or image.config.get("workdir") or "/",
            "restart": restart,
            "auto_remove": auto_remove,
            "image_ref": image_ref,
            "fs": fs,
        }
        d = self.store.container_dir(cid)
        with self.store.tx():
            if name is None:
                name = self._random_name()
            other = self.store.name_taken(name)
            if other:
                raise CtlError(
                    f'Conflict. The container name "/{name}" is already in use by container '
                    f'"{other}". You have to remove (or rename) that container to be able to reuse that name.'
                )
            for sub in ("upper", "work", "merged"):
                (d / sub).mkdir(parents=True, exist_ok=True)
            c = Container(
                cid,
                name,
                image.id,
                config,
                Status.CREATED,
                0,
                0,
                0,
                0,
                0,
                "",
                now_iso(),
                ZERO_TIME,
                ZERO_TIME,
                0,
                False,
                0,
            )
            self.store.insert(c)
            self.store.event("container", "create", cid, name=name, image=image.ref)
        return self.store.get(cid)

    def _random_name(self) -> str:
        while True:
            n = f"{secrets.choice(_ADJ)}_{secrets.choice(_NOUN)}"
            if not self.store.name_taken(n):
                return n
            n += str(secrets.randbelow(100))
            if not self.store.name_taken(n):
                return n

    def _plan(self, verb: Verb, c: Container) -> states.Plan:
        try:
            return states.plan(verb, c.status, c.id, c.name)
        except states.InvalidTransition as e:
            raise CtlError(str(e)) from None

    def start(self, ref: str) -> Container:
        with self.store.tx():
            c = self.store.find(ref)
            p = self._plan(Verb.START, c)
            if p.noop:
                return c
            if _alive(c.monitor_pid, c.monitor_start):
                raise CtlError(f"container {c.id} is being started by another command")
            # Our pid holds the start until the monitor writes its own (see reconcile).
            self.store.update(
                c.id,
                monitor_pid=os.getpid(),
                monitor_start=proc_start_time(os.getpid()),
                manually_stopped=False,
                restart_count=0,
            )
        msg = self._spawn_monitor(c.id)
        if msg != "OK":
            code_s, _, text = msg[1:].partition(" ")
            raise CtlError(
                f"failed to start container {c.name}: {text}",
                125 if code_s == "125" else int(code_s),
            )
        try:
            return self.store.get(c.id)
        except NotFound:
            return c  # it already ran and was removed (--rm)

    def _spawn_monitor(self, cid: str) -> str:
        r, w = os.pipe()
        log = os.open(
            self.store.container_dir(cid) / "monitor.log",
            os.O_WRONLY | os.O_APPEND | os.O_CREAT,
            0o640,
        )
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                os.set_inheritable(w, True)
                os.setsid()
                if os.fork() != 0:
                    os._exit(0)
                devnull = os.open("/dev/null", os.O_RDWR)
                os.dup2(devnull, 0)
                os.dup2(log, 1)
                os.dup2(log, 2)
                os.chdir("/")
                os.execv(
                    sys.executable,
                    [sys.executable, "-m", "lifecycle.monitor", str(self.store.root), cid, str(w)],
                )
            finally:
                os._exit(127)
        os.close(w)
        os.close(log)
        os.waitpid(pid, 0)
        data = b""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(r, 4096)
            if not chunk:
                break
            data += chunk
            if data.startswith(b"OK") or data.startswith(b"E"):
                break  # one write carries the whole message
        os.close(r)
        if not data:
            return "E125 the container monitor died before the container started (see monitor.log)"
        return data.decode(errors="replace")

    def _signal(self, c: Container, sig: int) -> None:
        if c.pid:
            try:
                os.kill(c.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, ref: str, timeout: float | None = None, sig: int = signal.SIGTERM) -> Container:
        with self.store.tx():
            c = self.store.find(ref)
            p = self._plan(Verb.STOP, c)
            if p.noop:
                return c
            self.store.update(c.id, manually_stopped=True)
        self.store.event_tx("container", "kill", c.id, signal=str(int(sig)))
        self._signal(c, sig)
        cg = cgroup_for(c.id)
        if c.status == Status.PAUSED:
            cg.thaw()
        t = 10.0 if timeout is None else timeout
        if t < 0 or not self._wait_stopped(c, t):
            if t >= 0:
                self.store.event_tx("container", "kill", c.id, signal="9")
                cg.kill()
            self._wait_stopped(c, 30.0)
        self.store.event_tx("container", "stop", c.id, name=c.name)
        return self.store.get(c.id)

    def _wait_stopped(self, c: Container, timeout: float) -> bool:
        """Until the monitor has recorded the exit and torn the mount down (it then exits)."""
        if not _alive(c.monitor_pid, c.monitor_start):
            return True
        try:
            fd = os.pidfd_open(c.monitor_pid)
        except ProcessLookupError:
            return True
        try:
            if not _alive(c.monitor_pid, c.monitor_start):
                return True
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            return bool(poller.poll(None if timeout < 0 else timeout * 1000))
        finally:
            os.close(fd)

    def kill(self, ref: str, sig: int = signal.SIGKILL) -> Container:
        c = self.store.find(ref)
        self._plan(Verb.KILL, c)
        self.store.event_tx("container", "kill", c.id, signal=str(int(sig)))
        if c.status == Status.RESTARTING:
            with self.store.tx():
                self.store.update(c.id, manually_stopped=True)
            self._wait_stopped(c, 30.0)
            return self.store.get(c.id)
        self._signal(c, sig)
        if sig == signal.SIGKILL:
            cgroup_for(c.id).kill()
            self._wait_stopped(c, 30.0)
        return self.store.get(c.id)

    def pause(self, ref: str) -> Container:
        with self.store.tx():
            c = self.store.find(ref)
            self._plan(Verb.PAUSE, c)
            try:
                cgroup_for(c.id).freeze(FREEZE_TIMEOUT)
            except FreezeTimeout as e:
                raise CtlError(f"cannot pause container {c.id}: {e} (thawed again)") from None
            self.store.update(c.id, status=Status.PAUSED)
            self.store.event("container", "pause", c.id, name=c.name)
        return self.store.get(c.id)

    def unpause(self, ref: str) -> Container:
        with self.store.tx():
            c = self.store.find(ref)
            self._plan(Verb.UNPAUSE, c)
            cgroup_for(c.id).thaw()
            self.store.update(c.id, status=Status.RUNNING)
            self.store.event("container", "unpause", c.id, name=c.name)
        return self.store.get(c.id)

    def restart(self, ref: str, timeout: float | None = None) -> Container:
        c = self.store.find(ref)
        p = self._plan(Verb.RESTART, c)
        if p.action == "stop+start":
            self.stop(c.id, timeout)
        c = self.start(c.id)
        self.store.event_tx("container", "restart", c.id, name=c.name)
        return c

    def rm(self, ref: str, force: bool = False) -> str:
        with self.store.tx():
            c = self.store.find(ref)
            p = self._plan(Verb.RM_FORCE if force else Verb.RM, c)
            if p.action == "kill+remove":
                self.store.update(c.id, manually_stopped=True)
            else:
                self.store.update(c.id, status=Status.REMOVING)
        if p.action == "kill+remove":
            self._signal(c, signal.SIGKILL)
            cgroup_for(c.id).kill()
            self._wait_stopped(c, 30.0)
            with self.store.tx():
                self.store.update(c.id, status=Status.REMOVING)
        self._finish_remove(self.store.get(c.id), stop_first=False)
        return c.name

    def _finish_remove(self, c: Container, stop_first: bool) -> None:
        try:
            if stop_first:
                self._kill_tree(c)
            remove_files(self.store, c.id)
        except (OSError, mounts.MountError) as e:
            with self.store.tx():
                self.store.update(
                    c.id, status=Status.DEAD, error=f"unable to remove filesystem: {e}"
                )
            raise CtlError(f"unable to remove container {c.name}: {e}") from None

    # ================================================================ queries

    def wait(self, ref: str) -> int:
        try:
            c = self.store.find(ref)
        except NotFound:
            code = self.store.last_exit_code(ref)  # a full id removed after exiting (--rm)
            if code is None:
                raise
            return code
        while True:
            try:
                c = self.store.get(c.id)
            except NotFound:
                # Removed after exiting (--rm): its last "die" event has the code.
                code = self.store.last_exit_code(c.id)
                if code is None:
                    raise
                return code
            if c.status in (Status.EXITED, Status.DEAD, Status.CREATED) and not _alive(
                c.monitor_pid, c.monitor_start
            ):
                return c.exit_code
            if not self._wait_stopped(c, 0.2):
                continue
            self.reconcile()

    def log_path(self, cid: str) -> Path:
        return self.store.container_dir(cid) / "container.log"

    def open_log(self, cid: str) -> Any:
        """The log, created if need be, so that `run` can hold it open before the start: a
        container that exits (and is removed, with --rm) at once still has its output read."""
        fd = os.open(self.log_path(cid), os.O_RDONLY | os.O_CREAT, 0o640)
        return os.fdopen(fd, "rb")

    def logs(self, ref: str, follow: bool = False) -> Iterator[tuple[str, str, bytes]]:
        c = self.store.find(ref)
        try:
            f = open(self.log_path(c.id), "rb")  # noqa: SIM115 - closed by stream()
        except FileNotFoundError:
            return
        yield from self.stream(f, c.id, follow)

    def stream(self, f: Any, cid: str, follow: bool) -> Iterator[tuple[str, str, bytes]]:
        """(stream, time, data) records of a json-file log; with `follow`, until the container
        has stopped and its monitor has written the last of its output."""
        buf = b""
        try:
            while True:
                chunk = f.read(65536)
                if chunk:
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        if line.strip():
                            rec = json.loads(line)
                            yield rec["stream"], rec["time"], rec["log"].encode()
                    continue
                if not follow:
                    return
                try:
                    cur = self.store.get(cid)
                except NotFound:
                    cur = None  # removed (--rm): the open file still has everything
                if cur is None or (
                    not states.is_active(cur.status)
                    and not _alive(cur.monitor_pid, cur.monitor_start)
                ):
                    follow = False  # one more read for what came in meanwhile
                    continue
                time.sleep(0.05)
        finally:
            f.close()

    def paths(self, c: Container) -> dict[str, str]:
        image = self.store.find_image(c.image_id)
        d = self.store.container_dir(c.id)
        return {
            "LowerDir": ":".join(str(self.store.layer_path(x)) for x in reversed(image.layers)),
            "UpperDir": str(d / "upper"),
            "WorkDir": str(d / "work"),
            "MergedDir": str(d / "merged"),
        }

    def inspect(self, c: Container) -> dict[str, Any]:
        image = self.store.find_image(c.image_id)
        name, _, arg = c.config.get("restart", "no").partition(":")
        s = c.status
        cg = cgroup_for(c.id)
        return {
            "Id": c.id,
            "Created": c.created,
            "Path": c.config["cmd"][0],
            "Args": c.config["cmd"][1:],
            "State": {
                "Status": s.value,
                "Running": s in (Status.RUNNING, Status.PAUSED, Status.RESTARTING),
                "Paused": s == Status.PAUSED,
                "Restarting": s == Status.RESTARTING,
                "OOMKilled": False,
                "Dead": s == Status.DEAD,
                "Pid": c.pid if s in (Status.RUNNING, Status.PAUSED) else 0,
                "ExitCode": c.exit_code,
                "Error": c.error,
                "StartedAt": c.started_at,
                "FinishedAt": c.finished_at,
            },
            "Image": image.id,
            "Name": "/" + c.name,
            "RestartCount": c.restart_count,
            "Driver": c.config.get("fs", "cowfs"),
            "LogPath": str(self.store.container_dir(c.id) / "container.log"),
            "HostConfig": {
                "RestartPolicy": {"Name": name, "MaximumRetryCount": int(arg or 0)},
                "AutoRemove": bool(c.config.get("auto_remove")),
            },
            "Config": {
                "Hostname": c.id[:12],
                "Env": c.config.get("env", []),
                "Cmd": c.config["cmd"],
                "WorkingDir": c.config.get("workdir", "/"),
                "Image": c.config.get("image_ref", image.ref),
            },
            "GraphDriver": {"Name": c.config.get("fs", "cowfs"), "Data": self.paths(c)},
            "Cgroup": str(cg.path),
            "MonitorPid": c.monitor_pid,
            "DaemonPid": c.daemon_pid,
        }

    def diff(self, ref: str) -> list[tuple[str, str]]:
        from lifecycle import changes

        c = self.store.find(ref)
        image = self.store.find_image(c.image_id)
        lowers = [self.store.layer_path(x) for x in reversed(image.layers)]
        return changes.changes(self.store.container_dir(c.id) / "upper", lowers)

    def df(self) -> dict[str, Any]:
        """Images' bytes counted once however many containers and images share a layer; each
        container's own bytes are its upper, exactly."""
        from lifecycle import changes

        images = self.store.images()
        cons = self.store.containers()
        layer_size = {
            d: changes.disk_usage([self.store.layer_path(d)])
            for d in {x for i in images for x in i.layers}
        }
        users: dict[str, int] = {}
        for i in images:
            for d in set(i.layers):
                users[d] = users.get(d, 0) + 1
        used_images = {c.image_id for c in cons}
        image_rows = []
        for i in images:
            own = sorted(set(i.layers))
            unique = sum(layer_size[d] for d in own if users[d] == 1)
            image_rows.append(
                {
                    "ref": i.ref,
                    "id": i.id,
                    "size": sum(layer_size[d] for d in own),
                    "shared": sum(layer_size[d] for d in own if users[d] > 1),
                    "unique": unique,
                    "containers": sum(1 for c in cons if c.image_id == i.id),
                }
            )
        con_rows = [
            {
                "id": c.id,
                "name": c.name,
                "image": c.config.get("image_ref", ""),
                "status": c.status.value,
                "size": changes.disk_usage([self.store.container_dir(c.id) / "upper"]),
            }
            for c in cons
        ]
        total_layers = sum(layer_size.values())
        reclaim_images = sum(
            layer_size[d]
            for d in layer_size
            if not any(d in i.layers for i in images if i.id in used_images)
        )
        return {
            "images": image_rows,
            "containers": con_rows,
            "layers_bytes": total_layers,
            "images_reclaimable": reclaim_images,
            "images_active": len(used_images),
            "containers_active": sum(1 for c in cons if states.is_active(c.status)),
            "containers_bytes": sum(r["size"] for r in con_rows),
            "containers_reclaimable": sum(
                r["size"]
                for r, c in zip(con_rows, cons, strict=True)
                if not states.is_active(c.status)
            ),
        }


def _wait_until(cond: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _cmdline_has(pid: int, arg: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return os.fsencode(arg) in f.read().split(b"\0")
    except OSError:
        return False


def _valid_name(name: str) -> bool:
    return re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*", name) is not None


def _check_restart_policy(policy: str, auto_remove: bool) -> None:
    name, sep, arg = policy.partition(":")
    if name not in ("no", "always", "unless-stopped", "on-failure"):
        raise CtlError(f"invalid restart policy '{policy}'")
    if sep and name != "on-failure":
        raise CtlError(
            f"invalid restart policy '{policy}': maximum retry count can only be used with 'on-failure'"
        )
    if arg and (not arg.isdigit()):
        raise CtlError(
            f"invalid restart policy '{policy}': maximum retry count must be a positive integer"
        )
    if auto_remove and name != "no":
        raise CtlError("conflicting options: cannot specify both --restart and --rm")
