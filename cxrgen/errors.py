"""One exception family for everything cxrgen refuses or fails to do."""
from __future__ import annotations

# Exit code of a generate/resume process that finished its own share (a rank's) while other images of
# the run are still missing: not a failure, but not a complete dataset either.
INCOMPLETE_EXIT_CODE = 3


class CxrgenError(Exception):
    """Base of every error cxrgen raises on purpose; the CLI prints it as one line."""

    exit_code = 2


class InputError(CxrgenError):
    """Bad manifest, option, bundle or output folder: nothing was written."""

    exit_code = 2


class RunError(CxrgenError):
    """The run started but could not finish (I/O error, full disk); it can be resumed."""

    exit_code = 1


class Interrupted(CxrgenError):
    """SIGINT or SIGTERM stopped the run after flushing what was finished."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def first_line(exc: BaseException, *, with_type: bool = False, limit: int = 200) -> str:
    """The first line of an exception's message, cut to `limit` characters, for a one-line error."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0][:limit]
    return f"{type(exc).__name__}: {line}" if with_type else line
