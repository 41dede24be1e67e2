"""Tables in and manifests out for `cxrgen manifest`: read CSV/TSV/Parquet, write CSV or Parquet atomically."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cxrgen.errors import InputError, RunError
from cxrgen.files import atomic_write

_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet"}
# pandas reads these compressed CSV/TSV files directly; the format is the suffix before them
_COMPRESSED = (".gz", ".bz2", ".zip", ".xz", ".zst")


@dataclass(frozen=True)
class Table:
    """A table as text cells (CSV: exactly as written; blanks are "") plus, for Parquet, the typed Arrow table."""

    path: Path
    text: pd.DataFrame  # every cell a str; a Parquet null is ""
    typed: pa.Table | None  # Parquet only: the columns with their stored types

    @property
    def name(self) -> str:
        """The file name used in messages."""
        return self.path.name


def normalize_name(name: str) -> str:
    """Column names compare case-insensitively with `_` and space alike (`pleural_effusion` = `Pleural Effusion`)."""
    return " ".join(str(name).replace("_", " ").lower().split())


def table_format(path: Path, what: str) -> str:
    """csv, tsv or parquet from the suffix (a .gz/.bz2/.zip/.xz/.zst after .csv or .tsv is allowed)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED and len(suffixes) > 1:
        suffixes = suffixes[:-1]
    fmt = _SUFFIXES.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        raise InputError(f"{what} {path}: unknown format {path.suffix or '(no suffix)'!r}; "
                         "use a .csv, .tsv or .parquet file")
    return fmt


def read_table(path: str | Path, what: str) -> Table:
    """Read a CSV, TSV or Parquet table the way manifests are read: text as written, no NA guessing."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist or is not a file; check the path")
    fmt = table_format(path, what)
    if path.stat().st_size == 0:
        raise InputError(f"{what} {path} is empty; give a table with a header and at least one row")
    try:
        if fmt == "parquet":
            typed = pq.read_table(path)
            # pandas writes an unnamed non-range index as __index_level_N__: not a column of the user's
            typed = typed.drop_columns([c for c in typed.column_names if c.startswith("__index_level_")])
            text = pd.DataFrame({name: ["" if v is None else _cell_text(v) for v in typed.column(name).to_pylist()]
                                 for name in typed.column_names}, columns=typed.column_names, dtype=object)
        else:
            typed = None
            # same options as manifests: a spreadsheet's BOM, quoted newlines, NA/None kept as text
            text = pd.read_csv(path, sep="\t" if fmt == "tsv" else ",", dtype=str, keep_default_na=False,
                               encoding="utf-8-sig")
    except (UnicodeDecodeError, ValueError, OSError, pa.ArrowException) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{what} {path} cannot be read as {fmt}: {first}; check the file") from None
    if len(text.columns) != len(set(map(str, text.columns))):
        raise InputError(f"{what} {path} has two columns with the same name; rename one")
    text.columns = [str(c) for c in text.columns]
    # Empty lines at the very end are not rows (an editor's trailing newlines)
    while len(text) and all(str(v).strip() == "" for v in text.iloc[-1].tolist()):
        text = text.iloc[:-1]
        typed = typed.slice(0, len(text)) if typed is not None else None
    if text.empty:
        raise InputError(f"{what} {path} has no data rows; give a table with a header and at least one row")
    return Table(path, text.reset_index(drop=True), typed)


def _cell_text(value) -> str:
    # Parquet floats that are whole (1.0) read as "1.0", like the CheXpert CSV files write them
    if isinstance(value, float) and value != value:  # NaN: a blank cell
        return ""
    return str(value)


def output_format(path: Path) -> str:
    """csv or parquet from the output file's suffix."""
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt not in ("csv", "parquet"):
        raise InputError(f"-o {path}: write a .csv or .parquet manifest (got {path.suffix or 'no suffix'!r})")
    return fmt


def check_output(out: Path, *inputs: Path) -> None:
    """Refuse an output path that would overwrite an input or is a folder, before any work is done."""
    if out.is_dir():
        raise InputError(f"-o {out} is a folder; give a file name such as {out / 'manifest.csv'}")
    output_format(out)
    for source in inputs:
        if source is not None and out.resolve() == Path(source).resolve():
            raise InputError(f"-o {out} is the input file; choose another output name")


def write_manifest(out: Path, columns: dict[str, list], types: dict[str, pa.DataType] | None = None) -> None:
    """Write columns (name -> values) as CSV (LF line ends, minimal quoting) or Parquet, crash-safe.

    Values are written as given: callers pass text cells for CSV-derived columns so the bytes depend on
    the input and the seed only. Parquet columns take `types` where given, else Arrow's inference.
    """
    fmt = output_format(out)
    names = list(columns)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(names)
        writer.writerows(zip(*(columns[n] for n in names)))
        data = buffer.getvalue().encode("utf-8")
    else:
        types = types or {}
        arrays = [columns[n] if isinstance(columns[n], pa.Array) else pa.array(columns[n], type=types.get(n))
                  for n in names]
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table(arrays, names=names), sink)
        data = sink.getvalue().to_pybytes()
    try:
        atomic_write(out, data)
    except RunError as exc:  # store's message suggests `cxrgen resume`, which means nothing here
        raise RunError(f"{str(exc).split(';')[0]}; fix the problem and run the command again") from None
