"""A run in a local (or shared POSIX) folder: atomic renames, append-and-fsync journal parts and flocks.

This is the code path every local run has always taken, unchanged: images and tables by files.atomic_write
(temp file, fsync, rename, folder fsync), one append-only JSON-lines part per writer under .cxrgen/records/,
and the OS locks of storage.locks.
"""
from __future__ import annotations

import os
import secrets
import shutil
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from cxrgen.files import STATE_DIR, TMP_MARK, atomic_write, fsync_dir, io_error, write_json
from cxrgen.storage.base import RECORDS_DIR, Claim, RecordPart, RecordWriter, Store
from cxrgen.storage.locks import FolderLock, InitLock, MergeLock, RankLock, held_rank_locks

_CHUNK = 512  # stats per thread-pool task: a pool's per-task overhead is larger than a local stat


class LocalRecordFile(RecordWriter):
    """Append-only JSON-lines file of one writer process; fsynced per batch."""

    def __init__(self, out: Path, writer: str, folder: str = RECORDS_DIR):
        self.path = out / folder / f"part-{writer}.jsonl"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Unbuffered: a failed write must not leave bytes in a buffer that a later flush or close writes.
            self._handle = open(self.path, "ab", buffering=0)
            torn = self._size() > 0 and _last_byte(self.path) != b"\n"
        except OSError as exc:  # full disk (no inode left), I/O error, read-only folder: one line, not a traceback
            raise io_error(self.path, exc) from None
        if torn:
            # A kill tore the last line: end it so the next record starts on a line of its own.
            self.write(b"\n")

    def write(self, data: bytes) -> None:
        """Write and fsync all of data, or raise RunError leaving the file as it was (best effort)."""
        start = None
        try:
            start = self._size()
            view = memoryview(data)
            while view:
                view = view[self._handle.write(view):]
            os.fsync(self._handle.fileno())
        except OSError as exc:
            if start is not None:
                # Cut the half-written line: no partial record may survive a full disk (resume redoes them).
                _truncate_quietly(self._handle.fileno(), start)
            raise io_error(self.path, exc) from None

    def _size(self) -> int:
        return os.fstat(self._handle.fileno()).st_size

    def close(self) -> None:
        self._handle.close()


def _truncate_quietly(fd: int, size: int) -> None:
    try:
        os.ftruncate(fd, size)
    except OSError:
        pass  # then the reader skips the torn line and the next open ends it


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1)


class _LocalPart(RecordPart):
    def __init__(self, path: Path):
        self.path, self.name = path, path.name
        self.writer = path.name

    def read(self) -> bytes:
        return self.path.read_bytes()

    def chunks(self, size: int = 64 << 20):
        with open(self.path, "rb") as handle:
            rest = b""
            while True:
                block = handle.read(size)
                if not block:
                    return  # what is left has no newline: a torn last line
                block = rest + block
                cut = block.rfind(b"\n") + 1
                rest = block[cut:]
                if cut:
                    yield block[:cut]


class _LockClaim(Claim):
    """A claim that is an OS lock (or a rank lock and the folder lock it shares)."""

    def __init__(self, lock, unsupported: bool = False):
        self.lock, self.unsupported = lock, unsupported

    def release(self) -> None:
        self.lock.release()

    def mark_share_done(self) -> None:
        if hasattr(self.lock, "mark_share_done"):
            self.lock.mark_share_done()

    def clear_holder(self) -> None:
        if hasattr(self.lock, "clear_holder"):
            self.lock.clear_holder()


