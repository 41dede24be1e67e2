"""Who may write an output folder: OS locks that die with their holder, so a killed run never blocks resume.

Three locks live in OUT/.cxrgen/:
- `lock`: a plain run holds it exclusively; the ranks of a torchrun/Slurm launch share it, so a plain run
  and a launch never write the same folder at once.
- `rank<r>.lock`: each rank holds its own exclusively, so a duplicate rank or a second launch is refused.
- `init.lock`: held for a moment (blocking) while a process reads or writes run.json and claims its rank,
  so exactly one process writes run.json and every later one compares against it.
"""
from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from cxrgen.errors import InputError
from cxrgen.files import io_error

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock; the lock becomes advisory-only
    fcntl = None

LOCK_FILE = "lock"
INIT_LOCK_FILE = "init.lock"
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


def _open(path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:  # full disk, I/O error, read-only folder: one line naming the path
        raise io_error(path, exc) from None


def _flock(fd: int, mode: int) -> str:
    """flock: "locked", "busy" (another process holds it) or "unsupported" (this file system cannot lock)."""
    try:
        fcntl.flock(fd, mode)
    except OSError as exc:
        if exc.errno in _BUSY:
            return "busy"
        # e.g. Lustre mounted without -o flock: run, and let the caller say once that nothing keeps a second
        # writer out, rather than refuse every run with a bogus "another process".
        return "unsupported"
    return "locked"


def unlocked_warning(folder: Path) -> str:
    """The one-line warning for a folder whose file system cannot lock."""
    return (f"cxrgen: warning: the file system of {folder} does not support file locks; nothing stops a second "
            "cxrgen process from writing this folder at the same time, so start only one run per folder")


def holder_text(path: Path) -> str:
    """The holder named in a lock file, "pid N" or "pid N on HOST", or "" when it is not known to be alive."""
    try:
        fields = path.read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return ""
    if not fields or not fields[0].isdigit():
        return ""
    pid, host = int(fields[0]), (fields[1] if len(fields) > 1 else "")
    if host and host != socket.gethostname():
        return f"pid {pid} on {host}"  # cannot check a process on another host; the lock says it is held
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return ""  # a stale name: never point a user at a pid that may now be someone else's
    except PermissionError:
        pass  # alive, owned by another user
    return f"pid {pid}"


def holder_name() -> str:
    """How a lock file names this process: "pid host"."""
    return f"{os.getpid()} {socket.gethostname()}"


def _write_holder(fd: int, extra: str = "") -> None:
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder_name()}{extra}\n".encode(), 0)
    except OSError:
        pass  # the name only helps messages; the flock itself is what keeps writers out


