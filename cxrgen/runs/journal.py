"""The run journal: append-only records of finished images, read back by id, merged into metadata.parquet."""
from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cxrgen.storage.base import METADATA, RECORDS_DIR, WHOLE, RecordPart, Store  # noqa: F401 - RECORDS_DIR: readers name it here
from cxrgen.storage.open import open_store

# `cxrgen evaluate`'s folder. Not "evaluation": datasets' imagefolder reads eval/evaluation/test/val/train in
# any path as a split name, and would then load the plots instead of the images.
EVAL_DIR = "quality"

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
    """One writer's records of finished images: a part file appended and fsynced per batch in a local folder,
    one immutable object per batch in an object store (storage.base.RecordWriter).

    folder: another journal of the run in the same format (the attempts journal of --verify).
    """

    def __init__(self, out: Store | Path | str, writer: str, share: tuple[int, int] = WHOLE,
                 folder: str = RECORDS_DIR):
        self._writer = open_store(out).record_writer(writer, share, folder)
        self.path = self._writer.path  # the local part file (None in an object store)

    def append(self, records: list[dict]) -> None:
        """Record images whose files are already in place, durably."""
        if records:
            self._writer.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))

    def close(self) -> None:
        """Close the writer; records already appended stay."""
        self._writer.close()


def read_records(out: Store | Path, fields: tuple[str, ...] | None = None,
                 share: tuple[int, int] | None = None) -> dict[str, dict]:
    """Every recorded image by image_id, its latest record (`WriterClocks`); a torn last line is skipped.

    fields: keep only these keys (image_id is always read). Then the journal is parsed by Arrow's
    multi-threaded JSON reader: a million records in seconds instead of a minute. share: only records that
    may belong to it are needed (an object store then lists only the writers whose shares overlap it).
    """
    keep = tuple(dict.fromkeys(("image_id", *fields))) if fields else None
    # created_at orders records of different writers; read it even when not asked for
    read = tuple(dict.fromkeys((*keep, "created_at"))) if keep else None
    fast = read is not None and all(name in _FIELD_TYPES for name in read)
    schema = pa.schema([(name, _FIELD_TYPES[name]) for name in read]) if fast else None
    records: dict[str, dict] = {}
    ranks: dict[str, str] = {}
    clocks = WriterClocks()
    # a part in pieces (a local part file in blocks): the bytes held are a piece's, not a part's
    pieces = ((part.writer, _Bytes(data)) for part in open_store(out).record_parts(share) for data in part.chunks())
    for writer, piece in pieces:
        table = _arrow_part(piece, schema) if fast else None
        if table is not None:
            columns = [table.column(name).to_pylist() for name in read]
            rows = (dict(zip(read, values)) for values in zip(*columns))
        else:
            rows = (r if read is None else {k: r.get(k) for k in read} for r in _read_part(piece))
        rows = list(rows)
        for record, rank in zip(rows, clocks.stamps(writer, [r.get("created_at") for r in rows])):
            image_id = record.get("image_id")
            if image_id not in ranks or rank >= ranks[image_id]:
                records[image_id], ranks[image_id] = record, rank
    if keep is not None and "created_at" not in keep:
        for record in records.values():
            record.pop("created_at", None)
    return records


class WriterClocks:
    """Which record of an image is its latest, the one that describes its file.

    A resume that remakes a lost or damaged image (or a Ray actor that retried a batch) records it again (new
    size and CRC-32, possibly other bytes through float rounding), so verify, resume, status and the merge all
    read the last one. Within one writer's journal that is the later line, even if its clock stepped back;
    between writers (workers, ranks, shards, a later resume) the later `created_at` (ISO 8601 UTC, so the text
    sorts in time order). Both hold when each record is ranked by its writer's running maximum of
    `created_at` (`stamps`), a tie going to the record read later.
    """

    def __init__(self) -> None:
        self._latest: dict[str, str] = {}

    def stamps(self, writer: str, created_at: list) -> list[str]:
        """The ranks of a writer's next records, in the order it wrote them (a missing stamp counts as "")."""
        latest, ranks = self._latest.get(writer, ""), []
        for stamp in created_at:
            latest = max(stamp or "", latest)
            ranks.append(latest)
        self._latest[writer] = latest
        return ranks


def _read_part(part: RecordPart):
    for line in io.StringIO(part.read().decode("utf-8", errors="replace"), newline="\n"):
        if not line.endswith("\n"):
            continue  # torn write: the image is regenerated on resume
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue


_FIELD_TYPES = {"image_id": pa.string(), "file_name": pa.string(), "file_bytes": pa.int64(),
                "file_crc32": pa.int64(), "created_at": pa.string(), "attempt": pa.int64(), "verified": pa.bool_(),
                "verify_score": pa.float64()}


def _arrow_part(part: RecordPart, schema: pa.Schema) -> pa.Table | None:
    """The schema's columns of every complete line, or None when a line is damaged (read line by line then)."""
    import pyarrow.json as pj

    data = part.read()
    data = data[:data.rfind(b"\n") + 1]  # a torn last line has no newline yet
    if not data:
        return schema.empty_table()
    try:
        return pj.read_json(io.BytesIO(data), read_options=pj.ReadOptions(block_size=1 << 24),
                            parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"))
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None


def record_tables(out: Store | Path, schema: pa.Schema):
    """Every committed record as (writer, Arrow table of `schema`'s columns), a part's piece at a time (bounded
    memory), each writer's records in write order; a piece with a damaged line is read line by line."""
    for part in open_store(out).record_parts():
        for data in part.chunks():
            piece = _Bytes(data)
            table = _arrow_part(piece, schema)
            yield part.writer, (table if table is not None else
                                pa.Table.from_pylist(list(_read_part(piece)), schema=schema))


class _Bytes(RecordPart):
    def __init__(self, data: bytes):
        self.data = data

    def read(self) -> bytes:
        return self.data


def metadata_table(records: list[dict] | pa.Table, labels: pa.Table, rows: list[int]) -> pa.Table:
    """metadata.parquet's table: one row per image in plan order, the manifest's label columns appended."""
    table = records if isinstance(records, pa.Table) else pa.Table.from_pylist(records, schema=METADATA_SCHEMA)
    picked = labels.take(pa.array([r - 1 for r in rows], type=pa.int64())) if labels.num_columns else None
    for index, column_name in enumerate(label_column_names(labels.column_names) if picked is not None else []):
        table = table.append_column(column_name, picked.column(index))
    return table


def write_metadata(out: Store | Path, table: pa.Table) -> Path | str | None:
    """metadata.parquet from a `metadata_table` (a local folder: atomically; an object store: committed once);
    its location, or None when another process committed it first (an object store's merge is decided so)."""
    store = open_store(out)
    if store.local is not None:
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer)
        store.write_bytes(METADATA, buffer.getvalue().to_pybytes())
        return store.local / METADATA
    with tempfile.TemporaryDirectory(prefix="cxrgen-merge-") as folder:
        pq.write_table(table, Path(folder) / METADATA)
        return store.where(METADATA) if store.commit(METADATA, Path(folder) / METADATA) else None


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
