"""The container workloads, through `cowctl` (lifecycle/): the create → start → stop → rm cycle of
a busybox container with pause/unpause latency, and the disk footprint of N containers from one
image against N full copies. Each runs with `--storage-driver overlay` on the overlay target and
the default `--storage-driver cowfs` on the cowfs target; the floor and fuse-overlayfs are not
applicable (cowctl has no such driver).

Rules: every cowctl command is a new process, `python -m lifecycle --root ROOT ...` as a user runs
it, timed by its wall time. The state root is private to the run (WORKDIR/state); the image
(`lifecycle.demo.build_busybox_layers`, two layers) is imported once, on first use, and each driver
does one untimed cycle before its first measured one (imports and kernel caches warm). Nothing
inside a timed command is skipped or shortened: the checks (inspect, mount types, upper contents,
leftovers) run between the timed commands. Every container a workload creates is removed with
`rm -f` whether it succeeds or not, and `remove_all` is the harness's safety net before it deletes
the scratch directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.config import Sizes
from bench.layers import flatten
from bench.targets import mounts_under
from bench.workloads import Metric, VerifyError, Workload, _check

__all__ = ["Cowctl", "container_workloads", "parse_df", "parse_size", "remove_all"]

BUSYBOX = "/bin/busybox"
IMAGE = "bb"
DRIVERS = ("overlay", "cowfs")  # bench target name == cowctl storage driver
FSTYPE = {"overlay": "overlay", "cowfs": "fuse.cowfs"}
STATE = "state"  # the state root, below the workdir
STOP_T = "5"
# The cycle's container writes what it sees of the image (the app layer replaces motd, adds
# app.conf and whites out os-release) to /ready once its SIGTERM trap is set: the signal that it is
# ready, compared with the same files of the image flattened by the harness (Env.ready_text).
CYCLE_SH = (
    "trap 'exit 0' TERM; "
    "{ cat /etc/motd /etc/app.conf; test -e /etc/os-release && echo whiteout-ignored; } "
    "> /ready.tmp 2>&1; mv /ready.tmp /ready; "
    "while :; do sleep 0.05; done"
)
NOT_APPLICABLE = "not applicable: cowctl's storage drivers are cowfs and kernel overlayfs"


def _cowctl_unavailable() -> str | None:
    if not os.path.exists(BUSYBOX):
        return f"busybox-static missing ({BUSYBOX}; scripts/setup.sh installs it)"
    r = subprocess.run([sys.executable, "-c", "import lifecycle.cli"], capture_output=True)
    if r.returncode != 0:
        return "cowctl not available: lifecycle/ cannot be imported by this Python"
    return None


@dataclass
class Cowctl:
    """The cowctl command line on one state root."""

    root: Path

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "lifecycle", "--root", str(self.root), *args]

    def run(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> tuple[float, subprocess.CompletedProcess[str]]:
        """Run one command; return its wall time (process start to exit) and its result. Its own
        session, so a Ctrl-C meant for the harness does not hit it halfway through a state
        change; on Ctrl-C it is given 30 s to finish so that the clean-up finds a consistent
        state."""
        argv = self.argv(*args)
        t0 = time.perf_counter()
        p = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            try:
                out, err = p.communicate(timeout=timeout)
            except KeyboardInterrupt:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.communicate(timeout=30)
                raise
        except BaseException:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            raise
        elapsed = time.perf_counter() - t0
        r = subprocess.CompletedProcess(argv, p.returncode, out, err)
        if check and r.returncode != 0:
            lines = (err or out).strip().splitlines()
            raise VerifyError(
                f"cowctl {' '.join(args[:2])} exited {r.returncode}: {lines[-1] if lines else ''}"
            )
        return elapsed, r

    def inspect(self, *refs: str) -> list[dict[str, Any]]:
        _, r = self.run("inspect", *refs)
        docs = json.loads(r.stdout)
        _check(len(docs) == len(refs), f"inspect returned {len(docs)} documents for {len(refs)}")
        return docs

    def ids(self) -> list[str]:
        _, r = self.run("ps", "-a", "-q", "--no-trunc")
        return r.stdout.split()


def remove_all(root: Path) -> list[str]:
    """Force-remove every container of the state root and end any process still naming it (a
    monitor or a cowfs daemon whose cowctl state was lost). Returns what could not be removed."""
    if not (root / "state.db").exists():
        return []
    ctl = Cowctl(root)
    problems = []
    try:
        ids = ctl.ids()
        if ids:
            ctl.run("rm", "-f", *ids, check=False)
        left = ctl.ids()
        if left:
            problems.append(f"containers not removed: {', '.join(i[:12] for i in left)}")
    except (VerifyError, OSError, subprocess.SubprocessError) as e:
        problems.append(f"cowctl failed: {e}")
    for pid in _pids_naming(str(root)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            problems.append(f"killed leftover process {pid}")
    return problems


def _pids_naming(needle: str) -> list[int]:
    """Processes other than this one whose command line contains needle."""
    b = os.fsencode(needle)
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if b in f.read():
                        pids.append(int(d))
            except OSError:
                pass
    return pids


def _fstype(mnt: str) -> str | None:
    """The filesystem type mounted at mnt (the last mount there), or None."""
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split()[4] == mnt:
                found = right.split()[0]
    return found


def du(path: Path) -> int:
    """Allocated bytes of a tree (GNU du: blocks, each hard-linked inode once)."""
    r = subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        raise VerifyError(f"du {path}: {r.stderr.strip()}")
    return int(r.stdout.split()[0])


def _wait_for(cond: Any, what: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise VerifyError(f"{what}: not after {timeout:g} s")
        time.sleep(0.01)


_SIZE = re.compile(r"^([0-9.]+)(B|kB|MB|GB|TB)$")
_UNIT = {"B": 1, "kB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def parse_size(s: str) -> float:
    """cowctl's (Docker's) human sizes: 3 significant digits, powers of 1000."""
    m = _SIZE.match(s)
    if not m:
        raise VerifyError(f"cowctl df: unreadable size {s!r}")
    return float(m.group(1)) * _UNIT[m.group(2)]


def parse_df(text: str) -> dict[str, Any]:
    """`cowctl df -v`: the summary's image and container totals, the images' rows (size, number of
    containers) and the containers' sizes by name."""
    out: dict[str, Any] = {"images": {}, "containers": {}}
    section = "summary"
    for line in text.splitlines():
        f = line.split()
        if not f or f[0] in ("TYPE", "REPOSITORY", "CONTAINER"):
            continue
        if line.startswith("Images space usage"):
            section = "images"
        elif line.startswith("Containers space usage"):
            section = "containers"
        elif section == "summary":
            out[f"{f[0].lower()}_total"] = parse_size(f[3])
        elif section == "images":
            out["images"][f"{f[0]}:{f[1]}"] = {"size": parse_size(f[3]), "containers": int(f[6])}
        else:
            out["containers"][f[-1]] = parse_size(f[2])
    return out


