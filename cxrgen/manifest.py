"""Read a manifest (CSV, TSV or Parquet) into validated rows plus pass-through label columns."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cxrgen.errors import InputError

OVERRIDE_COLUMNS = ("id", "num_images", "guidance_scale", "seed", "negative_prompt")
MAX_NUM_IMAGES = 100_000
MAX_GUIDANCE = 100.0
MAX_SEED = 2**63 - 1
_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet"}


@dataclass(frozen=True)
class Row:
    """One manifest row; None in an override means 'use the run-wide value'."""

    number: int  # 1-based data row number (the header is not counted)
    prompt: str
    row_id: str | None = None
    num_images: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    negative_prompt: str | None = None


@dataclass(frozen=True)
class Manifest:
    """Validated rows, the untouched label columns, and the file's sha256."""

    path: str
    sha256: str
    rows: tuple[Row, ...]
    labels: pa.Table  # every column that is neither the prompt nor an override, row-aligned


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def detect_format(path: Path, manifest_format: str = "auto") -> str:
    """csv, tsv or parquet, from --manifest-format or the file suffix."""
    if manifest_format != "auto":
        return manifest_format
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise InputError(
            f"manifest {path}: unknown format {path.suffix or '(no suffix)'!r}; "
            "use a .csv, .tsv or .parquet file or pass --manifest-format csv|tsv|parquet"
        )
    return fmt


def read_manifest(path: str | Path, manifest_format: str = "auto", prompt_column: str = "prompt",
                  allow_empty_prompt: bool = False) -> Manifest:
    """Read and validate a manifest; raise InputError naming the row and column of any problem."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest {path} does not exist or is not a file; check the path")
    fmt = detect_format(path, manifest_format)
    text, typed = _read_frames(path, fmt)
    if prompt_column not in text.columns:
        raise InputError(
            f"manifest {path} has no column {prompt_column!r} (columns: {', '.join(map(str, text.columns))}); "
            "add it or name the prompt column with --prompt-column"
        )
    rows = tuple(_parse_row(i + 1, rec, prompt_column, allow_empty_prompt)
                 for i, rec in enumerate(text.to_dict("records")))
    _check_unique_ids(rows)
    labels = typed.drop(columns=[c for c in typed.columns if c == prompt_column or c in OVERRIDE_COLUMNS])
    table = pa.Table.from_pandas(labels, preserve_index=False)
    return Manifest(str(path.resolve()), file_sha256(path), rows, table)


def _read_frames(path: Path, fmt: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two views of the file: everything as raw text (no NA guessing) and pandas' typed view."""
    try:
        if fmt == "parquet":
            typed = pq.read_table(path).to_pandas()
            return typed.astype(object).where(typed.notna(), None), typed
        sep = "\t" if fmt == "tsv" else ","
        opts = dict(sep=sep, encoding="utf-8-sig")
        text = pd.read_csv(path, dtype=str, keep_default_na=False, **opts)
        return text, pd.read_csv(path, **opts)
    except (UnicodeDecodeError, ValueError, OSError, pa.ArrowException) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"manifest {path} cannot be read as {fmt}: {first}; "
                         "check the file or pass --manifest-format") from None


def _is_blank(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or \
        (isinstance(value, str) and value.strip() == "")


def _parse_row(number: int, rec: dict, prompt_column: str, allow_empty_prompt: bool) -> Row:
    prompt = rec.get(prompt_column)
    if _is_blank(prompt):
        if not allow_empty_prompt:
            raise InputError(f"row {number}, column {prompt_column}: prompt is blank; "
                             "fill it in or pass --allow-empty-prompt for unconditional samples")
        prompt = ""
    row_id = rec.get("id")
    if "id" in rec and _is_blank(row_id):
        raise InputError(f"row {number}, column id: blank; give every row an id or remove the id column")
    num_images = _number(rec, "num_images", number, integer=True, low=0, high=MAX_NUM_IMAGES)
    seed = _number(rec, "seed", number, integer=True, low=0, high=MAX_SEED - MAX_NUM_IMAGES)
    guidance = _number(rec, "guidance_scale", number, integer=False, low=0.0, high=MAX_GUIDANCE)
    negative = rec.get("negative_prompt")
    return Row(number=number, prompt=str(prompt), row_id=None if row_id is None else _as_id(row_id),
               num_images=num_images, guidance_scale=guidance, seed=seed,
               negative_prompt=None if _is_blank(negative) else str(negative))


def _as_id(value) -> str:
    # Parquet ids may be integers; 7.0 from a float column should read as "7".
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _number(rec: dict, column: str, number: int, *, integer: bool, low: float, high: float):
    """Parse one optional numeric override, or raise a message naming row, column and fix."""
    raw = rec.get(column)
    if _is_blank(raw):
        return None
    where = f"row {number}, column {column}"
    kind = "a whole number" if integer else "a number"
    if isinstance(raw, bool):
        raise InputError(f"{where}: {raw!r} is not a number; use {kind} from {low} to {high}")
    try:
        value = _to_number(raw)
    except (TypeError, ValueError):
        raise InputError(f"{where}: {raw!r} is not a number; use {kind} from {low} to {high}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{where}: {raw!r} is not finite; use {kind} from {low} to {high}")
    if value < 0:
        raise InputError(f"{where}: {raw!r} is negative; use a value >= {low}")
    if integer and isinstance(value, float) and not value.is_integer():
        raise InputError(f"{where}: {raw!r} is not a whole number; use {kind} from {low} to {high}")
    if value > high:
        raise InputError(f"{where}: {raw!r} is too large; use a value <= {high}")
    return int(value) if integer else float(value)


def _to_number(raw):
    """int when the value is integral text or an integer (keeps 63-bit seeds exact), else float."""
    if isinstance(raw, (int, np.integer)):
        return int(raw)
    if isinstance(raw, str):
        try:
            return int(raw.strip())
        except ValueError:
            return float(raw)
    return float(raw)


def _check_unique_ids(rows: tuple[Row, ...]) -> None:
    seen: dict[str, int] = {}
    for row in rows:
        if row.row_id is None:
            continue
        if row.row_id in seen:
            raise InputError(f"rows {seen[row.row_id]} and {row.number}, column id: {row.row_id!r} appears twice; "
                             "ids must be unique")
        seen[row.row_id] = row.number
