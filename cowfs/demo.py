"""The cowfs demo (`python -m cowfs.demo`, run by `scripts/demo.sh`).

Builds a small two-layer image in a temporary directory, mounts it through the cowfs CLI exactly as
a user would (`python -m cowfs -o lowerdir=TOP:BOTTOM,upperdir=U,workdir=W MNT`, which returns once
the mount is ready), shows the merged view, a copy-up and a whiteout by looking at the layer
directories themselves, unmounts, and finally mounts the same directories with kernel overlayfs to
show that it reads what cowfs wrote. Every mount is unmounted and the temporary directory removed
in `finally` (unless `--keep`). Needs root and /dev/fuse.

This is a program, not a library: nothing here is imported by cowfs itself.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

from cowfs.options import escape

__all__ = ["main"]

WIDTH = 78

# The image: layer name -> {relative path: content}. A str is a file, "DIR" a directory,
# ("symlink", target) a symlink, "WHITEOUT" a kernel overlayfs whiteout (char device 0/0).
DIR = "DIR"
WHITEOUT = "WHITEOUT"
HELLO = """#!/bin/sh
echo "Hello from bin/hello, a shell script in the base layer."
"""
BASE: dict[str, object] = {
    "etc": DIR,
    "etc/os-release": 'NAME="Demo Linux"\nVERSION="1.0"\nID=demo\n',
    "etc/motd": "Welcome to Demo Linux 1.0 (base layer).\n",
    "etc/hostname": "demo\n",
    "bin": DIR,
    "bin/hello": HELLO,
    "bin/hi": ("symlink", "hello"),
    "srv": DIR,
    "srv/www": DIR,
    "srv/www/index.html": "<h1>It works</h1>\n",
    "srv/www/about.html": "<p>about</p>\n",
    "srv/www/contact.html": "<p>contact</p>\n",
    "var": DIR,
    "var/log": DIR,
    "var/log/old.log": "a log file the patch layer deletes\n",
    "var/log/boot.log": "boot ok\n",
}
PATCH: dict[str, object] = {
    "etc": DIR,
    "etc/motd": "Welcome to Demo Linux 1.1 (patch layer: overrides the base's motd).\n",
    "opt": DIR,
    "opt/app": DIR,
    "opt/app/config.ini": "[app]\nport = 8080\n",
    "var": DIR,
    "var/log": DIR,
    "var/log/old.log": WHITEOUT,
}


# --- output helpers ----------------------------------------------------------------------------


_blank = True  # was the last line printed blank? (so that blank lines never pile up)
_short: tuple[str, str] | None = None  # (the temporary directory, what to print instead)


def out(text: str = "") -> None:
    """Print, shortening the temporary directory to $D and collapsing runs of blank lines."""
    global _blank
    if _short is not None:
        text = text.replace(*_short)
    for line in text.split("\n") if text else [""]:
        if line.strip() or not _blank:
            print(line.rstrip())
        _blank = not line.strip()


def heading(n: int, title: str) -> None:
    out()
    out(f"== {n}. {title} ".ljust(WIDTH, "="))


def explain(text: str) -> None:
    for para in textwrap.dedent(text).strip().split("\n\n"):
        out(textwrap.fill(" ".join(para.split()), WIDTH))
        out()


def show_cmd(cmd: str | list[str]) -> None:
    out("  $ " + (cmd if isinstance(cmd, str) else " ".join(shlex.quote(a) for a in cmd)))


def indent(text: str, prefix: str = "    ") -> str:
    return textwrap.indent(text.rstrip("\n"), prefix, lambda _line: True)


# --- looking at files ----------------------------------------------------------------------------


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)


def describe(path: Path) -> str:
    """One-line description of what `path` is (never follows a symlink)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return "(absent)"
    mode = stat.filemode(st.st_mode)
    if is_whiteout(st):
        return f"{mode}  char device 0,0 = WHITEOUT"
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return f"{mode}  device {os.major(st.st_rdev)},{os.minor(st.st_rdev)}"
    if stat.S_ISLNK(st.st_mode):
        return f"{mode}  -> {os.readlink(path)}"
    if stat.S_ISDIR(st.st_mode):
        return f"{mode}  directory"
    return f"{mode}  {st.st_size} bytes"


def walk(root: Path) -> Iterator[Path]:
    """Every entry below `root`, relative to it, parents first, sorted; never follows symlinks."""
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        rel = Path(e.name)
        yield rel
        if e.is_dir(follow_symlinks=False):
            for sub in walk(root / e.name):
                yield rel / sub