def _agrees(shown: float, measured: int) -> bool:
    """A df figure (3 significant digits) against du's exact bytes: rounding, plus one block."""
    return abs(shown - measured) <= 0.006 * measured + 4096


@dataclass
class Env:
    """The run's cowctl state root and image, shared by the container workloads, set up on first
    use. A failed set-up is remembered: later steps fail at once with the same error."""

    ctl: Cowctl | None = None
    flat_bytes: int = 0
    ready_text: str = ""
    import_s: float = 0.0
    error: str | None = None
    warm: set[str] = field(default_factory=set)
    serial: int = 0

    def ready(self, workdir: Path) -> Cowctl:
        if self.error:
            raise VerifyError(self.error)
        if self.ctl is None:
            try:
                self.ctl = self._setup(workdir)
            except (Exception, SystemExit) as e:  # build_busybox_layers exits without busybox
                self.error = f"image set-up failed: {type(e).__name__}: {e}"
                raise VerifyError(self.error) from None
        return self.ctl

    def _setup(self, workdir: Path) -> Cowctl:
        from lifecycle.demo import build_busybox_layers

        base, app = build_busybox_layers(workdir / "image")
        ctl = Cowctl(workdir / STATE)
        self.import_s, _ = ctl.run("image", "import", str(base), str(app), "--name", IMAGE)
        flat = workdir / "flat"
        flatten([app, base], flat)
        self.flat_bytes = du(flat)
        etc = flat / "etc"
        self.ready_text = (etc / "motd").read_text() + (etc / "app.conf").read_text()
        if (etc / "os-release").exists():
            self.ready_text += "whiteout-ignored\n"
        return ctl

    def name(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}-{self.serial}"