class LocalStore(Store):
    """A local folder (absolute path) holding a run."""

    def __init__(self, root: Path | str):
        self.local = Path(root)
        self.url = str(self.local)
        self.state = self.local / STATE_DIR

    def where(self, name: str) -> str:
        return str(self.local / name) if name else self.url

    def exists(self) -> bool:
        return self.local.exists()

    def entries(self) -> list[str]:
        return [p.name for p in self.local.iterdir()] if self.local.is_dir() else []

    def read_bytes(self, name: str) -> bytes | None:
        try:
            return (self.local / name).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def write_bytes(self, name: str, data: bytes) -> None:
        atomic_write(self.local / name, data)

    def write_batch_file(self, name: str, data: bytes) -> None:
        atomic_write(self.local / name, data, sync_folder=False)

    def settle(self, names: list[str]) -> None:
        for folder in sorted({(self.local / name).parent for name in names}):
            fsync_dir(folder)

    def create_json(self, name: str, data: dict) -> bool:
        path = self.local / name
        if path.is_file():
            return False
        write_json(path, data)
        return True

    def commit(self, name: str, source: Path) -> bool:
        # The merge lock is held: replacing is safe. A file beside the target is renamed into place (no copy, no
        # memory); one elsewhere is copied to a temporary name first. Either way: fsync, rename, folder fsync.
        target, source = self.local / name, Path(source)
        moved = source
        try:
            if source.parent.resolve() != target.parent.resolve():
                moved = target.with_name(f".{target.name}{TMP_MARK}{secrets.token_hex(4)}")
                shutil.copyfile(source, moved)
            with open(moved, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(moved, target)
            fsync_dir(target.parent)
        except OSError as exc:
            if moved != source:
                moved.unlink(missing_ok=True)
            raise io_error(target, exc) from None
        return True

    def sizes(self, names: list[str]) -> list[int | None]:
        root = str(self.local)

        def stat(chunk):
            found = []
            for name in chunk:
                try:
                    found.append(os.stat(os.path.join(root, name)).st_size)
                except OSError:
                    found.append(None)
            return found

        chunks = [names[i:i + _CHUNK] for i in range(0, len(names), _CHUNK)]
        with ThreadPoolExecutor(max_workers=min(16, 2 * (os.cpu_count() or 1) + 1)) as pool:
            return [size for result in pool.map(stat, chunks) for size in result]

    def list_names(self, prefix: str) -> set[str]:
        # os.walk reads each folder once (no stat per file): a million files stay a matter of seconds
        top = self.local / prefix
        return {os.path.relpath(os.path.join(folder, name), self.local) for folder, _, names in os.walk(top)
                for name in names if TMP_MARK not in name}

    def delete(self, name: str) -> None:
        (self.local / name).unlink(missing_ok=True)

    def open_input(self, name: str):
        return open(self.local / name, "rb")

    def temp_files(self) -> list[str]:
        pattern = f".*{TMP_MARK}*"
        found = [p for p in self.local.glob(pattern) if p.is_file()]
        for folder in (self.local / "images", self.local / "rejected"):  # rejected/: --verify --keep-rejected
            found += list(folder.rglob(pattern)) if folder.is_dir() else []
        found += [p for p in self.state.glob(".merge-*") if p.is_dir()]  # spill folders of a killed merge
        return sorted(str(p.relative_to(self.local)) for p in found)

    def remove_temp_files(self) -> None:
        for name in self.temp_files():
            path = self.local / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ the run's protocol: today's locks

    def record_writer(self, writer: str, share: tuple[int, int] = (0, 1), folder: str = RECORDS_DIR) -> RecordWriter:
        return LocalRecordFile(self.local, writer, folder)

    def record_parts(self, share: tuple[int, int] | None = None, folder: str = RECORDS_DIR) -> list[RecordPart]:
        folder = self.local / folder
        return [_LocalPart(p) for p in sorted(folder.glob("part-*.jsonl"))] if folder.is_dir() else []

    def check_free(self, shared: bool) -> None:
        FolderLock(self.state, shared=shared).check_free()

    def claim_share(self, rank: int, world_size: int, scope: str) -> Claim:
        with InitLock(self.state):
            return _LockClaim(RankLock(self.state, rank, world_size, scope).acquire())

    def claim_folder(self, shared: bool) -> Claim:
        lock = FolderLock(self.state, shared=shared).acquire()
        return _LockClaim(lock, lock.unsupported)

    def init_lock(self):
        return InitLock(self.state)

    def merge_lock(self):
        return MergeLock(self.state)

    def running_ranks(self, scope: str, exclude: int) -> set[int]:
        with InitLock(self.state):
            return {r for r, fields in held_rank_locks(self.state).items()
                    if r != exclude and fields.get("share") != "done" and fields.get("scope") == scope}

    def log_merge(self, line: str) -> None:
        with open(self.state / "merges.log", "a", encoding="utf-8") as handle:
            handle.write(f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} {line}\n")
