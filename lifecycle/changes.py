"""What a container changed, read from its upper directory, and how many bytes trees use.

`changes(upper, lowers)` gives `docker diff`'s lines as `(kind, path)` pairs, kind `A`, `C` or
`D`, sorted by path. Rules (the upper is in the kernel overlayfs format; the fuse-overlayfs and
OCI forms are read too):
- Every entry of the upper is reported: `C` if the lower layers show something at that path, `A`
  otherwise. So a directory that only holds changes is `C` (Docker: `C /etc` with `A /etc/x`), and
  everything under a new directory is `A`.
- A whiteout (char device 0/0, a zero-size file with `overlay.whiteout`, or `.wh.NAME`) is `D`
  for NAME, if the lowers show NAME; a whiteout that hides nothing is not a change. Only the
  deleted path is listed, not what was under it (as Docker).
- An opaque directory (`overlay.opaque=y`, fuse-overlayfs's xattr or `.wh..wh..opq`) that
  replaced a lower directory (rm -r then mkdir) is `C`; each name the lowers showed in it that
  the upper does not have is `D`; names it has again are `C`, new ones `A`. This is what Docker's
  naive differ (`ChangesDirs`, the merged view against the lowers) prints. Docker's and podman's
  overlay differ (`OverlayChanges`) instead print `D /dir` for the opaque directory and nothing
  for the lower entries it hides, a line that contradicts `ls` on the container; we list the
  merged view's real difference. Under an opaque directory the same holds for every
  subdirectory, because nothing below it is merged with the lowers.
- Overlay metadata is never reported: `.wh..wh..opq`, fuse-overlayfs's stray `.wh..opq`, and
  xattr-only changes of overlay-private xattrs (`trusted.overlay.*`, the cowfs inode xattr) are
  not entries. Redirected directories (`overlay.redirect`, `redirect_dir=on`) are reported by
  their new path only (`A`), without the lower entries they carry.

`lowers` are in overlayfs order, top first (`lowerdir=TOP:...:BOTTOM`); the lower view merges
them as the kernel does (whiteouts and opaque directories in lowers hide what is below).

`disk_usage(paths)` is the exact allocated size (`st_blocks * 512`) of trees, each inode counted
once across all of them, symlinks never followed: shared layers counted once for `df`, and
`upper_usage(upper)` is a container's own bytes.

Nothing here writes; every path below the given roots is reached without following a symlink
(`lstat`, `scandir` entries, and descending only into what `lstat` says is a directory).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path

__all__ = ["changes", "disk_usage", "upper_usage"]

_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque", "user.fuseoverlayfs.opaque")
_WHITEOUT_XATTRS = ("trusted.overlay.whiteout", "user.overlay.whiteout")
_OCI_PREFIX = ".wh."
_OCI_OPAQUE = ".wh..wh..opq"
_OCI_META_PREFIX = ".wh..wh."
_FUSE_OVERLAYFS_STRAY = ".wh..opq"

# The lower view of one directory: name -> the lower directories that make it up, top first
# (an empty list for a non-directory).
_LowerView = dict[str, list[str]]


def changes(upper: Path, lowers: list[Path]) -> list[tuple[str, str]]:
    """Docker-style changes of an upper directory against its lower layers (module docstring)."""
    out: list[tuple[str, str]] = []
    roots = [os.fspath(p) for p in lowers]
    _walk_upper(os.fspath(upper), "", [r for r in roots if _is_real_dir(r)], False, out)
    out.sort(key=lambda c: os.fsencode(c[1]))
    return out


def disk_usage(paths: Iterable[Path]) -> int:
    """Allocated bytes of the trees at `paths`, each inode once (hard links, shared trees)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root in paths:
        st = os.lstat(root)
        stack = [os.fspath(root)]
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
        if not stat.S_ISDIR(st.st_mode):
            continue
        while stack:
            d = stack.pop()
            try:
                it = os.scandir(d)
            except FileNotFoundError:
                continue  # removed while we count (a running container)
            with it:
                for e in it:
                    try:
                        est = e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    key = (est.st_dev, est.st_ino)
                    if key not in seen:
                        seen.add(key)
                        total += est.st_blocks * 512
                    if stat.S_ISDIR(est.st_mode):
                        stack.append(e.path)
    return total


