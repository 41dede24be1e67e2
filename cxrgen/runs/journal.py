"""The run journal: append-only records of finished images, read back by id, merged into metadata.parquet."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cxrgen.files import STATE_DIR, atomic_write, io_error

# `cxrgen evaluate`'s folder. Not "evaluation": datasets' imagefolder reads eval/evaluation/test/val/train in
# any path as a split name, and would then load the plots instead of the images.
EVAL_DIR = "quality"
RECORDS_DIR = f"{STATE_DIR}/records"

# Fixed column types, so an empty run and a resumed run write the same schema.
METADATA_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("file_name", pa.string()), ("prompt", pa.string()),
    ("negative_prompt", pa.string()), ("manifest_row", pa.int64()), ("row_id", pa.string()),
    ("sample_index", pa.int64()), ("seed", pa.int64()), ("guidance_scale", pa.float64()),
    ("steps", pa.int64()), ("scheduler", pa.string()), ("height", pa.int64()), ("width", pa.int64()),
    ("model_name", pa.string()), ("model_version", pa.string()), ("autoencoder_md5", pa.string()),
    ("diffusion_model_md5", pa.string()), ("text_encoder", pa.string()), ("dtype", pa.string()),
    ("device_type", pa.string()), ("cxrgen_version", pa.string()), ("token_count", pa.int64()),
    ("truncated", pa.bool_()), ("created_at", pa.string()), ("worker", pa.string()),
    ("text_encoder_fingerprint", pa.string()),
    # `cxrgen generate --verify`: which attempt the file is (0 in a plain run), whether the verifier confirmed every
    # positive label (null: not verified), and the lowest calibrated score among them
    ("attempt", pa.int64()), ("verified", pa.bool_()), ("verify_score", pa.float64()),
])


class Journal:
    """Append-only JSON-lines file of finished images, one per writer process; fsynced per batch.

    folder: another journal of the run in the same format (the attempts journal of --verify).
    """

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
            self._write(b"\n")

    def append(self, records: list[dict]) -> None:
        """Record images whose files are already in place, durably."""
        if records:
            self._write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))

    def _write(self, data: bytes) -> None:
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
        """Close the file; records already appended stay."""
        self._handle.close()


def _truncate_quietly(fd: int, size: int) -> None:
    try:
        os.ftruncate(fd, size)
    except OSError:
        pass  # then read_records skips the torn line and __init__ ends it on the next open


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1)


def read_records(out: Path, fields: tuple[str, ...] | None = None) -> dict[str, dict]:
    """Every recorded image by image_id, its latest record (see `latest_positions`); a torn last line is skipped.

    fields: keep only these keys (image_id is always read). Then the journal is parsed by Arrow's
    multi-threaded JSON reader: a million records in seconds instead of a minute.
    """
    keep = tuple(dict.fromkeys(("image_id", *fields))) if fields else None
    # created_at orders records of different writers (part files); read it even when not asked for
    read = tuple(dict.fromkeys((*keep, "created_at"))) if keep else None
    fast = read is not None and all(name in _FIELD_TYPES for name in read)
    schema = pa.schema([(name, _FIELD_TYPES[name]) for name in read]) if fast else None
    found: list[dict] = []
    parts: list[int] = []
    for number, part in enumerate(_journal_parts(out)):
        table = _arrow_part(part, schema) if fast else None
        if table is not None:
            columns = [table.column(name).to_pylist() for name in read]
            rows = (dict(zip(read, values)) for values in zip(*columns))
        else:
            rows = (r if read is None else {k: r.get(k) for k in read} for r in _read_part(part))
        for record in rows:
            found.append(record)
            parts.append(number)
    latest = latest_positions([r.get("image_id") for r in found], [r.get("created_at") for r in found], parts)
    drop = keep is not None and "created_at" not in keep
    return {image_id: {k: v for k, v in found[at].items() if k != "created_at"} if drop else found[at]
            for image_id, at in latest.items()}


def latest_positions(image_ids: list, stamps: list, parts: list[int]) -> dict:
    """image_id -> position of its latest record among records listed part file by part file, in line order.

    The latest record of an image describes its file: a resume that remakes a lost or damaged image appends a
    new record (new size and CRC-32, possibly other bytes through float rounding), so verify, resume and the
    merge all read the last one. Within one writer's journal that is the later line; between journals of
    different writers (workers, ranks, shards, a later resume) the later `created_at` (ISO 8601 UTC, so the
    text sorts in time order), a tie going to the later part file.
    """
    best: dict = {}
    for position, (image_id, stamp, part) in enumerate(zip(image_ids, stamps, parts)):
        stamp = stamp or ""
        held = best.get(image_id)
        if held is None or held[2] == part or stamp >= held[1]:
            best[image_id] = (position, stamp, part)
    return {image_id: held[0] for image_id, held in best.items()}


def _journal_parts(out: Path) -> list[Path]:
    folder = out / RECORDS_DIR
    return sorted(folder.glob("part-*.jsonl")) if folder.is_dir() else []


def _read_part(part: Path):
    with open(part, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.endswith("\n"):
                continue  # torn write: the image is regenerated on resume
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


_FIELD_TYPES = {"image_id": pa.string(), "file_name": pa.string(), "file_bytes": pa.int64(),
                "file_crc32": pa.int64(), "created_at": pa.string(), "attempt": pa.int64(), "verified": pa.bool_(),
                "verify_score": pa.float64()}


def _arrow_part(part: Path, schema: pa.Schema) -> pa.Table | None:
    """The schema's columns of every complete line, or None when a line is damaged (read line by line then)."""
    import pyarrow.json as pj

    data = part.read_bytes()
    data = data[:data.rfind(b"\n") + 1]  # a torn last line has no newline yet
    if not data:
        return schema.empty_table()
    try:
        return pj.read_json(io.BytesIO(data), read_options=pj.ReadOptions(block_size=1 << 24),
                            parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"))
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None


def read_record_table(out: Path, image_ids: list[str]) -> pa.Table:
    """The metadata columns of the latest record of each of `image_ids`, in that order (`latest_positions`).

    Arrow reads the journals (a million records in seconds and a fraction of the memory of Python
    dicts); a journal with a damaged line is read line by line instead. Every id must be recorded.
    """
    tables, parts = [], []
    for number, part in enumerate(_journal_parts(out)):
        table = _arrow_part(part, METADATA_SCHEMA)
        tables.append(table if table is not None else
                      pa.Table.from_pylist(list(_read_part(part)), schema=METADATA_SCHEMA))
        parts += [number] * tables[-1].num_rows
    table = pa.concat_tables([t.select(METADATA_SCHEMA.names).cast(METADATA_SCHEMA) for t in tables]) \
        if tables else METADATA_SCHEMA.empty_table()
    latest = latest_positions(table.column("image_id").to_pylist(), table.column("created_at").to_pylist(), parts)
    return table.take(pa.array([latest[i] for i in image_ids], type=pa.int64()))


def metadata_table(records: list[dict] | pa.Table, labels: pa.Table, rows: list[int]) -> pa.Table:
    """metadata.parquet's table: one row per image in plan order, the manifest's label columns appended."""
    table = records if isinstance(records, pa.Table) else pa.Table.from_pylist(records, schema=METADATA_SCHEMA)
    picked = labels.take(pa.array([r - 1 for r in rows], type=pa.int64())) if labels.num_columns else None
    for index, column_name in enumerate(label_column_names(labels.column_names) if picked is not None else []):
        table = table.append_column(column_name, picked.column(index))
    return table


def write_metadata(out: Path, table: pa.Table) -> Path:
    """Write OUT/metadata.parquet atomically (a table from `metadata_table`)."""
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    path = out / "metadata.parquet"
    atomic_write(path, buffer.getvalue().to_pybytes())
    return path


def label_column_names(names: list[str]) -> list[str]:
    """Metadata names of the label columns: a name taken by cxrgen's columns gets "label_" until free."""
    own = set(METADATA_SCHEMA.names)
    # Never rename a label that does not clash, so a manifest's own `label_x` keeps its name and a clashing
    # `x` steps past it (to `label_label_x`) whatever the column order; duplicate readers refuse the file.
    reserved = own | set(names)
    used: set[str] = set()
    result = []
    for name in names:
        column_name = name
        if column_name in own or column_name in used:
            column_name = f"label_{name}"
            while column_name in reserved or column_name in used:
                column_name = f"label_{column_name}"
        used.add(column_name)
        result.append(column_name)
    return result