def tree(root: Path, note: dict[Path, str] | None = None) -> str:
    """An indented listing of `root`, with an optional note per entry."""
    lines = []
    for rel in walk(root):
        p = root / rel
        st = p.lstat()
        name = rel.name + ("/" if stat.S_ISDIR(st.st_mode) else "")
        if stat.S_ISLNK(st.st_mode):
            name += f" -> {os.readlink(p)}"
        elif is_whiteout(st):
            name += "  [whiteout: char device 0/0]"
        elif stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
            name += "*"
        left = "  " * (len(rel.parts) - 1) + name
        extra = (note or {}).get(rel, "")
        lines.append(f"{left:<40} {extra}".rstrip() if extra else left)
    return "\n".join(lines) if lines else "(empty)"


def snapshot(root: Path) -> dict[str, str]:
    """What a tree holds, for comparing two views: path -> type and content digest."""
    out = {}
    for rel in walk(root):
        p = root / rel
        st = p.lstat()
        if stat.S_ISREG(st.st_mode):
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            what = f"file {st.st_mode & 0o7777:o} {digest}"
        elif stat.S_ISLNK(st.st_mode):
            what = "symlink " + os.readlink(p)
        elif stat.S_ISDIR(st.st_mode):
            what = f"dir {st.st_mode & 0o7777:o}"
        else:
            what = describe(p)
        out[str(rel)] = what
    return out


# --- building the image --------------------------------------------------------------------------


