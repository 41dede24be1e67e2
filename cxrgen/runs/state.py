"""What an output folder holds: which images are done, the final metadata table, status reports."""
from __future__ import annotations

import io
import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from PIL import Image

from cxrgen.errors import InputError
from cxrgen.manifests.reader import Manifest
from cxrgen.manifests.workitems import WorkItem
from cxrgen.runs.card import CARD, card_text, write_run_card
from cxrgen.runs.journal import read_records
from cxrgen.runs.merge import merge_metadata
from cxrgen.runs.verify import ATTEMPTS_DIR, candidate_files, write_rejected_table
from cxrgen.runs.verify_stats import verification_stats
from cxrgen.storage.base import METADATA, RUN_JSON, Store
from cxrgen.storage.open import open_store


def read_run_json(out: Store | Path | str) -> dict | None:
    """OUT/run.json, or None when absent; a damaged one is an input error."""
    store = open_store(out)
    path = store.where(RUN_JSON)
    raw = store.read_bytes(RUN_JSON)
    if raw is None:
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{path} is damaged (not JSON); this folder cannot be resumed") from None
    if not isinstance(data, dict) or "config" not in data or "settings" not in data:
        raise InputError(f"{path} is not a cxrgen run.json; choose another folder")
    return data


def recorded_split(out: Store | Path | str) -> dict | None:
    """The array-job split the run in OUT recorded at its first sharded task (run.json "shards"), if any."""
    store = open_store(out)
    saved = read_run_json(store) if store.exists() else None
    return None if saved is None else saved.get("shards")


def image_ok(path) -> bool:
    """True when the file (a path or a binary file object) exists and decodes completely."""
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def file_ok(path: Path, record: dict, verify: bool = False) -> bool:
    """Whether a recorded image is in place in a local folder.

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
    return bytes_ok(data, record)


def bytes_ok(data: bytes | None, record: dict) -> bool:
    """Whether a file's bytes match its record (size and CRC-32, when recorded) and decode completely."""
    if data is None:
        return False
    size = record.get("file_bytes")
    if size is not None and (len(data) != size or zlib.crc32(data) != record.get("file_crc32")):
        return False
    return image_ok(io.BytesIO(data))


def _check_files(store: Store, pairs: list[tuple[str, dict]], verify: bool) -> list[bool]:
    if store.local is not None:
        # Stats on a shared file system and decoding (which releases the GIL) both gain from threads; chunks
        # keep the pool's per-task overhead (larger than a local stat) out of a million-image check.
        root = str(store.local)
        chunks = [pairs[i:i + _CHUNK] for i in range(0, len(pairs), _CHUNK)]

        def check(chunk):
            return [file_ok(Path(os.path.join(root, name)), record, verify) for name, record in chunk]

        with ThreadPoolExecutor(max_workers=min(16, 2 * (os.cpu_count() or 1) + 1)) as pool:
            return [ok for result in pool.map(check, chunks) for ok in result]
    names = [name for name, _ in pairs]
    if verify:
        return [bytes_ok(data, record) for data, (_, record) in zip(store.read_many(names), pairs)]
    # An object is whole once it exists (one PUT): its listed size against the record is the quick check.
    return [size is not None and size == record.get("file_bytes", size) for size, (_, record)
            in zip(store.sizes(names), pairs)]


_CHUNK = 512


CHECK_FIELDS = ("file_name", "file_bytes", "file_crc32")  # what checking a file needs from its record


def done_items(out: Store | Path, plan: list[WorkItem], verify: bool = False, records: dict | None = None,
               share: tuple[int, int] | None = None) -> set[str]:
    """image_ids of `plan` (a rank passes only its share) that are recorded AND whose file is in place."""
    store = open_store(out)
    records = read_records(store, CHECK_FIELDS, share) if records is None else records
    recorded = [item for item in plan if item.image_id in records]
    ok = _check_files(store, [(item.file_name, records[item.image_id]) for item in recorded], verify)
    return {item.image_id for item, good in zip(recorded, ok) if good}


def _all_in_place(store: Store, plan: list[WorkItem], records: dict) -> bool:
    if not all(item.image_id in records for item in plan):
        return False
    return all(size is not None for size in store.sizes([item.file_name for item in plan]))


