"""Read a manifest (CSV, TSV or Parquet) into validated rows plus pass-through label columns."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cxrgen.errors import InputError
from cxrgen.files import file_digest

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
    """Hex sha256 of a file (identifies the manifest in run.json)."""
    return file_digest(path, "sha256")


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
    names = [c for c in text.columns if c != prompt_column and c not in OVERRIDE_COLUMNS]
    labels = typed.select(names).replace_schema_metadata(None) if typed is not None else _typed_labels(text, names)
    return Manifest(str(path.resolve()), file_sha256(path), rows, labels)


def _read_frames(path: Path, fmt: str) -> tuple[pd.DataFrame, pa.Table | None]:
    """Raw values (CSV: all text, no NA guessing) and, for Parquet, the typed Arrow table as stored."""
    try:
        if fmt == "parquet":
            typed = pq.read_table(path)
            # pandas writes an unnamed non-range index as __index_level_N__: not a label
            typed = typed.drop_columns([c for c in typed.column_names if c.startswith("__index_level_")])
            # object columns keep exact Python ints (63-bit seeds) instead of NaN-able floats
            return pd.DataFrame(typed.to_pydict(), columns=typed.column_names, dtype=object), typed
        sep = "\t" if fmt == "tsv" else ","
        # An empty line is a row (a one-column spreadsheet writes a blank cell that way): skipping it
        # would hide a blank prompt and renumber every later row. Empty lines at the very end are not rows.
        opts = dict(sep=sep, encoding="utf-8-sig", skip_blank_lines=False)
        text = pd.read_csv(path, dtype=str, keep_default_na=False, **opts)
        return text.iloc[:len(text) - _trailing_empty_rows(text)], None
    except (UnicodeDecodeError, ValueError, OSError, pa.ArrowException) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"manifest {path} cannot be read as {fmt}: {first}; "
                         "check the file or pass --manifest-format") from None


def _trailing_empty_rows(text: pd.DataFrame) -> int:
    """How many rows at the end of the text view have nothing but blanks in every cell."""
    empty = (text.fillna("").astype(str).apply(lambda column: column.str.strip()) == "").all(axis=1).tolist()
    count = 0
    while count < len(empty) and empty[len(empty) - 1 - count]:
        count += 1
    return count


# Numbers as a spreadsheet or pandas prints them. A leading zero (`007`, `-007.5`) or an explicit `+` marks
# an identifier or a code (study ids, ICD codes): as a number it would lose characters, so it stays text.
_INT = re.compile(r"-?(0|[1-9]\d*)")
_FLOAT = re.compile(r"-?((0|[1-9]\d*)(\.\d*)?|\.\d+)([eE][+-]?\d+)?|-?(inf|infinity|nan)", re.IGNORECASE)
_BOOLS = {"true": True, "false": False}


def _typed_labels(text: pd.DataFrame, names: list[str]) -> pa.Table:
    """CSV label columns with the narrowest type that holds every cell exactly; blank cells are null.

    int64, then float64, then bool (true/false in any case), else the text unchanged: integers
    with blanks stay integers, and "NA" or "None" stay text as in the file. A column with any cell
    written with a leading zero (`007`, `-007`, `007.5`; `0` and `0.5` are numbers) or a `+` sign
    (`+5`) stays text, as do integers beyond int64 or beyond 2**53 among floats.
    """
    arrays = []
    for name in names:
        cells = [None if _is_blank(v) else str(v).strip() for v in text[name].tolist()]
        present = [c for c in cells if c is not None]
        whole = [bool(_INT.fullmatch(c)) for c in present]
        if present and all(whole) and all(-2**63 <= int(c) < 2**63 for c in present):
            arrays.append(pa.array([None if c is None else int(c) for c in cells], pa.int64()))
        elif present and all(_FLOAT.fullmatch(c) and not (w and abs(int(c)) >= 2**53)
                             for c, w in zip(present, whole)):  # floats hold integers exactly below 2**53
            arrays.append(pa.array([None if c is None else float(c) for c in cells], pa.float64()))
        elif present and all(c.lower() in _BOOLS for c in present):
            arrays.append(pa.array([None if c is None else _BOOLS[c.lower()] for c in cells], pa.bool_()))
        else:
            raw = [None if _is_blank(v) else str(v) for v in text[name].tolist()]
            arrays.append(pa.array(raw, pa.string()))
    return pa.table(arrays, names=names) if names else pa.table({})


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
