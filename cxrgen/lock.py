"""One writer per output folder: an OS lock that dies with its holder, so a killed run never blocks resume."""
from __future__ import annotations

import errno
import os
from pathlib import Path

from cxrgen.errors import InputError
from cxrgen.store import io_error

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock; the lock becomes advisory-only
    fcntl = None

LOCK_FILE = "lock"


class FolderLock:
    """Exclusive flock on OUT/.cxrgen/lock; ranks of one distributed run share it."""

    def __init__(self, state_dir: Path, shared: bool = False):
        self.path = state_dir / LOCK_FILE
        self.shared = shared
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        """Take the lock at once or raise InputError naming the holder."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # full disk, I/O error, read-only folder: one line naming the path
            raise io_error(self.path, exc) from None
        self._flock_or_refuse(fd)
        if not self.shared:
            _write_pid(fd)
        self._fd = fd
        return self

    def check_free(self) -> None:
        """Refuse at once if another process holds the lock; keeps no lock and creates no file.

        Called before the models load, so a second writer is told in a second, not after minutes.
        """
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError:
            return  # no lock file: nobody has claimed the folder yet
        self._flock_or_refuse(fd)
        os.close(fd)  # drops the probe's lock; acquire() takes the real one

    def _flock_or_refuse(self, fd: int) -> None:
        if fcntl is None:
            return
        mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        if not _flock(fd, mode | fcntl.LOCK_NB):
            holder = _read_holder(fd)
            os.close(fd)
            raise InputError(f"another cxrgen process{holder} is writing {self.path.parent.parent}; "
                             "wait for it to finish or stop it, then resume")

    def release(self) -> None:
        """Drop the lock (the OS also drops it when the process dies)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


def _flock(fd: int, mode: int) -> bool:
    """flock; False only when another process holds the lock."""
    try:
        fcntl.flock(fd, mode)
    except OSError as exc:
        if exc.errno in _BUSY:
            return False
        # This file system cannot lock (e.g. Lustre mounted without -o flock): run unprotected rather
        # than refuse every run with a bogus "another process" message.
    return True


def _write_pid(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass  # the pid only names the holder in messages; the flock itself is what keeps writers out


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""


class MergeLock:
    """Blocking exclusive flock for the one-time merge of all ranks' records into metadata.parquet."""

    def __init__(self, state_dir: Path):
        self.path = state_dir / "merge.lock"
        self._fd: int | None = None

    def __enter__(self) -> "MergeLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            _flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