def finalize(out: Store | Path, plan: list[WorkItem] | Callable[[], Iterable[WorkItem]], manifest: Manifest,
             planned: int | None = None) -> tuple[Path | str, bool] | None:
    """Write metadata.parquet once every planned image is done: (its location, whether this call committed it).

    plan: the work items in plan order, or a function giving them afresh (then `planned` counts them). None
    while images are missing. Committed False: another process's merge won (object stores).
    """
    store = open_store(out)
    items = plan if callable(plan) else lambda: iter(plan)
    planned = len(plan) if planned is None else planned
    if _recorded_lines(store) < planned:  # cheap: a waiting rank asks often, and most times the answer is no
        return None
    merged = merge_metadata(store, items, planned, manifest.labels)
    if merged is None:
        return None
    location, committed, facts = merged
    if committed:
        store.remove_temp_files()  # every planned image is in place, so no writer can still own one of them
        run = read_run_json(store)
        if store.local is not None and (store.local / ATTEMPTS_DIR).is_dir():
            write_rejected_table(store.local)  # --keep-rejected's table: none unless a rejected attempt was kept
        # The dataset card describes the metadata.parquet beside it. It comes second: a run counts as finished
        # only once both exist (status), and finalize_once writes a missing card again.
        verification = verification_stats(store.local, run) if store.local is not None else None
        store.write_bytes(CARD, card_text(facts, run, verification=verification).encode("utf-8"))
    return location, committed


def _recorded_lines(store: Store) -> int:
    """How many records are committed (duplicates included): fewer than planned means images are missing."""
    return sum(data.count(b"\n") for part in store.record_parts() for data in part.chunks())


def metadata_location(out: Store | Path) -> Path | str:
    """Where metadata.parquet of a run is: a Path in a local folder, a URL in an object store."""
    store = open_store(out)
    return store.local / METADATA if store.local is not None else store.where(METADATA)


def finalize_once(out: Store | Path, plan: list[WorkItem] | Callable[[], Iterable[WorkItem]], manifest: Manifest,
                  planned: int | None = None, refresh: bool = False) -> Path | str | None:
    """finalize() under the merge lock (a local folder) or by one commit (an object store): exactly one merge.

    refresh: this process remade images of a run that was merged before it started (lost or damaged files),
    so the merged table describes their older records: merge again (in an object store the old table is
    deleted first, and the new one is again committed once).
    """
    store = open_store(out)
    planned = len(plan) if planned is None else planned
    with store.merge_lock():
        if refresh and metadata_rows(store) == planned:
            store.delete(METADATA)
        if metadata_rows(store) == planned:
            # Already merged; a resume that only redid lost files must still leave no temporary file
            # (checked only when there is one: reading every record again is the costly part at scale).
            if store.temp_files() and not callable(plan) and _all_in_place(store, plan,
                                                                             read_records(store, CHECK_FIELDS)):
                store.remove_temp_files()
            if store.sizes([CARD])[0] is None:  # killed between the two writes, or merged by an older cxrgen
                write_run_card(store)
            return metadata_location(store)
        done = finalize(store, plan, manifest, planned)
        if done is None:
            return None
        if done[1]:
            # An audit trail: one line per merge, so "merged exactly once" can be checked.
            store.log_merge(f"pid {os.getpid()} merged {planned} records{' again (images remade)' if refresh else ''}")
        return done[0]


@dataclass
class RunStatus:
    """cxrgen status: counts and problems of one output folder."""

    out: Path | str
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


def inspect_run(out: Store | str | Path, verify: bool = False) -> RunStatus:
    """Count planned, done and remaining images and find files without records and records without files.

    verify: re-read, checksum and decode every recorded file instead of one stat each.
    """
    store = open_store(out)
    saved = read_run_json(store)
    if saved is None:
        raise InputError(f"{store} is not a cxrgen run (no run.json)")
    records = read_records(store, CHECK_FIELDS)
    by_file = {r.get("file_name"): r for r in records.values() if r.get("file_name")}
    recorded_files = set(by_file)
    # --verify (local folders only): an image's path holds its best attempt so far before the image is recorded
    candidates = candidate_files(store.local) if store.local is not None and "verify" in saved["settings"] else set()
    pairs = sorted(by_file.items())
    ok = {name for (name, _), good in zip(pairs, _check_files(store, pairs, verify)) if good}
    on_disk = store.list_names("images")
    status = RunStatus(
        out=store.local if store.local is not None else store.url,
        planned=int(saved["settings"]["planned_images"]), done=len(ok),
        missing_files=sorted(n for n in recorded_files if n and n not in ok),
        orphaned_files=sorted(on_disk - recorded_files - candidates),
        temp_files=store.temp_files(),
        checked=len(pairs), verified=verify, demo=saved.get("resolved", {}).get("demo") is True,
    )
    status.metadata_rows, status.card = metadata_rows(store), store.sizes([CARD])[0] is not None
    status.finalized = status.metadata_rows == status.planned and status.remaining == 0 and status.card
    status.verification = verification_stats(store.local, saved) if store.local is not None else None
    return status


def metadata_rows(out: Store | Path | str) -> int:
    """Rows of OUT/metadata.parquet; -1 when it is absent or unreadable."""
    store = open_store(out)
    if store.sizes([METADATA])[0] is None:
        return -1
    import pyarrow.parquet as pq

    try:
        with store.open_input(METADATA) as handle:
            return pq.ParquetFile(handle).metadata.num_rows
    except Exception:  # noqa: BLE001 - a damaged table counts as not finalised
        return -1
