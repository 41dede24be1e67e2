"""Crash-safe local files: atomic writes (temp file, fsync, rename), digests, the inside-OUT path check, and the
refusal of paths given as URLs (every path cxrgen takes is a local one).

Also the two layout names every writer needs (the state folder and the temp-file mark), so that a write
error can point at the run folder it happened in.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import zlib
from pathlib import Path, PurePosixPath

from cxrgen.errors import InputError, RunError

STATE_DIR = ".cxrgen"  # journal, lock and claims live here, beside images/
TMP_MARK = ".tmp-"
_HOST = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:32] or "host"


_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def refuse_url(value, what: str) -> None:
    """Refuse a path given as a URL (s3://, gs://, az://, hf://, https://, file://, ...), naming `what` (the option).

    pathlib folds `s3://bucket/run` into `s3:/bucket/run`, a local folder: a run or an export would land on the
    local disk while the user believes it is in the bucket. Every input and output path goes through here, so
    this is the one place that says so (a run's own location goes through cxrgen.storage.open instead).
    """
    match = _URL.match(str(value)) if value is not None else None
    if match:
        raise InputError(f"{what} {value}: {match.group(1)}:// paths are not supported here ({what} takes a local "
                         "path; only a run's OUT and `export --to` may be s3:// URLs); give a local path, e.g. a "
                         "bucket mounted with s3fs, gcsfuse or rclone mount, or copy the files there first")


def local_path(value, what: str) -> Path:
    """`value` as a local Path (~ expanded), after `refuse_url`."""
    refuse_url(value, what)
    return Path(value).expanduser()


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest (e.g. "md5", "sha256") of a file, read in 1 MiB chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_check(data: bytes) -> dict:
    """The journal's integrity fields of an image file: its byte size and CRC-32."""
    return {"file_bytes": len(data), "file_crc32": zlib.crc32(data)}


def atomic_write(path: Path, data: bytes, sync_folder: bool = True) -> None:
    """Write to a temporary name in the same folder, fsync, rename into place, fsync the folder.

    sync_folder=False leaves the folder's fsync (which makes the rename durable) to the caller, who can then
    make many renames in one folder durable with one fsync_dir, before recording any of them.
    """
    # Unique across hosts and containers sharing the folder (pids repeat there), not just across processes.
    tmp = path.with_name(f".{path.name}{TMP_MARK}{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        if sync_folder:
            fsync_dir(path.parent)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise io_error(path, exc) from None


@contextlib.contextmanager
def built_aside(folder: Path):
    """Yield a hidden sibling folder to build `folder` in; when the block succeeds it takes `folder`'s place.

    Readers then find the old folder, or the new one complete, never a mix of both (at most, for the instant
    between the two renames, none). A failure removes the new folder and leaves the old one as it was.
    """
    token = f"{TMP_MARK}{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"
    staging, old = folder.with_name(f".{folder.name}{token}"), folder.with_name(f".{folder.name}.old{token}")
    try:
        staging.mkdir(parents=True)
    except OSError as exc:
        raise io_error(folder, exc) from None
    try:
        yield staging
        fsync_dir(staging)
        if folder.exists():
            os.rename(folder, old)
        os.rename(staging, folder)
        fsync_dir(folder.parent)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if old.exists() and not folder.exists():
            os.rename(old, folder)  # put the old one back
        raise io_error(folder, exc) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def io_error(path: Path, exc: OSError) -> RunError:
    """One-line RunError naming the path; full disk gets its own advice."""
    if exc.errno == errno.ENOSPC:
        return RunError(f"no space left on the device while writing {path}; free some space, then run "
                        f"`{resume_command(_run_root(path))}`")
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return RunError(f"cannot write {path}: {reason}; fix the problem, then run "
                    f"`{resume_command(_run_root(path))}`")


def inside(out: Path, file_name: str) -> Path:
    """out / file_name, refusing a file_name that is absolute or climbs out of OUT (a table may come from anywhere)."""
    path = PurePosixPath(file_name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise InputError(f"metadata.parquet names the file {file_name!r}, outside {out}; "
                         "file_name must be a path relative to OUT")
    return out / file_name


def resume_command(out: Path | str) -> str:
    """The shell command that finishes the run in OUT (quoted, so a path with spaces still works)."""
    return f"cxrgen resume {shlex.quote(str(out))}"


def _run_root(path: Path) -> Path:
    for parent in path.parents:
        if (parent / STATE_DIR).is_dir():
            return parent
    return path.parent


def fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort on systems that cannot open folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def write_json(path: Path, data: dict) -> None:
    """Atomically write pretty JSON."""
    atomic_write(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode("utf-8"))
