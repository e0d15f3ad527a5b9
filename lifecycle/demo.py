"""The container demo (the README's main job, after the filesystem demo): a two-layer image built
from Debian's busybox-static, three containers sharing it, each with its own changes, one paused
and unpaused, all stopped and removed, nothing left mounted. Runs under a temporary state root, so
it never touches /var/lib/cowfs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["build_busybox_layers", "main"]

BUSYBOX = "/bin/busybox"


def build_busybox_layers(dest: Path) -> list[Path]:
    """Two layer directories, bottom first: a busybox root, and an 'app' layer that adds a file,
    replaces one and deletes one (an overlay whiteout), as an image build would."""
    if not os.path.exists(BUSYBOX):
        raise SystemExit(
            f"{BUSYBOX} is missing: install Debian's busybox-static (scripts/setup.sh does)"
        )
    base, app = dest / "base", dest / "app"
    for d in ("bin", "etc", "proc", "dev", "sys", "tmp", "root", "var/log"):
        (base / d).mkdir(parents=True, exist_ok=True)
    os.chmod(base / "tmp", 0o1777)
    shutil.copy2(BUSYBOX, base / "bin/busybox")
    applets = subprocess.run(
        [BUSYBOX, "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for a in applets:
        if a != "busybox" and not (base / "bin" / a).exists():
            os.symlink("busybox", base / "bin" / a)
    (base / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (base / "etc/group").write_text("root:x:0:\n")
    (base / "etc/motd").write_text("welcome to the base layer\n")
    (base / "etc/os-release").write_text('NAME="cowfs demo (busybox)"\n')
    (app / "etc").mkdir(parents=True)
    (app / "etc/motd").write_text("welcome to the app layer\n")
    (app / "etc/app.conf").write_text("greeting=hello\n")
    os.mknod(app / "etc/os-release", 0o600 | 0o020000, os.makedev(0, 0))  # whiteout
    return [base, app]


def _run(cowctl: list[str], *args: str, check: bool = True) -> str:
    print("$ cowctl " + " ".join(args), flush=True)
    r = subprocess.run([*cowctl, *args], capture_output=True, text=True)
    out = (r.stdout + r.stderr).rstrip()
    if out:
        print("  " + out.replace("\n", "\n  "), flush=True)
    if check and r.returncode != 0:
        raise SystemExit(f"demo: cowctl {' '.join(args)} failed ({r.returncode})")
    return r.stdout


def _mounted_under(root: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [ln.split()[4] for ln in f if ln.split()[4].startswith(str(root))]


def main() -> int:
    if os.geteuid() != 0:
        print("demo: needs root (mounts and namespaces)", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="cowctl-demo."))
    root = work / "state"
    cowctl = [sys.executable, "-m", "lifecycle", "--root", str(root)]
    names = ["web", "worker", "cron"]
    try:
        print("== an image from busybox-static: two layers (the second deletes /etc/os-release)")
        layers = build_busybox_layers(work / "src")
        _run(cowctl, "image", "import", *map(str, layers), "--name", "demo:1", "--cmd", "/bin/sh")
        _run(cowctl, "image", "ls")
        print("\n== three containers from it, each writing its own changes")
        for i, n in enumerate(names):
            script = (
                f"echo {n} > /etc/hostname-{n}; echo changed by {n} >> /etc/motd; "
                f"rm /etc/app.conf; mkdir -p /srv/{n}; "
                f"head -c {(i + 1) * 100000} /dev/zero > /srv/{n}/data; "
                "trap 'echo stopping; exit 0' TERM; while :; do sleep 0.1; done"
            )
            _run(cowctl, "run", "-d", "--name", n, "demo:1", "sh", "-c", script)
        time.sleep(0.5)
        _run(cowctl, "ps")
        print("\n== the image's layers are stored once; each container has only its own bytes")
        _run(cowctl, "df", "-v")
        for n in names:
            _run(cowctl, "diff", n)
        print("\n== pause one: its processes are frozen, the mount stays")
        _run(cowctl, "pause", "worker")
        _run(cowctl, "ps")
        _run(cowctl, "pause", "worker", check=False)
        _run(cowctl, "unpause", "worker")
        print("\n== stop them all (SIGTERM, recorded exit codes), then remove them")
        _run(cowctl, "stop", *names)
        _run(cowctl, "ps", "-a")
        _run(cowctl, "logs", "web")
        _run(cowctl, "rm", *names)
        _run(cowctl, "events", "--since", "0", "--until", str(time.time()))
        left = _mounted_under(work)
        print(f"\n== mounts left under {work}: {len(left)}")
        if left:
            print("demo: FAILED: mounts left: " + ", ".join(left), file=sys.stderr)
            return 1
        print("demo: done")
        return 0
    finally:
        subprocess.run([*cowctl, "rm", "-f", *names], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
