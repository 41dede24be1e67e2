"""A finished run's files for `cxrgen evaluate`, in a folder or a bucket: its metadata table, its images, the
verifier it was made with, and quality/ uploaded back into a bucket (summary.json last)."""
from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cxrgen.errors import InputError
from cxrgen.files import resume_command
from cxrgen.runs.journal import EVAL_DIR
from cxrgen.runs.state import read_run_json
from cxrgen.storage.base import METADATA, Store


def finished_run(out: Store) -> tuple[pa.Table, int]:
    """metadata.parquet of a finished run, and its planned image count; an unfinished run is an input error."""
    saved = read_run_json(out) if out.local is None or out.local.is_dir() else None
    if saved is None:
        raise InputError(f"{out} is not a cxrgen run (no run.json); give the output folder of `cxrgen generate`")
    planned = int(saved["settings"].get("planned_images", 0))
    path = out.where(METADATA)
    try:
        with out.open_input(METADATA) as handle:
            table = pq.read_table(handle)
    except Exception:  # noqa: BLE001 - a missing or damaged table counts as not written
        table = None
    rows = 0 if table is None else table.num_rows
    if table is None or rows < planned:
        have = "has no metadata.parquet" if table is None else f"has metadata for {rows} of {planned} planned images"
        raise InputError(f"{out} is not a finished run ({have}); finish it with `{resume_command(out)}`, then "
                         "evaluate it")
    missing = [c for c in ("image_id", "file_name", "prompt") if c not in table.column_names]
    if missing:
        raise InputError(f"{path} lacks column {missing[0]}; it was not written by cxrgen, so it cannot be evaluated")
    return table, planned


def verifier_of(out: Store, evaluator_sha256: str) -> dict | None:
    """The classifier `cxrgen generate --verify` judged the run with, and whether it is this evaluator (then every
    verified image passed these very weights, and the adherence figures say nothing new); None: not verified."""
    block = (read_run_json(out) or {}).get("settings", {}).get("verify")
    if block is None:
        return None
    return {"release": block.get("release"), "weights_file": block.get("weights_file"),
            "sha256": block.get("weights_sha256"), "min_score": block.get("min_score"),
            "is_evaluator": block.get("weights_sha256") == evaluator_sha256}


def fetch(out: Store, name: str) -> io.BytesIO:
    """An image of a bucket, for the decoder (a missing one decodes as unreadable)."""
    return io.BytesIO(out.read_bytes(name) or b"")


def upload(out: Store, folder: Path, written: list[Path]) -> list[str]:
    """Upload the local quality/ files, summary.json last; drop plots of an earlier evaluation this one lacks."""
    from cxrgen.evaluation.report import is_plot

    files = sorted(p.name for p in folder.iterdir() if p.name != "summary.json") + ["summary.json"]
    for name in files:
        out.write_bytes(f"{EVAL_DIR}/{name}", (folder / name).read_bytes())
    for stale in out.list_names(EVAL_DIR):
        if is_plot(stale.rsplit("/", 1)[-1]) and stale.rsplit("/", 1)[-1] not in files:
            out.delete(stale)
    return [out.where(f"{EVAL_DIR}/{p.name}") for p in written]