class FolderLock:
    """Exclusive flock on OUT/.cxrgen/lock; ranks of one distributed run share it."""

    def __init__(self, state_dir: Path, shared: bool = False):
        self.path = state_dir / LOCK_FILE
        self.shared = shared
        self.unsupported = False  # True when the file system could not lock: the caller warns once
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        """Take the lock at once or raise InputError naming the holder."""
        fd = _open(self.path)
        self._flock_or_refuse(fd)
        if not self.shared:
            _write_holder(fd)
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
        got = _flock(fd, mode | fcntl.LOCK_NB)
        self.unsupported = got == "unsupported"
        if got == "busy":
            os.close(fd)
            holder = holder_text(self.path)
            who = f"another cxrgen process ({holder})" if holder else \
                "another cxrgen process (or the ranks of a torchrun/Slurm launch)"
            raise InputError(f"{who} is writing {self.path.parent.parent}; wait for it to finish or stop it, "
                             "then resume")

    def clear_holder(self) -> None:
        """Forget the last exclusive holder's pid: once ranks share the lock it names nobody alive."""
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass

    def release(self) -> None:
        """Drop the lock (the OS also drops it when the process dies)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def folder_held_by(state_dir: Path, holder: str) -> bool:
    """Whether the process named `holder` (holder_name() of it) still holds OUT/.cxrgen/lock exclusively.

    Asked by helpers of that process that may run on other machines (Ray actors): once it died, or another
    run took the folder, they must write nothing more. Where the file system cannot lock, the name is trusted.
    """
    path = state_dir / LOCK_FILE
    try:
        named = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return False
    if named != holder:
        return False
    if fcntl is None:
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        # A shared lock is refused only while someone holds the exclusive one; got, it goes with the fd.
        return _flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB) != "locked"
    finally:
        os.close(fd)


class RankLock:
    """Exclusive flock on OUT/.cxrgen/rank<r>.lock: one process per rank, one launch per folder.

    Taken only under InitLock, so probing the other ranks' locks cannot race with a rank taking its own.
    """

    def __init__(self, state_dir: Path, rank: int, world_size: int, scope: str = "all"):
        self.state_dir, self.rank, self.world_size, self.scope = state_dir, rank, world_size, scope
        self.path = state_dir / f"rank{rank}.lock"
        self._fd: int | None = None

    def acquire(self) -> "RankLock":
        """Claim this rank, or raise InputError when it, or a rank of a launch of another size, is running."""
        fd = _open(self.path)
        if fcntl is not None and _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB) == "busy":
            os.close(fd)
            holder = holder_text(self.path)
            raise InputError(f"rank {self.rank} is already running in {self.state_dir.parent}"
                             f"{f' ({holder})' if holder else ''}: a second launch into the same folder, or two "
                             "processes with the same RANK/SLURM_PROCID; stop the duplicate, or resume after the "
                             "first launch ends")
        _write_holder(fd, f" world_size={self.world_size} scope={self.scope}")
        self._fd = fd
        other = {int(f.get("world_size", 0)) for r, f in held_rank_locks(self.state_dir).items()
                 if r != self.rank} - {self.world_size}
        if other:
            self.release()
            raise InputError(f"a launch of {min(other)} ranks is still writing {self.state_dir.parent}, and this "
                             f"process is rank {self.rank} of {self.world_size}; their shares overlap, so wait for "
                             "that launch to end, then resume with any number of ranks")
        return self

    def mark_share_done(self) -> None:
        """Say in the lock file that this rank only waits now, so waiting ranks never wait for each other."""
        if self._fd is not None:
            _write_holder(self._fd, f" world_size={self.world_size} scope={self.scope} share=done")

    def release(self) -> None:
        """Drop the lock."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def held_rank_locks(state_dir: Path) -> dict[int, dict]:
    """Rank -> fields (world_size, share) of every rank lock another open file holds now.

    Probes by trying each lock, so call it under InitLock: no rank can be claiming one at the same instant.
    """
    held: dict[int, int] = {}
    if fcntl is None:
        return held
    for path in sorted(state_dir.glob("rank*.lock")):
        if not path.stem[4:].isdigit():
            continue
        fd = os.open(path, os.O_RDWR)
        try:
            if _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB) != "busy":
                continue  # nobody holds it (the probe's own lock goes with the fd)
            text = os.pread(fd, 200, 0).decode(errors="replace")
            held[int(path.stem[4:])] = dict(f.split("=", 1) for f in text.split() if "=" in f)
        finally:
            os.close(fd)
    return held


class _BlockingLock:
    """Blocking exclusive flock on one file under OUT/.cxrgen/."""

    file_name = ""

    def __init__(self, state_dir: Path):
        self.path = state_dir / self.file_name
        self._fd: int | None = None

    def __enter__(self):
        self._fd = _open(self.path)
        if fcntl is not None:
            _flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class MergeLock(_BlockingLock):
    """For the one-time merge of all ranks' records into metadata.parquet."""

    file_name = "merge.lock"


class InitLock(_BlockingLock):
    """For reading or writing run.json and claiming a rank: one process at a time, for a moment."""

    file_name = INIT_LOCK_FILE