class _ContainerWorkload(Workload):
    mounts = False
    applies_to = DRIVERS
    not_applicable = NOT_APPLICABLE

    def __init__(self, sizes: Sizes, env: Env) -> None:
        super().__init__(sizes)
        self.env = env

    def unavailable(self) -> str | None:
        return _cowctl_unavailable()


class ContainerCycle(_ContainerWorkload):
    name = "container_cycle"
    description = (
        "cowctl create → start → stop -t 5 → rm of a busybox container (sh with a SIGTERM trap), "
        "each command timed as a new process; pause and unpause timed on the running container"
    )

    @property
    def metrics(self) -> tuple[Metric, ...]:
        def ms(name: str, label: str) -> Metric:
            return Metric(name, "ms", False, label, vs_floor=False)

        return (
            ms("cycle", "container_cycle (create+start+stop+rm)"),
            ms("cycle_create", "container_cycle: create"),
            ms("cycle_start", "container_cycle: start"),
            ms("cycle_stop", "container_cycle: stop"),
            ms("cycle_rm", "container_cycle: rm"),
            ms("pause", "container_pause (running container)"),
            ms("unpause", "container_unpause"),
        )

    def run_unmounted(self, workdir: Path, target: str) -> tuple[dict[str, float], dict[str, Any]]:
        ctl = self.env.ready(workdir)
        if target not in self.env.warm:
            self._cycle(ctl, target, self.env.name(f"warmup-{target}"))
            self.env.warm.add(target)
        t = self._cycle(ctl, target, self.env.name(f"cycle-{target}"))
        metrics = {k: v * 1000 for k, v in t.items()}
        metrics["cycle"] = sum(metrics[f"cycle_{k}"] for k in ("create", "start", "stop", "rm"))
        return metrics, {"image_import_s": self.env.import_s}

    def _cycle(self, ctl: Cowctl, driver: str, name: str) -> dict[str, float]:
        t: dict[str, float] = {}
        exists = True  # or may: rm -f of a name that does not exist only fails
        try:
            t["cycle_create"], r = ctl.run(
                "create", "--name", name, "--storage-driver", driver, IMAGE, "sh", "-c", CYCLE_SH
            )
            cid = r.stdout.strip()
            t["cycle_start"], _ = ctl.run("start", name)
            info = ctl.inspect(name)[0]
            _check_running(info, cid, driver)
            data = info["GraphDriver"]["Data"]
            ready = Path(data["UpperDir"]) / "ready"
            _wait_for(ready.exists, f"{name}: the command did not start")
            got = ready.read_text()
            want = self.env.ready_text
            _check(got == want, f"{name}: the container sees {got!r}, the image has {want!r}")

            t["pause"], _ = ctl.run("pause", name)
            st = ctl.inspect(name)[0]["State"]
            _check(st["Status"] == "paused" and st["Paused"], f"{name}: not paused: {st}")
            t["unpause"], _ = ctl.run("unpause", name)
            st = ctl.inspect(name)[0]["State"]
            _check(st["Status"] == "running", f"{name}: not running after unpause: {st}")

            t["cycle_stop"], _ = ctl.run("stop", "-t", STOP_T, name)
            st = ctl.inspect(name)[0]["State"]
            _check(
                st["Status"] == "exited" and st["ExitCode"] == 0,
                f"{name}: after stop: status {st['Status']}, exit code {st['ExitCode']} "
                "(0 expected: the trap exits on SIGTERM)",
            )
            _check(_fstype(data["MergedDir"]) is None, f"{name}: still mounted after stop")

            t["cycle_rm"], _ = ctl.run("rm", name)
            exists = False
            _check_gone(ctl, [info])
        finally:
            if exists:
                ctl.run("rm", "-f", name, check=False)
        return t


