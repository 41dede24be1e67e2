"""What an output folder holds: which images are done, the final metadata table, status reports."""
from __future__ import annotations

import io
import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from cxrgen.errors import InputError
from cxrgen.files import STATE_DIR, TMP_MARK, local_path
from cxrgen.manifests.reader import Manifest
from cxrgen.manifests.workitems import WorkItem
from cxrgen.runs.card import CARD, write_card, write_run_card
from cxrgen.runs.journal import (
    metadata_table,
    read_record_table,
    read_records,
    write_metadata,
)
from cxrgen.runs.lock import MergeLock
from cxrgen.runs.verify import (
    ATTEMPTS_DIR,
    REJECTED_DIR,
    candidate_files,
    write_rejected_table,
)
from cxrgen.runs.verify_stats import verification_stats


def read_run_json(out: Path) -> dict | None:
    """OUT/run.json, or None when absent; a damaged one is an input error."""
    path = Path(out) / "run.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{path} is damaged (not JSON); this folder cannot be resumed") from None
    if not isinstance(data, dict) or "config" not in data or "settings" not in data:
        raise InputError(f"{path} is not a cxrgen run.json; choose another folder")
    return data


def recorded_split(out: Path) -> dict | None:
    """The array-job split the run in OUT recorded at its first sharded task (run.json "shards"), if any."""
    saved = read_run_json(Path(out)) if Path(out).is_dir() else None
    return None if saved is None else saved.get("shards")


def image_ok(path: Path) -> bool:
    """True when the file exists and decodes completely."""
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def file_ok(path: Path, record: dict, verify: bool = False) -> bool:
    """Whether a recorded image is in place.

    Quick (the default): one stat, the size the journal recorded. Journals of cxrgen before 0.2 hold no
    size, so their images are decoded instead. verify: read the file, compare size and CRC-32 with the
    record, and decode it, which also finds a damaged file of the right size.
    """
    size = record.get("file_bytes")
    if not verify:
        if size is None:
            return image_ok(path)
        try:
            return os.stat(path).st_size == size
        except OSError:
            return False
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if size is not None and (len(data) != size or zlib.crc32(data) != record.get("file_crc32")):
        return False
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        return True
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def _check_files(out: Path, pairs: list[tuple[str, dict]], verify: bool) -> list[bool]:
    # Stats on a shared file system and decoding (which releases the GIL) both gain from threads; chunks
    # keep the pool's per-task overhead (larger than a local stat) out of a million-image check.
    root = str(out)
    chunks = [pairs[i:i + _CHUNK] for i in range(0, len(pairs), _CHUNK)]

    def check(chunk):
        return [file_ok(Path(os.path.join(root, name)), record, verify) for name, record in chunk]

    with ThreadPoolExecutor(max_workers=min(16, 2 * (os.cpu_count() or 1) + 1)) as pool:
        return [ok for result in pool.map(check, chunks) for ok in result]


_CHUNK = 512


CHECK_FIELDS = ("file_name", "file_bytes", "file_crc32")  # what checking a file needs from its record


def done_items(out: Path, plan: list[WorkItem], verify: bool = False, records: dict | None = None) -> set[str]:
    """image_ids of `plan` (a rank passes only its share) that are recorded AND whose file is in place."""
    records = read_records(out, CHECK_FIELDS) if records is None else records
    recorded = [item for item in plan if item.image_id in records]
    ok = _check_files(out, [(item.file_name, records[item.image_id]) for item in recorded], verify)
    return {item.image_id for item, good in zip(recorded, ok) if good}


def temp_files(out: Path) -> list[Path]:
    """Leftover temporary files of interrupted writes: images (and --verify's rejected attempts), and run.json or
    metadata.parquet in OUT."""
    pattern = f".*{TMP_MARK}*"
    found = [p for p in out.glob(pattern) if p.is_file()]
    for folder in (out / "images", out / REJECTED_DIR):
        found += list(folder.rglob(pattern)) if folder.is_dir() else []
    return sorted(found)


def _all_in_place(out: Path, plan: list[WorkItem], records: dict) -> bool:
    return all(item.image_id in records and (out / item.file_name).is_file() for item in plan)


def _remove_temp_files(out: Path) -> None:
    # Called only once every planned image is in place, so no writer can still own one of them.
    for path in temp_files(out):
        path.unlink(missing_ok=True)