def upper_usage(upper: Path) -> int:
    """A container's own bytes: the allocated size of its upper directory."""
    return disk_usage([upper])


# ---------------------------------------------------------------------------------------------


def _walk_upper(
    udir: str, rel: str, lower_dirs: list[str], hiding: bool, out: list[tuple[str, str]]
) -> None:
    """Report the entries of upper directory `udir` (path `rel` in the container) and below.
    `lower_dirs` are the lower directories merged at `rel`; `hiding` is True when the upper
    directory does not merge with them (it or an ancestor is opaque), so lower names it lacks are
    deletions. Iterative, so a deep tree made inside a container cannot exhaust the stack."""
    stack = [(udir, rel, lower_dirs, hiding)]
    while stack:
        udir, rel, lower_dirs, hiding = stack.pop()
        try:
            with os.scandir(udir) as it:
                entries = {e.name: e for e in it}
        except FileNotFoundError:
            continue  # removed while we walk (a running container)
        hiding = hiding or _is_opaque(udir) or _OCI_OPAQUE in entries
        view = _lower_view(lower_dirs)
        present: set[str] = set()
        for name, e in entries.items():
            path = f"{rel}/{name}"
            if name in (_OCI_OPAQUE, _FUSE_OVERLAYFS_STRAY) or name.startswith(_OCI_META_PREFIX):
                continue
            if name.startswith(_OCI_PREFIX):
                target = name[len(_OCI_PREFIX) :]
                if target in view and target not in entries:
                    out.append(("D", f"{rel}/{target}"))
                present.add(target)
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            present.add(name)
            if _is_whiteout(e.path, st):
                if name in view:
                    out.append(("D", path))
                continue
            out.append(("C" if name in view else "A", path))
            if stat.S_ISDIR(st.st_mode):
                stack.append((e.path, path, view.get(name, []), hiding))
        if hiding:
            out.extend(("D", f"{rel}/{name}") for name in view if name not in present)


def _lower_view(lower_dirs: list[str]) -> _LowerView:
    """Merge one directory of the lower layers (top first) as overlayfs does."""
    view: _LowerView = {}
    closed: set[str] = set()  # names whose lookup stopped: a non-dir, a whiteout, an opaque dir
    for ldir in lower_dirs:
        try:
            it = os.scandir(ldir)
        except FileNotFoundError:
            continue
        with it:
            entries = list(it)
        oci_whiteouts: list[str] = []
        for e in entries:
            name = e.name
            if name in (_OCI_OPAQUE, _FUSE_OVERLAYFS_STRAY) or name.startswith(_OCI_META_PREFIX):
                continue
            if name.startswith(_OCI_PREFIX):
                oci_whiteouts.append(name[len(_OCI_PREFIX) :])
                continue
            if name in closed:
                continue
            st = e.stat(follow_symlinks=False)
            if _is_whiteout(e.path, st):
                closed.add(name)
            elif stat.S_ISDIR(st.st_mode):
                view.setdefault(name, []).append(e.path)
                if _is_opaque(e.path) or os.path.lexists(os.path.join(e.path, _OCI_OPAQUE)):
                    closed.add(name)
            else:
                view.setdefault(name, [])
                closed.add(name)
        # `.wh.X` hides X in the layers below, never an X of its own layer.
        closed.update(oci_whiteouts)
    return view


def _is_whiteout(path: str, st: os.stat_result) -> bool:
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return True
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        return any(_getxattr(path, n) is not None for n in _WHITEOUT_XATTRS)
    return False


def _is_opaque(path: str) -> bool:
    for n in _OPAQUE_XATTRS:
        v = _getxattr(path, n)
        if v:
            return v[:1] == b"y"
    return False


def _is_real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _getxattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.ENOENT):
            return None
        raise
