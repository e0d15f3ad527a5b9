"""A hypothesis state machine drives random verbs, valid and invalid, against several containers
through `cowctl`, and after every step checks the recorded state against a model built from
Docker's rules, the refusal messages, and the machine: a mount and a live init exactly while
running or paused, a frozen cgroup exactly while paused, nothing left once removed."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import hypothesis.strategies as st
import pytest
from ctlkit import Ctl, cleanup, daemons_under, mounts_under
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from mounting import needs

from lifecycle.demo import build_busybox_layers
from lifecycle.states import TABLE, Status, Verb

pytestmark = [
    pytest.mark.fuse,
    needs(
        os.path.exists("/bin/busybox"), "busybox-static is missing (scripts/setup.sh installs it)"
    ),
]

EXAMPLES = int(os.environ.get("COWCTL_MACHINE_EXAMPLES", "6"))
STEPS = int(os.environ.get("COWCTL_MACHINE_STEPS", "14"))
NAMES = ("web", "job", "cron")  # not hex: a name like "c" is also an id prefix, as in Docker
# Exits 0 on SIGTERM; "exit N" scripts are not used so that a container only stops when told.
CMD = ("sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.05; done")


class LifecycleMachine(RuleBasedStateMachine):
    base: Path

    @initialize()
    def setup(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="cowctl-machine.", dir=self.base))
        self.ctl = Ctl(self.tmp / "root")
        layers = build_busybox_layers(self.tmp / "img")
        self.ctl.ok("image", "import", *map(str, layers), "--name", "bb")
        self.model: dict[str, Status] = {}
        self.ids: dict[str, str] = {}
        self.log: list[str] = []

    def teardown(self) -> None:
        if not hasattr(self, "ctl"):
            return
        forced = cleanup(self.ctl)
        shutil.rmtree(self.tmp, ignore_errors=True)
        assert forced == [], forced

    # --------------------------------------------------------------- verbs

    def _verb(self, verb: Verb, name: str, *args: str) -> None:
        if name not in self.model:
            r = self.ctl(verb.value.split()[0], *(("-f",) if verb == Verb.RM_FORCE else ()), name)
            self.log.append(f"{verb.value} {name} [absent] -> {r.rc} {r.err.strip()}")
            assert r.rc == 1 and r.err == f"Error: No such container: {name}\n", "\n".join(self.log)
            return
        cur = self.model[name]
        expected = TABLE[(cur, verb)]
        argv = verb.value.split() + list(args) + [name]
        r = self.ctl(*argv)
        self.log.append(f"{' '.join(argv)} [{cur.value}] -> {r.rc} {r.err.strip()}")
        if isinstance(expected, str):
            msg = expected.format(id=self.ids[name], name=name)
            assert (r.rc, r.err) == (1, f"Error: {msg}\n"), "\n".join(self.log)
            return
        assert r.rc == 0, "\n".join(self.log)
        action = expected.action
        if expected.noop:
            return
        if action in ("start", "stop+start", "unpause"):
            self.model[name] = Status.RUNNING
        elif action == "pause":
            self.model[name] = Status.PAUSED
        elif action in ("stop", "kill"):
            self.model[name] = Status.EXITED
        elif action in ("remove", "kill+remove"):
            del self.model[name]
            del self.ids[name]

    @rule(name=st.sampled_from(NAMES))
    def create(self, name: str) -> None:
        r = self.ctl("create", "--name", name, "bb", *CMD)
        self.log.append(f"create {name} -> {r.rc} {r.err.strip()}")
        if name in self.model:
            assert r.rc == 1 and "is already in use by container" in r.err
        else:
            assert r.rc == 0, r.err
            self.model[name] = Status.CREATED
            self.ids[name] = r.out.strip()

    @rule(name=st.sampled_from(NAMES))
    def start(self, name: str) -> None:
        self._verb(Verb.START, name)

    @rule(name=st.sampled_from(NAMES))
    def pause(self, name: str) -> None:
        self._verb(Verb.PAUSE, name)

    @rule(name=st.sampled_from(NAMES))
    def unpause(self, name: str) -> None:
        self._verb(Verb.UNPAUSE, name)

    @rule(name=st.sampled_from(NAMES))
    def stop(self, name: str) -> None:
        self._verb(Verb.STOP, name, "-t", "5")

    @rule(name=st.sampled_from(NAMES))
    def kill(self, name: str) -> None:
        self._verb(Verb.KILL, name)

    @rule(name=st.sampled_from(NAMES))
    def restart(self, name: str) -> None:
        self._verb(Verb.RESTART, name, "-t", "5")

    @rule(name=st.sampled_from(NAMES))
    def rm(self, name: str) -> None:
        self._verb(Verb.RM, name)

    @precondition(lambda self: bool(self.model))
    @rule(name=st.sampled_from(NAMES))
    def rm_force(self, name: str) -> None:
        self._verb(Verb.RM_FORCE, name)

    # --------------------------------------------------------------- crashes

    def _actives(self) -> list[str]:
        return sorted(n for n, s in self.model.items() if s in (Status.RUNNING, Status.PAUSED))

    @precondition(lambda self: self._actives())
    @rule(data=st.data())
    def crash_monitor(self, data: st.DataObject) -> None:
        """kill -9 of the monitor: the next command must find it out and stop the container."""
        name = data.draw(st.sampled_from(self._actives()))
        info = self.ctl.inspect(name)
        os.kill(info["MonitorPid"], signal.SIGKILL)
        self.log.append(f"kill -9 monitor of {name} [{self.model[name].value}]")
        state = self.ctl.state(name)
        assert state["Status"] == "exited" and "monitor died" in state["Error"], "\n".join(self.log)
        self.model[name] = Status.EXITED

    @precondition(lambda self: self._actives())
    @rule(data=st.data())
    def crash_daemon(self, data: st.DataObject) -> None:
        """kill -9 of the cowfs daemon: the monitor stops the container and says why."""
        name = data.draw(st.sampled_from(self._actives()))
        info = self.ctl.inspect(name)
        os.kill(info["DaemonPid"], signal.SIGKILL)
        self.log.append(f"kill -9 cowfs daemon of {name} [{self.model[name].value}]")
        state = self.ctl.wait_for(name, lambda i: i["State"]["Status"] == "exited")["State"]
        assert "cowfs daemon exited unexpectedly" in state["Error"], "\n".join(self.log)
        self.model[name] = Status.EXITED

    # --------------------------------------------------------------- what must hold

    @invariant()
    def machine_matches_model(self) -> None:
        if not hasattr(self, "ctl"):
            return
        ids = set(self.ctl.ok("ps", "-aq", "--no-trunc").split())
        assert ids == set(self.ids.values()), "\n".join(self.log)
        mounted = set(mounts_under(self.ctl.root))
        for name, status in self.model.items():
            info = self.ctl.inspect(name)
            s = info["State"]
            assert s["Status"] == status.value, (name, s, "\n".join(self.log))
            merged = info["GraphDriver"]["Data"]["MergedDir"]
            active = status in (Status.RUNNING, Status.PAUSED)
            assert (merged in mounted) == active, (name, status, mounted, "\n".join(self.log))
            if active:
                assert s["Pid"] > 0 and os.path.exists(f"/proc/{s['Pid']}")
                frozen = "frozen 1" in (Path(info["Cgroup"]) / "cgroup.events").read_text()
                assert frozen == (status == Status.PAUSED), (name, "\n".join(self.log))
            else:
                assert s["Pid"] == 0
        n_active = sum(1 for s in self.model.values() if s in (Status.RUNNING, Status.PAUSED))
        assert len(mounted) == n_active, (mounted, "\n".join(self.log))
        # one monitor and one daemon per active container, nothing else
        assert len(daemons_under(self.ctl.root)) == 2 * n_active, "\n".join(self.log)


def test_lifecycle_state_machine(tmp_path: Path) -> None:
    LifecycleMachine.base = tmp_path
    LifecycleMachine.TestCase.settings = settings(
        max_examples=EXAMPLES,
        stateful_step_count=STEPS,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=os.environ.get("COWCTL_MACHINE_RANDOM") != "1",
    )
    LifecycleMachine.TestCase().runTest()