def finalize(out: Path, plan: list[WorkItem], manifest: Manifest) -> Path | None:
    """Write OUT/README.md, then metadata.parquet, once every planned image is done; returns its path, or None.

    The card comes first: a run counts as complete only once metadata.parquet exists, so a failure while
    the card is written leaves a run that status calls unfinished and a resume merges again.
    """
    if not _all_in_place(out, plan, read_records(out, CHECK_FIELDS)):
        return None
    _remove_temp_files(out)
    table = read_record_table(out, [item.image_id for item in plan])
    # the plan's file names: the same as recorded, stated once by the plan
    table = table.set_column(table.schema.get_field_index("file_name"), "file_name",
                             pa.array([item.file_name for item in plan], pa.string()))
    # records of a plain run (and of cxrgen before --verify) name no attempt: each is its image's first and only
    position = table.schema.get_field_index("attempt")
    table = table.set_column(position, "attempt", pc.fill_null(table.column("attempt"), 0))
    if (out / ATTEMPTS_DIR).is_dir():
        write_rejected_table(out)  # --keep-rejected's table: none unless a rejected attempt was kept on disk
    table = metadata_table(table, manifest.labels, [item.row for item in plan])
    run = read_run_json(out)
    # the dataset card describes the metadata.parquet beside it
    write_card(out, table, run, verification=verification_stats(out, run))
    return write_metadata(out, table)


def finalize_once(out: Path, plan: list[WorkItem], manifest: Manifest, refresh: bool = False) -> Path | None:
    """finalize() under the merge lock; ranks finishing together write metadata.parquet exactly once.

    refresh: this process remade images of a run that was merged before it started (lost or damaged files),
    so the merged table describes their older records: merge again.
    """
    with MergeLock(out / STATE_DIR):
        if metadata_rows(out) == len(plan) and not refresh:
            # Already merged; a resume that only redid lost files must still leave no temporary file
            # (checked only when there is one: reading every record again is the costly part at scale).
            if temp_files(out) and _all_in_place(out, plan, read_records(out, CHECK_FIELDS)):
                _remove_temp_files(out)
            if not (out / CARD).is_file():  # merged by an older cxrgen, or the card was removed
                write_run_card(out)
            return out / "metadata.parquet"
        path = finalize(out, plan, manifest)
        if path is not None:
            # An audit trail: one line per merge, so "merged exactly once" can be checked.
            with open(out / STATE_DIR / "merges.log", "a", encoding="utf-8") as handle:
                handle.write(f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} pid {os.getpid()} "
                             f"merged {len(plan)} records{' again (images remade)' if refresh else ''}\n")
        return path


@dataclass
class RunStatus:
    """cxrgen status: counts and problems of one output folder."""

    out: Path
    planned: int
    done: int
    missing_files: list[str] = field(default_factory=list)  # recorded, but file missing or undecodable
    orphaned_files: list[str] = field(default_factory=list)  # image file with no record
    temp_files: list[str] = field(default_factory=list)
    finalized: bool = False  # metadata.parquet covers every planned image and the dataset card is beside it
    metadata_rows: int = -1  # rows of metadata.parquet; -1 when it is absent or unreadable
    card: bool = False  # OUT/README.md exists
    verification: dict | None = None  # --verify's figures (cxrgen.runs.verify_stats), None for a plain run
    checked: int = 0  # recorded files looked at (one stat each, or re-read and decoded with verify)
    verified: bool = False  # checked with verify
    demo: bool = False  # made with the demo model: its images are noise

    @property
    def remaining(self) -> int:
        return self.planned - self.done

    @property
    def complete(self) -> bool:
        return self.remaining == 0 and self.finalized


def inspect_run(out: str | Path, verify: bool = False) -> RunStatus:
    """Count planned, done and remaining images and find files without records and records without files.

    verify: re-read, checksum and decode every recorded file instead of one stat each.
    """
    out = local_path(out, "OUT")
    saved = read_run_json(out)
    if saved is None:
        raise InputError(f"{out} is not a cxrgen run (no run.json)")
    records = read_records(out, CHECK_FIELDS)
    by_file = {r.get("file_name"): r for r in records.values() if r.get("file_name")}
    recorded_files = set(by_file)
    # --verify: an image's path holds its best attempt so far before the image is recorded
    candidates = candidate_files(out) if "verify" in saved["settings"] else set()
    pairs = sorted(by_file.items())
    ok = {name for (name, _), good in zip(pairs, _check_files(out, pairs, verify)) if good}
    images = out / "images"
    # os.walk reads each folder once (no stat per file): a million files stay a matter of seconds
    on_disk = {os.path.relpath(os.path.join(folder, name), out) for folder, _, names in os.walk(images)
               for name in names if TMP_MARK not in name}
    status = RunStatus(
        out=out, planned=int(saved["settings"]["planned_images"]), done=len(ok),
        missing_files=sorted(n for n in recorded_files if n and n not in ok),
        orphaned_files=sorted(on_disk - recorded_files - candidates),
        temp_files=[str(p.relative_to(out)) for p in temp_files(out)],
        checked=len(pairs), verified=verify, demo=saved.get("resolved", {}).get("demo") is True,
    )
    status.metadata_rows, status.card = metadata_rows(out), (out / CARD).is_file()
    status.finalized = status.metadata_rows == status.planned and status.remaining == 0 and status.card
    status.verification = verification_stats(out, saved)
    return status


def metadata_rows(out: Path) -> int:
    """Rows of OUT/metadata.parquet; -1 when it is absent or unreadable."""
    path = out / "metadata.parquet"
    if not path.is_file():
        return -1
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # noqa: BLE001 - a damaged table counts as not finalised
        return -1
