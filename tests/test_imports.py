"""The module layering of architecture.md, enforced: pure modules stay pure, only the adapter and
the daemon know pyfuse3, only _sys knows ctypes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PURE = {
    "cowfs/union.py",
    "cowfs/ondisk.py",
    "cowfs/options.py",
    "cowfs/errors.py",
    "lifecycle/states.py",
    "lifecycle/errors.py",
}
PYFUSE3_ALLOWED = {"cowfs/fuse_ops.py", "cowfs/daemon.py"}
CTYPES_ALLOWED = {"cowfs/_sys.py", "lifecycle/_sys.py"}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


MODULES = sorted(
    str(p.relative_to(ROOT)) for pkg in ("cowfs", "lifecycle") for p in (ROOT / pkg).glob("*.py")
)


@pytest.mark.parametrize("mod", MODULES)
def test_layering(mod: str) -> None:
    used = imports(ROOT / mod)
    if mod in PURE:
        assert not used & {"os", "trio", "pyfuse3", "ctypes", "fcntl", "shutil"}, used
    if mod not in PYFUSE3_ALLOWED:
        assert "pyfuse3" not in used
    if mod not in CTYPES_ALLOWED:
        assert not used & {"ctypes", "fcntl"}


def test_union_rules_import_nothing_with_effects() -> None:
    assert imports(ROOT / "cowfs/union.py") <= {"__future__", "collections", "dataclasses", "cowfs"}


@pytest.mark.parametrize("mod", [m for m in MODULES if m.startswith("lifecycle/")])
def test_lifecycle_drives_cowfs_only_through_its_cli(mod: str) -> None:
    """A crash in one mount cannot take the controller down: cowfs runs as a separate process."""
    assert not imports(ROOT / mod) & {"cowfs", "pyfuse3", "trio"} or _only_options(ROOT / mod)


def _only_options(path: Path) -> bool:
    """The one exception (architecture.md 3.4): cowfs.options, to build valid option strings."""
    guarded = ("cowfs", "pyfuse3", "trio")
    tree = ast.parse(path.read_text(), str(path))
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            used.update(a.name for a in node.names if a.name.split(".")[0] in guarded)
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.split(".")[0] in guarded
        ):
            used.add(node.module)
    return used == {"cowfs.options"}