def build_layer(root: Path, spec: dict[str, object]) -> None:
    root.mkdir(parents=True)
    for rel, what in spec.items():
        p = root / rel
        if what == DIR:
            p.mkdir(mode=0o755)
        elif what == WHITEOUT:
            # Exactly what kernel overlayfs writes for a deleted name: a 0/0 character device.
            os.mknod(p, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        elif isinstance(what, tuple):
            os.symlink(what[1], p)
        else:
            assert isinstance(what, str)
            p.write_text(what)
            p.chmod(0o755 if what.startswith("#!") else 0o644)


# --- mounting ------------------------------------------------------------------------------------


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            mnt = line.split()[4].encode().decode("unicode_escape")
            if mnt == target:
                return True
    return False


def fstype(path: Path) -> str:
    target = os.path.realpath(path)
    found = "?"
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if fields[4].encode().decode("unicode_escape") == target:
                found = fields[fields.index("-") + 1]  # the last mount there wins
    return found


def esc(path: Path) -> str:
    """A path as one element of an overlayfs option string."""
    return escape(str(path))


def daemon_pids(mnt: Path) -> list[int]:
    """cowfs processes whose command line names this mount point."""
    target = os.fsencode(os.path.realpath(mnt))
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if target in argv and any(b"cowfs" in a for a in argv):
            pids.append(int(d))
    return pids


def unmount(mnt: Path, *, cowfs: bool) -> bool:
    """Unmount (lazily if busy); for cowfs, wait for its daemon to exit. True if nothing is left."""
    for _ in range(50):
        if not is_mounted(mnt):
            break
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
            time.sleep(0.1)
    if cowfs:
        deadline = time.monotonic() + 10
        while daemon_pids(mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in daemon_pids(mnt):
            print(f"  (cowfs daemon {pid} still running after unmount; sending SIGTERM)")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    return not is_mounted(mnt)


# --- the demo ------------------------------------------------------------------------------------


class Demo:
    def __init__(self, top: Path) -> None:
        self.top = top
        self.base = top / "layers" / "base"
        self.patch = top / "layers" / "patch"
        self.upper = top / "upper"
        self.work = top / "work"
        self.mnt = top / "mnt"
        self.layers = {"upper": self.upper, "patch": self.patch, "base": self.base}

    def where(self, rel: Path) -> str:
        """Which layer(s) an entry of the merged view comes from, read off the layer directories."""
        found = []
        for name, root in self.layers.items():
            try:
                st = (root / rel).lstat()
            except (FileNotFoundError, NotADirectoryError):
                continue
            if is_whiteout(st):
                break
            found.append(name)
            if not stat.S_ISDIR(st.st_mode):
                break  # a non-directory hides everything below it
        if len(found) > 1:
            return "(merged: " + " + ".join(found) + ")"
        return f"(from {found[0]})" if found else ""

    def run(self) -> int:
        global _short
        _short = (str(self.top), "$D")
        heading(1, "Build an image with two read-only layers")
        print(f"D={self.top}")  # printed as is: out() would shorten it to $D
        out()
        build_layer(self.base, BASE)
        build_layer(self.patch, PATCH)
        for d in (self.upper, self.work, self.mnt):
            d.mkdir()
        explain(
            """
            Everything lives in a temporary directory, $D above. Like a container image, it
            has two layers: 'base', a tiny root filesystem, and 'patch' on top of it, which
            replaces etc/motd, adds opt/app/ and deletes var/log/old.log. A layer records a
            deletion with a whiteout: a character device with device number 0/0, the same marker
            kernel overlayfs uses.
            """
        )
        out("  layers/base (bottom):")
        out(indent(tree(self.base)))
        out("\n  layers/patch (top):")
        out(indent(tree(self.patch)))
        out()
        explain(
            """
            $D/upper is where all changes made through the mount will go; $D/work is cowfs's
            scratch directory on the same filesystem. Both start empty. $D/mnt is the mount point.
            """
        )

        heading(2, "Mount with cowfs")
        opts = (
            f"lowerdir={esc(self.patch)}:{esc(self.base)},"
            f"upperdir={esc(self.upper)},workdir={esc(self.work)}"
        )
        argv = [sys.executable, "-m", "cowfs", "-o", opts, str(self.mnt)]
        explain("lowerdir= lists the layers top first; cowfs returns once the mount is ready.")
        show_cmd(["cowfs", "-o", opts, str(self.mnt)])
        # Its output goes to a file, not a pipe: a daemon that kept the pipe open would make
        # waiting for end-of-file hang.
        with tempfile.TemporaryFile("w+") as log:
            try:
                r = subprocess.run(argv, stdout=log, stderr=log, text=True, timeout=60)
            except subprocess.TimeoutExpired:
                out("\n  cowfs did not return within 60 s")
                return 1
            log.seek(0)
            output = log.read()
        if r.returncode != 0:
            out(f"\n  cowfs failed with exit code {r.returncode}:")
            out(indent(output or "(no output)"))
            return r.returncode
        if not is_mounted(self.mnt):
            out("\n  cowfs returned 0 but nothing is mounted there")
            return 1
        out(f"  mounted: {self.mnt} has type {fstype(self.mnt)} in /proc/self/mountinfo")

        heading(3, "The merged view")
        explain(
            """
            Through the mount, the layers look like one directory tree. The note on each line says
            which layer the entry comes from (read off the layer directories by this demo).
            """
        )
        notes = {rel: self.where(rel) for rel in walk(self.mnt)}
        out(indent(tree(self.mnt, notes)))
        out()
        out("  etc/motd exists in both layers; the top layer's copy wins:")
        out(indent((self.mnt / "etc/motd").read_text(), "    | "))
        out()
        out("  var/log/old.log is in layers/base, but the whiteout in layers/patch hides it:")
        out(f"    {self.base / 'var/log/old.log'}: {describe(self.base / 'var/log/old.log')}")
        out(f"    {self.mnt / 'var/log/old.log'}: {describe(self.mnt / 'var/log/old.log')}")
        out()
        out("  Programs in the layers run from the mount (bin/hi is a symlink to hello):")
        show_cmd([str(self.mnt / "bin/hi")])
        try:
            ran = subprocess.run(
                [str(self.mnt / "bin/hi")], capture_output=True, text=True, timeout=30
            )
            out(indent(ran.stdout + ran.stderr, "    | "))
        except (OSError, subprocess.TimeoutExpired) as e:
            out(f"    (could not run it: {e})")

        heading(4, "Write to a file from a lower layer: copy-up")
        target = "etc/os-release"
        explain(
            f"""
            Now append a line to {target}, which only layers/base has. Lower layers are never
            changed: before the first write, cowfs copies the file (data, owner, mode, times,
            xattrs) into the upper directory, creating etc/ there too, and the write goes to that
            copy. This is copy-up.
            """
        )
        show_cmd(f"echo 'VARIANT=\"demo edit\"' >> {self.mnt / target}")
        with open(self.mnt / target, "a") as f:
            f.write('VARIANT="demo edit"\n')
        out()
        for label, root in (("mount", self.mnt), ("upper", self.upper), ("base", self.base)):
            p = root / target
            out(f"  {label + '/' + target:<22} {describe(p)}")
            if p.exists():
                out(indent(p.read_text(), "      | "))
        out("\n  upper now holds:")
        out(indent(tree(self.upper)))

        heading(5, "Delete a file from a lower layer: whiteout")
        victim = "srv/www/about.html"
        explain(
            f"""
            Delete {victim}, which is in layers/base. It cannot be removed from the read-only
            layer, so cowfs records the deletion in the upper directory as a whiteout (a 0/0
            character device, as kernel overlayfs does), and the name disappears from the mount.
            """
        )
        before = sorted(os.listdir(self.mnt / "srv/www"))
        show_cmd(["rm", str(self.mnt / victim)])
        (self.mnt / victim).unlink()
        after = sorted(os.listdir(self.mnt / "srv/www"))
        out()
        out(f"  ls mount/srv/www before: {'  '.join(before)}")
        out(f"  ls mount/srv/www after:  {'  '.join(after)}")
        out()
        for label, root in (("upper", self.upper), ("base", self.base)):
            out(f"  {label + '/' + victim:<26} {describe(root / victim)}")

        heading(6, "Create a new file")
        new = "srv/www/news.html"
        explain("New files go straight to the upper directory; no layer ever sees them.")
        show_cmd(f"echo '<p>news</p>' > {self.mnt / new}")
        (self.mnt / new).write_text("<p>news</p>\n")
        out()
        for label, root in (("upper", self.upper), ("patch", self.patch), ("base", self.base)):
            out(f"  {label + '/' + new:<25} {describe(root / new)}")

        heading(7, "Side by side: srv/www in each directory")
        cols = [
            ("layers/base", self.base),
            ("layers/patch", self.patch),
            ("upper", self.upper),
            ("mount (merged)", self.mnt),
        ]
        listings = []
        for _, root in cols:
            d = root / "srv/www"
            names = []
            if d.is_dir():
                for n in sorted(os.listdir(d)):
                    names.append(n + (" (wh)" if is_whiteout((d / n).lstat()) else ""))
            listings.append(names or ["(no srv/www)"])
        w = max(len(n) for names in listings for n in names) + 3
        out("  (wh) = whiteout")
        out()
        out("  " + "".join(f"{label:<{w}}" for label, _ in cols))
        out("  " + "".join(f"{'-' * (w - 2):<{w}}" for _ in cols))
        for i in range(max(map(len, listings))):
            row = "".join(f"{(ls[i] if i < len(ls) else ''):<{w}}" for ls in listings)
            out("  " + row.rstrip())
        out()
        explain(
            """
            The merged listing is the upper listing laid over the lower ones, minus whiteouts.
            Neither layer was modified: every change is in 'upper'.
            """
        )
        merged = snapshot(self.mnt)

        heading(8, "Unmount")
        show_cmd(["umount", str(self.mnt)])
        if not unmount(self.mnt, cowfs=True):
            out("  unmount failed")
            return 1
        out("  unmounted; the layers and upper stay behind as plain directories.")

        heading(9, "Kernel overlayfs reads what cowfs wrote")
        self.check_with_kernel(merged)
        return 0

    def check_with_kernel(self, merged: dict[str, str]) -> None:
        explain(
            """
            cowfs writes kernel overlayfs's on-disk format, so the kernel can mount the same
            directories. Mount them read-only with kernel overlayfs, upper as the top layer, and
            compare with what cowfs showed.
            """
        )
        kmnt = self.top / "kernel-mnt"
        kmnt.mkdir()
        opts = f"lowerdir={esc(self.upper)}:{esc(self.patch)}:{esc(self.base)}"
        show_cmd(["mount", "-t", "overlay", "overlay", "-o", opts, str(kmnt)])
        r = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", opts, str(kmnt)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            out(f"  (skipped: kernel overlayfs is not available here: {r.stderr.strip()})")
            return
        try:
            kernel = snapshot(kmnt)
        finally:
            unmount(kmnt, cowfs=False)
        if kernel == merged:
            out(f"  same {len(kernel)} entries, types, modes and contents as the cowfs mount.")
        else:
            out("  DIFFERENCES between cowfs and kernel overlayfs:")
            for path in sorted(set(kernel) | set(merged)):
                if kernel.get(path) != merged.get(path):
                    out(f"    {path}: cowfs={merged.get(path)} kernel={kernel.get(path)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m cowfs.demo",
        description="Build a two-layer image, mount it with cowfs, show copy-up and whiteouts.",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory afterwards")
    args = ap.parse_args(argv)

    problems = []
    if os.geteuid() != 0:
        problems.append("it must run as root (FUSE mounts of other users' layers, mknod)")
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse is missing")
    if shutil.which("fusermount3") is None:
        problems.append("fusermount3 is missing (Debian package fuse3; run scripts/setup.sh)")
    if problems:
        print("cowfs demo: cannot run here: " + "; ".join(problems), file=sys.stderr)
        return 1

    out("cowfs demo".center(WIDTH))
    out("a copy-on-write union filesystem in FUSE, in kernel overlayfs's format".center(WIDTH))
    top = Path(tempfile.mkdtemp(prefix="cowfs-demo-"))
    demo = Demo(top)
    rc = 1
    try:
        rc = demo.run()
    except KeyboardInterrupt:
        print("\ninterrupted")
        rc = 130
    finally:
        clean = all(unmount(p, cowfs=(p == demo.mnt)) for p in (demo.mnt, top / "kernel-mnt"))
        if not clean:
            print(f"\nSomething is still mounted under {top}; left it in place.", file=sys.stderr)
            rc = rc or 1
        elif args.keep:
            print(f"\nKept {top} (remove it with: rm -rf {shlex.quote(str(top))})")
        else:
            shutil.rmtree(top)
            print(f"\nRemoved {top}.")
    if rc == 0:
        print("Demo finished.")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