def _check_running(info: dict[str, Any], cid: str, driver: str) -> None:
    """Running, and on the storage driver asked for: a cowfs/overlay ratio must compare them."""
    name = info["Name"].lstrip("/")
    _check(info["Id"] == cid, f"{name}: create printed {cid[:12]}, inspect shows {info['Id'][:12]}")
    _check(info["State"]["Status"] == "running", f"{name}: {info['State']['Status']} after start")
    _check(info["GraphDriver"]["Name"] == driver, f"{name}: driver {info['GraphDriver']['Name']}")
    got = _fstype(info["GraphDriver"]["Data"]["MergedDir"])
    _check(got == FSTYPE[driver], f"{name}: {got} mounted, {FSTYPE[driver]} expected")


def _check_gone(ctl: Cowctl, infos: list[dict[str, Any]]) -> None:
    """Removed: not listed, no directory, no cgroup, no process, nothing mounted below the root."""
    listed = set(ctl.ids())
    for info in infos:
        cid, name = info["Id"], info["Name"].lstrip("/")
        _check(cid not in listed, f"{name}: still listed after rm")
        _check(
            not Path(info["GraphDriver"]["Data"]["UpperDir"]).parent.exists(),
            f"{name}: its directory is left after rm",
        )
        if info.get("Cgroup"):
            _check(not Path(info["Cgroup"]).exists(), f"{name}: its cgroup is left after rm")
        pids = _pids_naming(cid)
        _check(not pids, f"{name}: processes {pids} left after rm")
    left = mounts_under(ctl.root)
    _check(not left, f"still mounted after rm: {', '.join(left)}")


