"""User-facing errors: one exception type with an exit code, printed as one line by the CLI.

Exit codes (documented in README.md):
  1  generic failure (the daemon stopped with an error)
  2  bad command line or mount options
  3  a layer, upper, work or mount point path is missing or unsafe
  4  the mount itself failed (libfuse refused it, mount point busy)
"""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PATH = 3
EXIT_MOUNT = 4


class UserError(Exception):
    """A problem the user can fix; shown without a traceback."""

    def __init__(self, msg: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(msg)
        self.exit_code = exit_code
