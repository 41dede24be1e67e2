"""The merge: every record streamed into metadata.parquet row group by row group, on either store.

Memory is bounded by a row group, not by the dataset: the records are read part by part (a part file in
blocks) and spilled to local disk by plan-index range; each range is then sorted, the latest record per image
kept (journal.WriterClocks: a remade image's later record describes its file), joined with the plan and
the manifest's labels, and written as one row group of a local parquet file, which is committed once at the end (a rename in a
folder, a create-if-absent upload in an object store). The dataset card's counts are gathered on the way.
"""
from __future__ import annotations

import math
import secrets
import tempfile
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cxrgen.files import STATE_DIR, TMP_MARK
from cxrgen.manifests.workitems import WorkItem
from cxrgen.runs.card import Facts
from cxrgen.runs.journal import METADATA_SCHEMA, WriterClocks, label_column_names, metadata_table, record_tables
from cxrgen.storage.base import METADATA, Store

ROW_GROUP = 65_536  # rows per row group of metadata.parquet: the merge holds about one of these at a time


def merge_metadata(store: Store, items: Callable[[], Iterable[WorkItem]], planned: int,
                   labels: pa.Table) -> tuple[Path | str, bool, Facts] | None:
    """Merge the records of every planned image into metadata.parquet: (location, committed by this call, facts).

    items() gives the plan in order (it is walked twice). None, and nothing written, while a planned image has
    no record or no file. committed False: another process's merge was committed first (object stores).
    """
    first, counts = _row_offsets(items(), planned)
    # local runs spill beside the run (the disk that holds it has room); object stores on local temp space
    spill_root = store.local / STATE_DIR if store.local is not None else None
    if spill_root is not None:
        spill_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".merge-", dir=spill_root) as folder:
        if not _spill(store, Path(folder), first, counts):
            return None
        target = (store.local / f".{METADATA}{TMP_MARK}{secrets.token_hex(4)}" if store.local is not None
                  else Path(folder) / METADATA)
        try:
            facts = _write(store, target, items(), planned, labels, Path(folder))
            if facts is None:
                return None
            committed = store.commit(METADATA, target)
        finally:
            target.unlink(missing_ok=True)
    location = store.local / METADATA if store.local is not None else store.where(METADATA)
    return location, committed, facts


def _row_offsets(items: Iterable[WorkItem], planned: int) -> tuple[np.ndarray, np.ndarray]:
    """Per manifest row: the plan index of its first image and its number of images."""
    first, counts = np.full(16, -1, np.int64), np.zeros(16, np.int64)
    for item in items:
        if item.row >= len(first):
            grow = max(item.row + 1, 2 * len(first))
            first = np.concatenate([first, np.full(grow - len(first), -1, np.int64)])
            counts = np.concatenate([counts, np.zeros(grow - len(counts), np.int64)])
        if item.sample_index == 0:
            first[item.row] = item.index
        counts[item.row] += 1
    return first, counts


def _spill(store: Store, folder: Path, first: np.ndarray, counts: np.ndarray) -> int:
    """Write every record into folder/<group>.arrow by plan-index range, with its index and arrival order;
    returns how many records were read."""
    schema = METADATA_SCHEMA.append(pa.field("_index", pa.int64())).append(pa.field("_seq", pa.int64())) \
        .append(pa.field("_stamp", pa.string()))
    writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
    clocks = WriterClocks()
    seq = 0
    try:
        for writer, table in record_tables(store, METADATA_SCHEMA):
            stamps = clocks.stamps(writer, table.column("created_at").to_pylist())
            rows = table.column("manifest_row").to_numpy(zero_copy_only=False)
            samples = table.column("sample_index").to_numpy(zero_copy_only=False)
            rows = np.nan_to_num(rows.astype(np.float64), nan=-1).astype(np.int64)  # a record without a row: skip
            samples = np.nan_to_num(samples.astype(np.float64), nan=-1).astype(np.int64)
            known = (rows >= 0) & (rows < len(first)) & (samples >= 0)
            known[known] &= samples[known] < counts[rows[known]]
            index = np.where(known, first[np.clip(rows, 0, len(first) - 1)] + samples, -1)
            table = table.append_column("_index", pa.array(index)).append_column(
                "_seq", pa.array(np.arange(seq, seq + table.num_rows, dtype=np.int64))).append_column(
                "_stamp", pa.array(stamps, pa.string()))
            seq += table.num_rows
            table = table.filter(pa.array(known))
            group_of = table.column("_index").to_numpy() // ROW_GROUP
            for group in np.unique(group_of):
                if group not in writers:
                    writers[group] = pa.ipc.new_stream(str(folder / f"{group}.arrow"), schema)
                writers[group].write_table(table.filter(pa.array(group_of == group)).cast(schema))
    finally:
        for writer in writers.values():
            writer.close()
    return seq


def _write(store: Store, target: Path, items: Iterable[WorkItem], planned: int, labels: pa.Table,
           folder: Path) -> Facts | None:
    """The row groups, in plan order, into target; None (target left incomplete) when an image is missing."""
    label_names = label_column_names(labels.column_names) if labels.num_columns else []
    schema = METADATA_SCHEMA
    for name, column in zip(label_names, labels.columns):
        schema = schema.append(pa.field(name, column.type))
    facts = Facts(schema.names)
    plan = iter(items)
    with pq.ParquetWriter(str(target), schema) as writer:
        for group in range(math.ceil(planned / ROW_GROUP)):
            chunk = list(islice(plan, ROW_GROUP))
            table = _latest_records(folder / f"{group}.arrow", chunk)
            if table is None or any(size is None for size in store.sizes([i.file_name for i in chunk])):
                return None
            # the plan's file names: the same as recorded, stated once by the plan
            table = table.set_column(table.schema.get_field_index("file_name"), "file_name",
                                     pa.array([item.file_name for item in chunk], pa.string()))
            table = metadata_table(table, labels, [item.row for item in chunk])
            writer.write_table(table, row_group_size=ROW_GROUP)
            facts.add(table)
    return facts


def _latest_records(path: Path, chunk: list[WorkItem]) -> pa.Table | None:
    """The latest record of each image of chunk, in plan order; None when one is missing or names another image.

    Latest as journal.WriterClocks says: the later rank (a writer's running maximum of created_at), a tie going
    to the record read later."""
    if not path.is_file():
        return None
    with pa.ipc.open_stream(str(path)) as reader:
        table = reader.read_all()
    table = table.sort_by([("_index", "ascending"), ("_stamp", "ascending"), ("_seq", "ascending")])
    index = table.column("_index").to_numpy()
    keep = np.ones(len(index), bool)
    keep[:-1] = index[:-1] != index[1:]  # the last of each index's run
    table = table.filter(pa.array(keep))
    wanted = np.array([item.index for item in chunk], np.int64)
    if table.num_rows != len(chunk) or not np.array_equal(table.column("_index").to_numpy(), wanted):
        return None
    if not pc.all(pc.equal(table.column("image_id"), pa.array([item.image_id for item in chunk]))).as_py():
        return None
    table = table.select(METADATA_SCHEMA.names)
    # records of a plain run (and of cxrgen before --verify) name no attempt: each is its image's first and only
    position = table.schema.get_field_index("attempt")
    return table.set_column(position, "attempt", pc.fill_null(table.column("attempt"), 0))
