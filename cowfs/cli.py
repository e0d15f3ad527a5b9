"""The `cowfs` command: overlayfs-style options, also called as the FUSE mount helper does
(`cowfs SOURCE MOUNTPOINT -o OPTIONS`). Bad input is one line on stderr and an exit code."""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import sys

from cowfs import __version__
from cowfs.errors import EXIT_USAGE, UserError
from cowfs.options import parse_options

__all__ = ["main"]

USAGE = """\
cowfs [-f] [-d] -o lowerdir=TOP:...:BOTTOM[,upperdir=DIR,workdir=DIR][,OPTIONS] MOUNTPOINT
       cowfs SOURCE MOUNTPOINT -o OPTIONS      (as mount -t fuse.cowfs calls it)"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2
        raise UserError(f"{message} (usage: {USAGE.splitlines()[0].strip()})", EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="cowfs",
        usage=USAGE,
        description="Copy-on-write union filesystem in FUSE, "
        "compatible with kernel overlayfs's on-disk format.",
    )
    p.add_argument("paths", nargs="+", metavar="[SOURCE] MOUNTPOINT")
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTIONS",
        help="comma-separated mount options (lowerdir=, upperdir=, workdir=, ro, ...)",
    )
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument("-d", "--debug", action="store_true", help="debug log (implies -f)")
    p.add_argument("--debug-fuse", action="store_true", help="libfuse's request trace on stderr")
    p.add_argument(
        "--log",
        metavar="FILE",
        help="log to FILE (default: stderr with -f, else syslog when available)",
    )
    p.add_argument("-V", "--version", action="version", version=f"cowfs {__version__}")
    return p


def setup_logging(debug: bool, foreground: bool, logfile: str | None) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    fmt = "%(asctime)s cowfs[%(process)d] %(levelname)s %(name)s: %(message)s"
    if logfile:
        h: logging.Handler = logging.FileHandler(logfile)
    elif foreground:
        h = logging.StreamHandler(sys.stderr)
    elif os.path.exists("/dev/log"):
        h = logging.handlers.SysLogHandler("/dev/log")
        fmt = "cowfs[%(process)d]: %(levelname)s %(name)s: %(message)s"
    else:
        h = logging.NullHandler()
    h.setFormatter(logging.Formatter(fmt))
    root.addHandler(h)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_intermixed_args(argv)
        if len(args.paths) > 2:
            raise UserError("too many arguments: expected [SOURCE] MOUNTPOINT", EXIT_USAGE)
        source = args.paths[0] if len(args.paths) == 2 else "cowfs"
        mountpoint = args.paths[-1]
        config = parse_options(args.options)
        foreground = args.foreground or args.debug or args.debug_fuse
        setup_logging(args.debug, foreground, args.log)
        from cowfs.daemon import mount

        return mount(config, mountpoint, source, foreground, args.debug_fuse)
    except UserError as e:
        print(f"cowfs: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
