"""End to end: real containers (busybox-static) on real cowfs mounts, driven through `cowctl`."""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ctlkit import Ctl, controller, cpu_ticks, daemons_under, mounts_under
from mounting import needs

from lifecycle.demo import build_busybox_layers

pytestmark = [
    pytest.mark.fuse,
    needs(
        os.path.exists("/bin/busybox"), "busybox-static is missing (scripts/setup.sh installs it)"
    ),
]

LOOP = "trap 'exit 0' TERM; while :; do sleep 0.05; done"


@pytest.fixture(scope="module")
def image_layers(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return build_busybox_layers(tmp_path_factory.mktemp("img"))


@pytest.fixture
def ctl(tmp_path: Path, image_layers: list[Path]) -> Iterator[Ctl]:
    with controller(tmp_path / "root") as c:
        c.ok("image", "import", *map(str, image_layers), "--name", "bb")
        yield c
    assert mounts_under(tmp_path / "root") == []
    assert daemons_under(tmp_path / "root") == []


def test_run_foreground_exit_code_logs_and_diff(ctl: Ctl) -> None:
    r = ctl(
        "run",
        "--name",
        "one",
        "bb",
        "sh",
        "-c",
        "echo out; echo err >&2; cat /etc/motd; echo new > /etc/new; rm /etc/app.conf; "
        "test -e /etc/os-release || echo whiteout-honoured; hostname; exit 3",
    )
    assert r.rc == 3, r.err
    assert r.out.startswith("out\nwelcome to the app layer\nwhiteout-honoured\n")
    assert r.err == "err\n"  # streams kept apart, as docker run does
    st = ctl.state("one")
    assert st["Status"] == "exited" and st["ExitCode"] == 3 and not st["Running"]
    assert st["Pid"] == 0 and not st["FinishedAt"].startswith("0001")
    assert r.out.strip().endswith(ctl.inspect("one")["Id"][:12])  # the hostname
    logs = ctl("logs", "one")
    assert (logs.out, logs.err) == (r.out, r.err)
    stamped = ctl.ok("logs", "-t", "one").splitlines()
    assert stamped[0].endswith(" out") and stamped[0].startswith("20")
    assert ctl.ok("diff", "one").splitlines() == ["C /etc", "D /etc/app.conf", "A /etc/new"]
    assert ctl.mounts() == []
    upper = Path(ctl.inspect("one")["GraphDriver"]["Data"]["UpperDir"])
    assert (upper / "etc/new").read_text() == "new\n"


def test_command_not_found_is_127_with_one_line(ctl: Ctl) -> None:
    r = ctl("run", "--name", "nf", "bb", "no-such-command")
    assert r.rc == 127
    assert r.err.count("\n") == 1 and "executable file not found" in r.err
    st = ctl.state("nf")
    assert st["Status"] == "exited" and st["ExitCode"] == 127 and "no-such-command" in st["Error"]
    assert ctl.mounts() == []


def test_stop_by_signal_then_by_timeout(ctl: Ctl) -> None:
    ctl.ok(
        "run",
        "-d",
        "--name",
        "polite",
        "bb",
        "sh",
        "-c",
        "trap 'exit 143' TERM; while :; do sleep 0.05; done",
    )
    ctl.ok("run", "-d", "--name", "deaf", "bb", "sleep", "1000")  # PID 1 without a TERM handler
    assert len(ctl.mounts()) == 2
    ctl.ok("stop", "polite")
    assert ctl.state("polite")["ExitCode"] == 143
    t0 = time.monotonic()
    ctl.ok("stop", "-t", "1", "deaf")
    assert time.monotonic() - t0 >= 1.0  # it had to wait out the timeout before SIGKILL
    assert ctl.state("deaf")["ExitCode"] == 137
    assert ctl.mounts() == []
    assert ctl("stop", "deaf").rc == 0  # already stopped: not an error (Docker's 304)
    ctl.ok("run", "-d", "--name", "k", "bb", "sh", "-c", "trap 'exit 7' USR1; " + LOOP)
    ctl.ok("kill", "-s", "USR1", "k")
    ctl.wait_for("k", lambda s: s["State"]["Status"] == "exited")
    assert ctl.state("k")["ExitCode"] == 7
    ctl.ok("start", "k")
    ctl.ok("kill", "k")  # SIGKILL by default, which even PID 1 cannot ignore
    assert ctl.state("k")["ExitCode"] == 128 + signal.SIGKILL


def test_pause_freezes_and_refusals_change_nothing(ctl: Ctl) -> None:
    cid = ctl.ok("run", "-d", "--name", "busy", "bb", "sh", "-c", "while :; do :; done").strip()
    pid = ctl.state("busy")["Pid"]
    ctl.ok("pause", "busy")
    st = ctl.state("busy")
    assert st["Status"] == "paused" and st["Paused"] and st["Running"]
    cg = Path(ctl.inspect("busy")["Cgroup"])
    assert "frozen 1" in (cg / "cgroup.events").read_text()
    t = cpu_ticks(pid)
    time.sleep(0.3)
    assert cpu_ticks(pid) == t  # frozen: no CPU at all
    for args, msg in (
        (("pause", "busy"), f"container {cid} is already paused"),
        (("start", "busy"), "cannot start a paused container, try unpause instead"),
        (
            ("rm", "busy"),
            'cannot remove container "/busy": container is paused and must be unpaused first',
        ),
    ):
        r = ctl(*args)
        assert r.rc == 1 and r.err == f"Error: {msg}\n", (args, r.err)
        assert ctl.state("busy")["Status"] == "paused"
    assert len(ctl.mounts()) == 1
    ctl.ok("unpause", "busy")
    time.sleep(0.3)
    assert cpu_ticks(pid) > t
    r = ctl("unpause", "busy")
    assert r.rc == 1 and r.err == f"Error: Container {cid} is not paused\n"
    r = ctl("rm", "busy")
    assert "container is running: stop the container before removing or force remove" in r.err
    ctl.ok("pause", "busy")
    ctl.ok("rm", "-f", "busy")  # force works on a frozen container too
    assert ctl("inspect", "busy").rc == 1
    assert ctl.mounts() == [] and not cg.exists()


def test_refusals_on_created_and_exited(ctl: Ctl) -> None:
    cid = ctl.ok("create", "--name", "c", "bb", "true").strip()
    st0 = ctl.state("c")
    for verb, msg in (
        ("pause", f"container {cid} is not running"),
        ("unpause", f"Container {cid} is not paused"),
        ("kill", f"Cannot kill container: {cid}: container {cid} is not running"),
    ):
        r = ctl(verb, "c")
        assert (r.rc, r.err) == (1, f"Error: {msg}\n")
    assert ctl.state("c") == st0
    r = ctl("start", "c")
    assert r.rc == 0
    ctl.wait_for("c", lambda s: s["State"]["Status"] == "exited")
    r = ctl("pause", "c")
    assert r.err == f"Error: container {cid} is not running\n"


def test_start_again_keeps_the_upper(ctl: Ctl) -> None:
    ctl.ok("create", "--name", "counter", "bb", "sh", "-c", "echo run >> /count; wc -l < /count")
    for _ in range(2):
        ctl.ok("start", "counter")
        ctl.ok("wait", "counter")
    assert ctl.ok("logs", "counter").split() == ["1", "2"]
    ctl.ok("restart", "counter")
    assert ctl.ok("wait", "counter").strip() == "0"
    assert ctl.ok("logs", "counter").split() == ["1", "2", "3"]


def test_names_ids_and_prefixes(ctl: Ctl) -> None:
    cid = ctl.ok("create", "--name", "web", "bb", "true").strip()
    assert len(cid) == 64
    r = ctl("create", "--name", "web", "bb", "true")
    assert r.rc == 1 and 'The container name "/web" is already in use by container' in r.err
    assert ctl.inspect(cid[:5])["Name"] == "/web"
    assert ctl.inspect(cid)["Id"] == cid
    r = ctl("inspect", "nope")
    assert r.err == "Error: No such container: nope\n"
    r = ctl("create", "--name", "bad name", "bb")
    assert r.rc == 1 and "Invalid container name" in r.err
    r = ctl("create", "--restart", "sometimes", "bb")
    assert r.rc == 1 and "invalid restart policy" in r.err
    r = ctl("create", "no-such-image")
    assert r.err == "Error: No such image: no-such-image\n"
    auto = ctl.ok("create", "bb", "true").strip()
    assert "_" in ctl.inspect(auto)["Name"]


def test_env_workdir_and_rm_flag(ctl: Ctl) -> None:
    r = ctl(
        "run",
        "--rm",
        "-e",
        "GREETING=hi there",
        "-w",
        "/tmp",
        "bb",
        "sh",
        "-c",
        'echo "$GREETING"; pwd',
    )
    assert r.rc == 0 and r.out == "hi there\n/tmp\n"
    assert ctl.ok("ps", "-aq") == ""


def test_restart_policies(ctl: Ctl) -> None:
    ctl.ok("run", "-d", "--name", "flaky", "--restart", "on-failure:2", "bb", "sh", "-c", "exit 4")
    st = ctl.wait_for(
        "flaky", lambda s: s["State"]["Status"] == "exited" and s["RestartCount"] == 2, timeout=20
    )
    assert st["State"]["ExitCode"] == 4
    assert ctl.ok("logs", "flaky") == ""
    ctl.ok(
        "run", "-d", "--name", "forever", "--restart", "always", "bb", "sh", "-c", "echo up; exit 0"
    )
    ctl.wait_for("forever", lambda s: s["RestartCount"] >= 2, timeout=20)
    ctl.ok("stop", "forever")  # cancels the policy
    st = ctl.state("forever")
    assert st["Status"] == "exited"
    n = ctl.inspect("forever")["RestartCount"]
    time.sleep(0.5)
    assert ctl.inspect("forever")["RestartCount"] == n and ctl.mounts() == []


def test_monitor_killed_recovery(ctl: Ctl) -> None:
    ctl.ok("run", "-d", "--name", "orphan", "bb", "sh", "-c", "echo kept > /data; " + LOOP)
    info = ctl.inspect("orphan")
    ctl.wait_for("orphan", lambda s: os.path.exists(s["GraphDriver"]["Data"]["UpperDir"] + "/data"))
    os.kill(info["MonitorPid"], signal.SIGKILL)
    st = ctl.state("orphan")  # any command reconciles
    assert st["Status"] == "exited" and "monitor died" in st["Error"] and st["ExitCode"] == 137
    assert ctl.mounts() == []
    assert (
        not Path(info["Cgroup"]).exists() or not (Path(info["Cgroup"]) / "cgroup.procs").read_text()
    )
    assert (Path(info["GraphDriver"]["Data"]["UpperDir"]) / "data").read_text() == "kept\n"
    ctl.ok("start", "orphan")  # and it starts again on the same upper
    assert ctl.state("orphan")["Status"] == "running"


def test_daemon_killed_stops_the_container_honestly(ctl: Ctl) -> None:
    ctl.ok("run", "-d", "--name", "nofs", "bb", "sh", "-c", LOOP)
    os.kill(ctl.inspect("nofs")["DaemonPid"], signal.SIGKILL)
    st = ctl.wait_for("nofs", lambda s: s["State"]["Status"] == "exited")["State"]
    assert "cowfs daemon exited unexpectedly" in st["Error"]
    assert ctl.mounts() == []
    ctl.ok("start", "nofs")
    assert ctl.state("nofs")["Status"] == "running"


def test_cowctl_killed_mid_stop(ctl: Ctl) -> None:
    ctl.ok("run", "-d", "--name", "deaf", "bb", "sleep", "1000")
    p = subprocess.Popen(
        [*_cmd(ctl), "stop", "-t", "30", "deaf"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    p.kill()
    p.wait()
    assert ctl.state("deaf")["Status"] == "running"  # honest: SIGTERM was ignored by PID 1
    ctl.ok("stop", "-t", "0", "deaf")
    assert ctl.state("deaf")["ExitCode"] == 137 and ctl.mounts() == []


def _cmd(ctl: Ctl) -> list[str]:
    return [sys.executable, "-m", "lifecycle", "--root", str(ctl.root)]


def test_corrupt_and_newer_databases_are_refused_untouched(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    db = root / "state.db"
    db.write_bytes(b"this is not a database" * 100)
    ctl = Ctl(root)
    r = ctl("ps")
    assert r.rc == 1 and r.err.count("\n") == 1 and "state database" in r.err
    assert db.read_bytes() == b"this is not a database" * 100
    db.unlink()
    ctl.ok("ps")
    con = sqlite3.connect(db)
    con.execute("PRAGMA user_version = 99")
    con.close()
    r = ctl("ps")
    assert r.rc == 1 and "schema version 99" in r.err


def test_images_import_tar_share_layers_and_refuse_rm_in_use(
    ctl: Ctl, image_layers: list[Path], tmp_path: Path
) -> None:
    tar = tmp_path / "extra.tar"
    with tarfile.open(tar, "w") as tf:
        for name, data in ((".wh.motd", b""), ("hello", b"hi\n")):
            ti = tarfile.TarInfo(f"etc/{name}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    before = sorted(os.listdir(ctl.root / "layers/sha256"))
    ctl.ok(
        "image",
        "import",
        str(image_layers[0]),
        str(image_layers[1]),
        str(tar),
        "--name",
        "bb:extra",
    )
    after = sorted(os.listdir(ctl.root / "layers/sha256"))
    assert len(after) == len(before) + 1  # base and app stored once
    r = ctl("run", "--rm", "bb:extra", "sh", "-c", "cat /etc/hello; test -e /etc/motd || echo gone")
    assert r.out == "hi\ngone\n"
    df = ctl.ok("df", "-v")
    assert "bb" in df and "extra" in df
    ctl.ok("create", "--name", "user", "bb:extra", "true")
    r = ctl("image", "rm", "bb:extra")
    assert r.rc == 1 and "is using its referenced image" in r.err
    ctl.ok("rm", "user")
    ctl.ok("image", "rm", "bb:extra")
    assert sorted(os.listdir(ctl.root / "layers/sha256")) == before


def test_events_record_the_lifecycle(ctl: Ctl) -> None:
    t0 = time.time()
    ctl.ok("run", "--name", "ev", "bb", "true")
    ctl.ok("rm", "ev")
    out = ctl.ok("events", "--since", str(t0), "--until", str(time.time() + 0.1))
    actions = [line.split()[2] for line in out.splitlines()]
    assert actions == ["create", "start", "die", "destroy"]


def test_kernel_overlay_driver_for_comparison(ctl: Ctl) -> None:
    r = ctl(
        "run",
        "--name",
        "k",
        "--storage-driver",
        "overlay",
        "bb",
        "sh",
        "-c",
        "echo x > /new; rm /etc/app.conf",
    )
    assert r.rc == 0, r.err
    assert ctl.inspect("k")["GraphDriver"]["Name"] == "overlay"
    assert ctl.ok("diff", "k").splitlines() == ["C /etc", "D /etc/app.conf", "A /new"]
    assert ctl.mounts() == []


def test_pause_that_cannot_freeze_rolls_back(ctl: Ctl) -> None:
    """A task blocked in a FUSE request cannot be frozen (lifecycle-reference 2b): stop the cowfs
    daemon while the container creates files, and pause must give up, thaw and say so."""
    ctl.ok(
        "run",
        "-d",
        "--name",
        "stuck",
        "bb",
        "sh",
        "-c",
        "i=0; while :; do i=$((i+1)); echo > /tmp/f$i; done",
    )
    daemon = ctl.inspect("stuck")["DaemonPid"]
    os.kill(daemon, signal.SIGSTOP)
    try:
        time.sleep(0.3)  # the container is now waiting for an answer
        env = dict(os.environ, COWCTL_FREEZE_TIMEOUT="1")
        r = subprocess.run(
            [*_cmd(ctl), "pause", "stuck"], capture_output=True, text=True, env=env, timeout=60
        )
        assert r.returncode == 1
        assert r.stderr.startswith("Error: cannot pause container") and "thawed again" in r.stderr
        assert r.stderr.count("\n") == 1
    finally:
        os.kill(daemon, signal.SIGCONT)
    info = ctl.inspect("stuck")
    assert info["State"]["Status"] == "running"
    assert "frozen 0" in (Path(info["Cgroup"]) / "cgroup.events").read_text()
    ctl.ok("pause", "stuck")  # with the daemon answering again, it freezes
    ctl.ok("unpause", "stuck")


def test_monitor_and_daemon_both_killed_leave_no_stale_mount(ctl: Ctl) -> None:
    ctl.ok("run", "-d", "--name", "both", "bb", "sh", "-c", "echo kept > /data; " + LOOP)
    info = ctl.inspect("both")
    ctl.wait_for("both", lambda s: os.path.exists(s["GraphDriver"]["Data"]["UpperDir"] + "/data"))
    os.kill(info["MonitorPid"], signal.SIGKILL)
    os.kill(info["DaemonPid"], signal.SIGKILL)
    time.sleep(0.2)
    st = ctl.state("both")
    assert st["Status"] == "exited" and "monitor died" in st["Error"]
    assert ctl.mounts() == []
    assert (Path(info["GraphDriver"]["Data"]["UpperDir"]) / "data").read_text() == "kept\n"


def test_interrupted_removal_is_finished_by_the_next_command(ctl: Ctl) -> None:
    """rm records `removing` before it deletes anything; if it dies there, the next command (any
    command) finishes the job instead of leaving a half-removed container."""
    cid = ctl.ok("create", "--name", "half", "bb", "true").strip()
    upper = Path(ctl.inspect("half")["GraphDriver"]["Data"]["UpperDir"])
    con = sqlite3.connect(ctl.root / "state.db")
    with con:
        con.execute("UPDATE containers SET status = 'removing' WHERE id = ?", (cid,))
    con.close()
    r = ctl("ps", "-a", "-q")
    assert r.rc == 0 and r.out == ""
    assert not upper.parent.exists()
    assert ctl("create", "--name", "half", "bb", "true").rc == 0  # the name is free again


def test_concurrent_commands_on_one_container(ctl: Ctl) -> None:
    """Two controllers racing on one container: one start wins, the rest see it started (or
    being started); exactly one monitor, one daemon, one mount."""
    ctl.ok("create", "--name", "race", "bb", "sh", "-c", LOOP)
    procs = [
        subprocess.Popen(
            [*_cmd(ctl), "start", "race"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    results = [(p.wait(timeout=60), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert all(rc == 0 or "being started by another command" in err for rc, err in results), results
    assert ctl.state("race")["Status"] == "running"
    assert len(ctl.mounts()) == 1 and len(daemons_under(ctl.root)) == 2  # one monitor, one cowfs
    stops = [
        subprocess.Popen([*_cmd(ctl), "stop", "race"], stdout=subprocess.DEVNULL) for _ in range(3)
    ]
    assert [p.wait(timeout=60) for p in stops] == [0, 0, 0]
    assert ctl.state("race")["Status"] == "exited" and ctl.mounts() == []
