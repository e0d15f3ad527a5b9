"""`cowctl`: Docker's verbs over cowfs mounts. Errors are one line on stderr ("Error: ...") and a
non-zero exit; the state root is /var/lib/cowfs unless --root or COWFS_ROOT says otherwise."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from lifecycle.controller import DEFAULT_ROOT, Controller
from lifecycle.errors import CtlError
from lifecycle.states import Status
from lifecycle.store import Container

__all__ = ["main"]


def _parse_signal(s: str) -> int:
    s = s.upper()
    if s.isdigit():
        n = int(s)
        if not 0 < n < signal.NSIG:
            raise CtlError(f"invalid signal: {s}")
        return n
    name = s if s.startswith("SIG") else "SIG" + s
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise CtlError(f"invalid signal: {s}") from None


def _human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.3g}{unit}"
        n /= 1000
    return f"{n}"


def _ago(iso: str) -> str:
    if iso.startswith("0001"):
        return ""
    t = datetime.strptime(iso[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()
    d = max(0.0, time.time() - t)
    if d < 1:
        return "Less than a second"
    if d < 60:
        return f"{int(d)} second{'s' if int(d) != 1 else ''}"
    if d < 3600:
        m = int(d // 60)
        return "About a minute" if m == 1 else f"{m} minutes"
    h = int(d // 3600)
    return "About an hour" if h == 1 else f"{h} hours" if h < 48 else f"{h // 24} days"


def status_line(c: Container) -> str:
    """Docker's `ps` STATUS column (moby container/state.go String())."""
    s = c.status
    if s == Status.RUNNING:
        return f"Up {_ago(c.started_at)}"
    if s == Status.PAUSED:
        return f"Up {_ago(c.started_at)} (Paused)"
    if s == Status.RESTARTING:
        return f"Restarting ({c.exit_code}) {_ago(c.finished_at)} ago"
    if s == Status.EXITED:
        return f"Exited ({c.exit_code}) {_ago(c.finished_at)} ago"
    if s == Status.REMOVING:
        return "Removal In Progress"
    if s == Status.DEAD:
        return "Dead"
    return "Created"


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("   ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cowctl", description="Run containers on cowfs mounts.")
    p.add_argument(
        "--root",
        type=Path,
        default=None,
        help=f"state root (default {DEFAULT_ROOT}, or $COWFS_ROOT)",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    img = sub.add_parser("image", help="manage images")
    isub = img.add_subparsers(dest="icmd", required=True, metavar="COMMAND")
    imp = isub.add_parser(
        "import", help="import an image from directories or layer tarballs (bottom layer first)"
    )
    imp.add_argument("paths", nargs="+", type=Path)
    imp.add_argument("--name", required=True, help="NAME[:TAG]")
    imp.add_argument(
        "--cmd", nargs="+", default=None, dest="image_cmd", help="default command (default /bin/sh)"
    )
    isub.add_parser("ls", help="list images")
    irm = isub.add_parser("rm", help="remove images")
    irm.add_argument("refs", nargs="+")

    def common_create(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--name")
        sp.add_argument(
            "--restart", default="no", help="no | on-failure[:N] | always | unless-stopped"
        )
        sp.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE")
        sp.add_argument("-w", "--workdir")
        sp.add_argument("--rm", action="store_true", help="remove the container when it exits")
        sp.add_argument(
            "--storage-driver",
            choices=("cowfs", "overlay"),
            default=os.environ.get("COWCTL_STORAGE_DRIVER", "cowfs"),
            help="cowfs (default), or kernel overlayfs for comparison",
        )
        sp.add_argument("image")
        sp.add_argument("command", nargs=argparse.REMAINDER)

    common_create(sub.add_parser("create", help="create a container"))
    run = sub.add_parser("run", help="create and start a container")
    run.add_argument("-d", "--detach", action="store_true")
    common_create(run)

    for verb, helptext in (
        ("start", "start containers"),
        ("pause", "freeze containers"),
        ("unpause", "thaw containers"),
    ):
        sp = sub.add_parser(verb, help=helptext)
        sp.add_argument("containers", nargs="+")
    for verb in ("stop", "restart"):
        sp = sub.add_parser(verb, help=f"{verb} containers")
        sp.add_argument("-t", "--time", "--timeout", type=float, default=None, dest="timeout")
        if verb == "stop":
            sp.add_argument("-s", "--signal", default="SIGTERM")
        sp.add_argument("containers", nargs="+")
    k = sub.add_parser("kill", help="signal containers")
    k.add_argument("-s", "--signal", default="SIGKILL")
    k.add_argument("containers", nargs="+")
    r = sub.add_parser("rm", help="remove containers")
    r.add_argument("-f", "--force", action="store_true")
    r.add_argument("containers", nargs="+")
    ps = sub.add_parser("ps", help="list containers")
    ps.add_argument("-a", "--all", action="store_true")
    ps.add_argument("-q", "--quiet", action="store_true")
    ps.add_argument("--no-trunc", action="store_true")
    ins = sub.add_parser("inspect", help="show containers as JSON")
    ins.add_argument("-f", "--format", default=None, help="a State field path, e.g. .State.Status")
    ins.add_argument("containers", nargs="+")
    lg = sub.add_parser("logs", help="print a container's output")
    lg.add_argument("-f", "--follow", action="store_true")
    lg.add_argument("-t", "--timestamps", action="store_true")
    lg.add_argument("container")
    w = sub.add_parser("wait", help="wait for containers to stop; print their exit codes")
    w.add_argument("containers", nargs="+")
    d = sub.add_parser("diff", help="changes to a container's filesystem (A/C/D)")
    d.add_argument("container")
    df = sub.add_parser("df", help="disk usage of images, layers and containers")
    df.add_argument("-v", "--verbose", action="store_true")
    ev = sub.add_parser("events", help="container and image events")
    ev.add_argument("--since", default=None, help="UNIX seconds or RFC 3339 (default: now)")
    ev.add_argument("--until", default=None, help="UNIX seconds or RFC 3339 (default: follow)")
    sub.add_parser("reconcile", help="only reconcile the state with the machine")
    return p


def _time_arg(s: str) -> int:
    try:
        return int(float(s) * 1e9)
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise CtlError(f"invalid time: {s} (UNIX seconds or RFC 3339)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return int(t.timestamp() * 1e9)


def _each(refs: list[str], fn) -> int:  # noqa: ANN001
    """Docker's multi-container verbs: act on each, report each failure, exit 1 if any failed."""
    rc = 0
    for ref in refs:
        try:
            out = fn(ref)
            print(out if isinstance(out, str) else ref)
        except CtlError as e:
            print(f"Error: {e}", file=sys.stderr)
            rc = 1
    return rc


def run(args: argparse.Namespace) -> int:
    root = args.root or Path(os.environ.get("COWFS_ROOT") or DEFAULT_ROOT)
    if os.geteuid() != 0:
        raise CtlError("cowctl needs root (it mounts filesystems and creates namespaces)")
    ctl = Controller(root)
    cmd = args.cmd
    if cmd == "image":
        if args.icmd == "import":
            image = ctl.image_import(args.paths, args.name, args.image_cmd)
            print(image.id)
        elif args.icmd == "ls":
            rows = [["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"]]
            sizes = {r["digest"]: r["size"] for r in ctl.store.layers()}
            for i in ctl.images():
                size = sum(sizes.get(d, 0) for d in set(i.layers))
                rows.append(
                    [i.name, i.tag, i.id[7:19], f"{_ago(i.created)} ago", _human_size(size)]
                )
            _table(rows)
        else:
            rc = 0
            for ref in args.refs:
                try:
                    for line in ctl.image_rm(ref):
                        print(line)
                except CtlError as e:
                    print(f"Error: {e}", file=sys.stderr)
                    rc = 1
            return rc
        return 0
    if cmd in ("create", "run"):
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        c = ctl.create(
            args.image,
            command,
            args.name,
            args.env,
            args.workdir,
            args.restart,
            args.rm,
            args.storage_driver,
        )
        if cmd == "create":
            print(c.id)
            return 0
        log = None if args.detach else ctl.open_log(c.id)
        try:
            c = ctl.start(c.id)
        except CtlError as e:
            if log is not None:
                log.close()
            raise CtlError(str(e), 125 if e.code == 1 else e.code) from None
        if log is None:
            print(c.id)
            return 0
        return _attach(ctl, c, log)
    if cmd == "start":
        return _each(args.containers, lambda r: (ctl.start(r), r)[1])
    if cmd == "pause":
        return _each(args.containers, lambda r: (ctl.pause(r), r)[1])
    if cmd == "unpause":
        return _each(args.containers, lambda r: (ctl.unpause(r), r)[1])
    if cmd == "stop":
        sig = _parse_signal(args.signal)
        return _each(args.containers, lambda r: (ctl.stop(r, args.timeout, sig), r)[1])
    if cmd == "restart":
        return _each(args.containers, lambda r: (ctl.restart(r, args.timeout), r)[1])
    if cmd == "kill":
        sig = _parse_signal(args.signal)
        return _each(args.containers, lambda r: (ctl.kill(r, sig), r)[1])
    if cmd == "rm":
        return _each(args.containers, lambda r: (ctl.rm(r, args.force), r)[1])
    if cmd == "ps":
        cons = [
            c
            for c in ctl.store.containers()
            if args.all or c.status in (Status.RUNNING, Status.PAUSED, Status.RESTARTING)
        ]
        if args.quiet:
            for c in cons:
                print(c.id if args.no_trunc else c.id[:12])
            return 0
        rows = [["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "NAMES"]]
        for c in cons:
            command = " ".join(c.config["cmd"])
            if not args.no_trunc and len(command) > 20:
                command = command[:19] + "…"
            rows.append(
                [
                    c.id if args.no_trunc else c.id[:12],
                    c.config.get("image_ref", ""),
                    f'"{command}"',
                    f"{_ago(c.created)} ago",
                    status_line(c),
                    c.name,
                ]
            )
        _table(rows)
        return 0
    if cmd == "inspect":
        out, rc = [], 0
        for ref in args.containers:
            try:
                out.append(ctl.inspect(ctl.find(ref)))
            except CtlError as e:
                print(f"Error: {e}", file=sys.stderr)
                rc = 1
        if args.format:
            for doc in out:
                v = doc
                for part in args.format.strip("{} ").lstrip(".").split("."):
                    v = v[part]
                print(json.dumps(v) if isinstance(v, (dict, list, bool)) else v)
        else:
            print(json.dumps(out, indent=4))
        return rc
    if cmd == "logs":
        for stream, t, data in ctl.logs(args.container, args.follow):
            _emit(stream, data, t if args.timestamps else None)
        return 0
    if cmd == "wait":
        rc = 0
        for ref in args.containers:
            try:
                print(ctl.wait(ref))
            except CtlError as e:
                print(f"Error: {e}", file=sys.stderr)
                rc = 1
        return rc
    if cmd == "diff":
        for kind, path in ctl.diff(args.container):
            print(f"{kind} {path}")
        return 0
    if cmd == "df":
        return _df(ctl, args.verbose)
    if cmd == "events":
        return _events(ctl, args.since, args.until)
    return 0  # reconcile: done by Controller()


def _emit(stream: str, data: bytes, stamp: str | None) -> None:
    out = sys.stderr.buffer if stream == "stderr" else sys.stdout.buffer
    if stamp is not None:
        out.write(stamp.encode() + b" ")
    out.write(data)
    out.flush()


def _attach(ctl: Controller, c: Container, log: object) -> int:
    """`run` in the foreground: stream the log until the container ends, pass SIGINT/SIGTERM on
    (Docker's sig-proxy), exit with its code."""

    def forward(signum: int, _frame: object) -> None:
        try:
            ctl.kill(c.id, signum)
        except CtlError:
            pass

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    for stream, _t, data in ctl.stream(log, c.id, follow=True):
        _emit(stream, data, None)
    code = ctl.wait(c.id)
    if c.config.get("auto_remove"):
        # The monitor removes it; wait for that so that `run --rm` leaves nothing behind.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                ctl.store.get(c.id)
            except CtlError:
                break
            time.sleep(0.02)
    return code


def _df(ctl: Controller, verbose: bool) -> int:
    d = ctl.df()
    n_img = len(d["images"])
    pct = lambda part, whole: f"{_human_size(part)} ({100 * part // whole if whole else 0}%)"  # noqa: E731
    rows = [
        ["TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"],
        [
            "Images",
            str(n_img),
            str(d["images_active"]),
            _human_size(d["layers_bytes"]),
            pct(d["images_reclaimable"], d["layers_bytes"]),
        ],
        [
            "Containers",
            str(len(d["containers"])),
            str(d["containers_active"]),
            _human_size(d["containers_bytes"]),
            pct(d["containers_reclaimable"], d["containers_bytes"]),
        ],
    ]
    _table(rows)
    if verbose:
        print("\nImages space usage:\n")
        rows = [
            ["REPOSITORY", "TAG", "IMAGE ID", "SIZE", "SHARED SIZE", "UNIQUE SIZE", "CONTAINERS"]
        ]
        for i in d["images"]:
            name, _, tag = i["ref"].rpartition(":")
            rows.append(
                [
                    name,
                    tag,
                    i["id"][7:19],
                    _human_size(i["size"]),
                    _human_size(i["shared"]),
                    _human_size(i["unique"]),
                    str(i["containers"]),
                ]
            )
        _table(rows)
        print("\nContainers space usage:\n")
        rows = [["CONTAINER ID", "IMAGE", "SIZE", "STATUS", "NAMES"]]
        for c in d["containers"]:
            rows.append([c["id"][:12], c["image"], _human_size(c["size"]), c["status"], c["name"]])
        _table(rows)
    return 0


def _events(ctl: Controller, since: str | None, until: str | None) -> int:
    since_ns = _time_arg(since) if since else time.time_ns()
    until_ns = _time_arg(until) if until else None
    seq = 0
    while True:
        for e in ctl.store.events_after(seq):
            seq = e["seq"]
            if e["time_ns"] < since_ns:
                continue
            if until_ns is not None and e["time_ns"] > until_ns:
                return 0
            t = datetime.fromtimestamp(e["time_ns"] / 1e9, tz=UTC)
            attrs = json.loads(e["attributes"])
            attr_s = ", ".join(f"{k}={v}" for k, v in sorted(attrs.items()))
            stamp = t.strftime("%Y-%m-%dT%H:%M:%S") + f".{e['time_ns'] % 1_000_000_000:09d}Z"
            print(
                f"{stamp} {e['type']} {e['action']} {e['actor_id']}"
                + (f" ({attr_s})" if attr_s else ""),
                flush=True,
            )
        if until_ns is not None and time.time_ns() > until_ns:
            return 0
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except CtlError as e:
        print(f"Error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
