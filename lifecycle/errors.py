"""The one error type `cowctl` prints as a single line. Docker's CLI exits 1 for refused requests
and 125 when `run` itself fails; usage errors exit 2 (argparse)."""

from __future__ import annotations

__all__ = ["CtlError", "NotFound"]


class CtlError(Exception):
    def __init__(self, msg: str, code: int = 1) -> None:
        super().__init__(msg)
        self.code = code


class NotFound(CtlError):
    pass