class ContainerFootprint(_ContainerWorkload):
    name = "container_footprint"
    max_reps = 1  # bytes on disk: the same every time

    def __init__(self, sizes: Sizes, env: Env) -> None:
        super().__init__(sizes, env)
        n, kib = sizes.containers, sizes.container_write_kib
        self.description = (
            f"disk use (du) of {n} stopped busybox containers from one image, each having written "
            f"its own {kib} KiB file: image layers once + the uppers, against {n} full copies of "
            "the flattened image + the same files; checked against `cowctl df -v`"
        )

    @property
    def metrics(self) -> tuple[Metric, ...]:
        n = self.sizes.containers

        def b(name: str, label: str, unit: str = "bytes") -> Metric:
            return Metric(name, unit, False, label, vs_floor=False, speed=False)

        return (
            b("footprint", f"container_footprint ({n} containers: layers once + uppers)"),
            b("footprint_copies", f"container_footprint: {n} full copies + the same writes"),
            b("footprint_ratio", "container_footprint: shared / copies", "ratio"),
            b("footprint_state_root", "container_footprint: whole state root (+ db, logs, work)"),
        )

    def run_unmounted(self, workdir: Path, target: str) -> tuple[dict[str, float], dict[str, Any]]:
        ctl = self.env.ready(workdir)
        names = [self.env.name(f"fp-{target}") for _ in range(self.sizes.containers)]
        created: list[str] = []
        infos: list[dict[str, Any]] = []
        try:
            metrics, extras, infos = self._measure(ctl, target, names, created)
        finally:
            if created:
                ctl.run("rm", "-f", *created, check=False)
        _check_gone(ctl, infos)
        return metrics, extras

    def _measure(
        self, ctl: Cowctl, driver: str, names: list[str], created: list[str]
    ) -> tuple[dict[str, float], dict[str, Any], list[dict[str, Any]]]:
        size = self.sizes.container_write_kib * 1024
        for name in names:
            sh = (
                f"trap 'exit 0' TERM; head -c {size} /dev/urandom > /own.tmp && "
                f"mv /own.tmp /{name}.bin; while :; do sleep 0.05; done"
            )
            created.append(name)  # before: a create cut short may still have made it
            ctl.run("create", "--name", name, "--storage-driver", driver, IMAGE, "sh", "-c", sh)
        ctl.run("start", *names)
        infos = ctl.inspect(*names)
        uppers = []
        for name, info in zip(names, infos, strict=True):
            _check_running(info, info["Id"], driver)
            upper = Path(info["GraphDriver"]["Data"]["UpperDir"])
            own = upper / f"{name}.bin"
            _wait_for(own.exists, f"{name}: its file was not written")
            _check(own.stat().st_size == size, f"{name}: wrote {own.stat().st_size} bytes")
            uppers.append(upper)
        ctl.run("stop", "-t", STOP_T, *names)
        for info in ctl.inspect(*names):
            st = info["State"]
            _check(
                st["Status"] == "exited" and st["ExitCode"] == 0,
                f"{info['Name']}: after stop: {st['Status']}, exit code {st['ExitCode']}",
            )
        left = mounts_under(ctl.root)
        _check(not left, f"still mounted after stop: {', '.join(left)}")

        lowers = [Path(p) for p in infos[0]["GraphDriver"]["Data"]["LowerDir"].split(":")]
        layers_b = sum(du(p) for p in lowers)
        upper_b = [du(u) for u in uppers]
        writes_b = [du(u / f"{n}.bin") for u, n in zip(uppers, names, strict=True)]
        root_b = du(ctl.root)
        shared = layers_b + sum(upper_b)
        copies = len(names) * self.env.flat_bytes + sum(writes_b)

        _, r = ctl.run("df", "-v")
        df = parse_df(r.stdout)
        img = df["images"].get(f"{IMAGE}:latest")
        _check(img is not None, f"cowctl df -v does not list {IMAGE}:latest")
        _check(img["containers"] == len(names), f"df: image used by {img['containers']} containers")
        for shown, measured, what in [
            (img["size"], layers_b, "image size"),
            (df["images_total"], layers_b, "images total"),
            (df["containers_total"], sum(upper_b), "containers total"),
            *((df["containers"].get(n, -1), b, n) for n, b in zip(names, upper_b, strict=True)),
        ]:
            _check(_agrees(shown, measured), f"cowctl df says {what} {shown:.0f}, du {measured}")
        # The rest of the state root is bookkeeping: the database, logs, work and mount points.
        overhead = root_b - shared
        limit = (1 << 20) + len(names) * (64 << 10)
        _check(0 <= overhead <= limit, f"state root {root_b} vs layers + uppers {shared}")

        metrics = {
            "footprint": float(shared),
            "footprint_copies": float(copies),
            "footprint_ratio": shared / copies,
            "footprint_state_root": float(root_b),
        }
        extras = {
            "containers": len(names),
            "layers_bytes": layers_b,
            "uppers_bytes": upper_b,
            "writes_bytes": writes_b,
            "flat_image_bytes": self.env.flat_bytes,
            "df_images_total": df["images_total"],
            "df_containers_total": df["containers_total"],
        }
        return metrics, extras, infos


def container_workloads(sizes: Sizes) -> list[Workload]:
    env = Env()
    return [ContainerCycle(sizes, env), ContainerFootprint(sizes, env)]
