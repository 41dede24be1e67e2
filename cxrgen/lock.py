"""One writer per output folder: an OS lock that dies with its holder, so a killed run never blocks resume."""
from __future__ import annotations

import os
from pathlib import Path

from cxrgen.errors import InputError

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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except OSError:
                holder = _read_holder(fd)
                os.close(fd)
                raise InputError(f"another cxrgen process{holder} is writing {self.path.parent.parent}; "
                                 "wait for it to finish or stop it, then resume") from None
        if not self.shared:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the OS also drops it when the process dies)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


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
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
