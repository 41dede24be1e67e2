"""cxrgen export: a finished run (a folder or an object-store prefix) as WebDataset shards or as a (filtered)
imagefolder copy.

Into a folder, both are built in a hidden folder beside --to and renamed into place at the end, so --to is
either absent, empty, or a complete export: an interrupted export leaves nothing half-written under that name.
Into an object-store prefix (webdataset only), each shard is built on local disk and uploaded as one object
once complete, train-000000.tar first; a failed export removes what it uploaded (an interrupted one may leave
complete shards, never a partial one: export again into a new or emptied prefix).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import secrets
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cxrgen.errors import InputError
from cxrgen.files import (
    TMP_MARK,
    atomic_write,
    fsync_dir,
    inside,
    io_error,
    resume_command,
)
from cxrgen.config import is_url
from cxrgen.runs.card import write_card
from cxrgen.runs.journal import EVAL_DIR
from cxrgen.runs.state import read_run_json
from cxrgen.storage.base import METADATA, Store
from cxrgen.storage.open import open_store

FORMATS = ("webdataset", "imagefolder")
DEFAULT_SHARD_SIZE = 1_000_000_000  # bytes: WebDataset's usual ~1 GB shards
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")
_TAR_BLOCK = 512
_KEY_SAFE = re.compile(r"[A-Za-z0-9_-]+")  # cxrgen's own ids, dots aside
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_KEY_MAX = 90  # characters; cxrgen's own ids have at most 78


@dataclass(frozen=True)
class ExportOptions:
    """What `cxrgen export` was asked to do."""

    out: str  # the run folder or URL (holds metadata.parquet)
    to: str  # the folder to create (absent or empty), or an empty object-store prefix (webdataset)
    format: str = "webdataset"  # "webdataset" or "imagefolder"
    shard_size: int = DEFAULT_SHARD_SIZE  # webdataset: bytes per shard at most (a bigger single sample gets its own)
    accepted_only: bool = False  # only images `cxrgen evaluate` accepted
    verified_only: bool = False  # only images `cxrgen generate --verify` confirmed (metadata column verified)


@dataclass(frozen=True)
class ExportResult:
    """What was written."""

    to: Path | str
    format: str
    images: int
    total: int  # images in the run
    files: list[Path | str]  # the shards, or the imagefolder's metadata.parquet and README.md
    copied: int = 0  # imagefolder: images copied because a hard link was not possible


def parse_size(text: str) -> int:
    """Bytes of a size such as 1GB, 500MB, 2GiB or 1000000 (decimal units: 1GB = 10^9 bytes)."""
    match = _SIZE.fullmatch(str(text))
    if not match or match.group(2).lower() not in _UNITS or float(match.group(1)) <= 0:
        raise InputError(f"--shard-size {text!r} is not a size; write e.g. 1GB, 500MB, 2GiB or a number of bytes")
    return max(1, int(float(match.group(1)) * _UNITS[match.group(2).lower()]))


def export_run(options: ExportOptions) -> ExportResult:
    """Write the run in options.out as options.format into options.to (see the module docstring)."""
    # 1. check everything before writing anything
    if options.format not in FORMATS:
        raise InputError(f"--format {options.format!r} is not one of {', '.join(FORMATS)}")
    out = open_store(options.out if is_url(options.out) else Path(options.out).resolve())
    if is_url(options.to):
        open_store(options.to)  # an unusable URL is refused before the run is read
    run = read_run_json(out)
    if run is None:
        raise InputError(f"{out} is not a cxrgen run (no run.json); give the output folder of a run")
    if out.sizes([METADATA])[0] is None:
        raise InputError(f"{out} has no metadata.parquet yet: the run is unfinished; finish it with "
                         f"`{resume_command(out)}`, then export")
    if is_url(options.to):
        return _export_to_store(options, out, run)
    to = Path(options.to).resolve()
    _check_target(out, to)
    table, total = _exported_rows(out, options)
    # 2. build in a hidden sibling folder, then rename it into place
    staging = to.parent / f".{to.name}{TMP_MARK}{secrets.token_hex(4)}"
    try:
        staging.mkdir(parents=True)
        if options.format == "webdataset":
            names, copied = _write_shards(out, table, staging, options.shard_size, lambda name, path: None), 0
            # a card naming the real shards (OUT's card cannot: it was written before any export)
            write_card(staging, table, run, shards=names, note=f"Exported by `cxrgen export --format webdataset` "
                       f"from the run {out}: {_kept_what(options, table.num_rows, total)}.")
        else:
            names, copied = _write_imagefolder(out, table, staging, run, _kept_what(options, table.num_rows, total))
        fsync_dir(staging)
        if to.is_dir():
            to.rmdir()  # empty (checked above): the rename needs the name free on every system
        os.replace(staging, to)
        fsync_dir(to.parent)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise io_error(to, exc) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(to, options.format, table.num_rows, total, [to / n for n in names], copied)


def _exported_rows(out: Store, options: ExportOptions) -> tuple[pa.Table, int]:
    """The rows to export (all, or the verified and/or accepted ones) and the run's image count."""
    with out.open_input(METADATA) as handle:
        table = pq.read_table(handle)
    total = table.num_rows
    for name in table.column("file_name").to_pylist():
        inside(Path(out.url), name)  # never pack, nor link to, a file outside the run
    if options.verified_only:
        table = table.filter(_verified(out, table))
    if options.accepted_only:
        table = table.filter(pc.is_in(table.column("image_id"), value_set=_accepted_ids(out, table)))
    if options.format == "webdataset":
        _check_keys(table.column("image_id").to_pylist())  # before anything is written, not half-way
    return table, total


def _export_to_store(options: ExportOptions, out: Store, run: dict) -> ExportResult:
    """WebDataset shards into an empty object-store prefix: each built on local disk, then uploaded whole."""
    if options.format != "webdataset":
        raise InputError(f"--to {options.to}: an object-store prefix takes --format webdataset (the format "
                         "trainers stream); export an imagefolder into a local folder")
    to = open_store(options.to)
    if to.url.rstrip("/") == out.url.rstrip("/") or to.url.startswith(out.url.rstrip("/") + "/"):
        raise InputError(f"--to {to} is inside the run {out}; choose a prefix outside it")
    if to.entries():
        raise InputError(f"--to {to} already holds objects; choose a new prefix or empty it (e.g. `aws s3 rm "
                         f"--recursive {to}`)")
    to.check_writable()
    table, total = _exported_rows(out, options)
    uploaded: list[str] = []

    def publish(name: str, path: Path) -> None:
        to.upload(name, path)
        uploaded.append(name)
        path.unlink()  # local disk holds one shard at a time

    try:
        with tempfile.TemporaryDirectory(prefix="cxrgen-export-") as folder:
            names = _write_shards(out, table, Path(folder), options.shard_size, publish)
            # a card naming the real shards, uploaded after them: a prefix with a card holds every shard
            write_card(Path(folder), table, run, shards=names, note=f"Exported by `cxrgen export --format webdataset` "
                       f"from the run {out}: {_kept_what(options, table.num_rows, total)}.")
            publish("README.md", Path(folder) / "README.md")
    except BaseException:
        for name in uploaded:  # best effort: a failed export leaves no shard behind
            try:
                to.delete(name)
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
        raise
    return ExportResult(to.url, options.format, table.num_rows, total, [to.where(n) for n in uploaded if n != "README.md"],
                        0)


def _check_target(out: Store, to: Path) -> None:
    if out.local is None:
        if to.exists() and (not to.is_dir() or any(to.iterdir())):
            raise InputError(f"--to {to} already exists and is not an empty folder; choose a new folder or remove it")
        return
    out = out.local
    if to == out or out in to.parents:
        raise InputError(f"--to {to} is inside the run folder {out}; choose a folder outside it")
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise InputError(f"--to {to} already exists and is not an empty folder; choose a new folder or remove it")


def _verified(out: Store, table: pa.Table) -> pa.Array:
    """The mask of images --verify confirmed: verified is true (false: every attempt failed; null: not verified)."""
    if "verified" not in table.column_names or table.column("verified").null_count == table.num_rows:
        raise InputError(f"--verified-only needs a run made with `cxrgen generate --verify`, and {out} was not (its "
                         "metadata.parquet verifies no image); generate with --verify, or export without the option")
    return pc.fill_null(pc.equal(table.column("verified"), True), False)


def _kept_what(options: ExportOptions, kept: int, total: int) -> str:
    """The card's words for what the export holds."""
    filters = [name for name, on in (("`cxrgen generate --verify` verified", options.verified_only),
                                     ("`cxrgen evaluate` accepted", options.accepted_only)) if on]
    return f"the {kept} of {total} images {' and '.join(filters)}" if filters else f"all {total} images"


def _accepted_ids(out: Store, table: pa.Table) -> pa.Array:
    """image_ids `cxrgen evaluate` accepted; the scores must cover exactly this run's images."""
    name = f"{EVAL_DIR}/scores.parquet"
    scores_path = out.where(name)
    if out.sizes([name])[0] is None:
        raise InputError(f"--accepted-only needs an evaluation, and {scores_path} does not exist; run "
                         f"`cxrgen evaluate {out}` first")
    with out.open_input(name) as handle:
        scores = pq.read_table(handle, columns=["image_id", "accepted"])
    if set(scores.column("image_id").to_pylist()) != set(table.column("image_id").to_pylist()):
        raise InputError(f"{scores_path} does not cover the images of metadata.parquet (evaluated before the run "
                         f"changed?); run `cxrgen evaluate {out}` again")
    return scores.filter(pc.equal(scores.column("accepted"), True)).column("image_id").combine_chunks()


def sample_key(image_id: str) -> str:
    """The WebDataset key of an image: its id, every character but A-Z, a-z, 0-9, `_` and `-` replaced.

    Dots because readers split names at the first dot; slashes because a member must not leave its folder.
    An id that held one gets a short hash of itself, so `a.b_0000` and `a_b_0000` stay two keys; the json
    always carries the original image_id.
    """
    if _KEY_SAFE.fullmatch(image_id) and len(image_id) <= _KEY_MAX:
        return image_id
    # cut to fit a USTAR member name (100 bytes) with its `.json`: ids from tables made elsewhere may be long
    return f"{_KEY_UNSAFE.sub('_', image_id)[:_KEY_MAX - 9]}-{hashlib.sha256(image_id.encode('utf-8')).hexdigest()[:8]}"


def _check_keys(image_ids: list[str]) -> None:
    """Refuse two images whose keys differ at most in letter case: a shard unpacked on a case-insensitive file
    system (macOS, Windows) would merge them into one sample."""
    keys: dict[str, str] = {}
    for image_id in image_ids:
        key = sample_key(image_id)
        if keys.setdefault(key.lower(), image_id) != image_id:
            raise InputError(f"images {keys[key.lower()]!r} and {image_id!r} give the same WebDataset key "
                             f"{key!r} (letter case aside); rename one row id")


def _rows(table: pa.Table):
    for batch in table.to_batches(max_chunksize=4096):
        yield from batch.to_pylist()


def _json_row(row: dict) -> bytes:
    """The sample's metadata row as strict JSON (RFC 8259 has no NaN or Infinity; `allow_nan=False` checks it)."""
    return json.dumps(_strict(row), ensure_ascii=False, default=str, allow_nan=False).encode("utf-8")


def _strict(value):
    """NaN becomes null; +-inf, a valid float label, becomes the text "inf" / "-inf" (float() reads it back)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def _finished_size(members: int) -> int:
    record = tarfile.RECORDSIZE
    return -(-(members + 2 * _TAR_BLOCK) // record) * record


def _tar_size(*sizes: int) -> int:
    return sum(_TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK for size in sizes)


def _write_shards(out: Store, table: pa.Table, folder: Path, shard_size: int, publish) -> list[str]:
    """train-000000.tar, ... in plan order; each sample is <key>.<jpg|png> + <key>.json.

    publish(name, path) is called with each shard once it is complete (an object store uploads it).
    """
    names: list[str] = []
    tar, handle, used = None, None, 0
    images = out.read_many(table.column("file_name").to_pylist())  # fetched ahead from an object store
    try:
        for row, image in zip(_rows(table), images):
            key = sample_key(row["image_id"])
            if image is None:
                raise InputError(f"{out.where(row['file_name'])} is missing; `cxrgen status {out}` lists what the "
                                 f"run lacks and `{resume_command(out)}` remakes it")
            meta = _json_row(row)
            size = _tar_size(len(image), len(meta))
            # a new shard when this sample would overflow a non-empty one (the finished file: end-of-archive
            # blocks, padded to whole 10 KiB records)
            if tar is None or (used and _finished_size(used + size) > shard_size):
                _close_shard(tar, handle)
                tar = None  # closed: if the next shard cannot be opened, `finally` must not close it again
                if names:
                    publish(names[-1], folder / names[-1])
                names.append(f"train-{len(names):06d}.tar")
                handle = open(folder / names[-1], "wb")
                tar, used = tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT), 0
            _add(tar, f"{key}.{Path(row['file_name']).suffix.lstrip('.').lower()}", image)
            _add(tar, f"{key}.json", meta)
            used += size
        _close_shard(tar, handle)
        tar = None
        if names:
            publish(names[-1], folder / names[-1])
    finally:
        _close_shard(tar, handle)
    return names


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # fixed owner, mode and time: the same run always exports to the same bytes
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0
    tar.addfile(info, io.BytesIO(data))


def _close_shard(tar, handle) -> None:
    if tar is not None:
        tar.close()
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()


def _write_imagefolder(out: Store, table: pa.Table, folder: Path, run: dict, what: str) -> tuple[list[str], int]:
    """images/ hard-linked (copied across file systems or from a bucket), the filtered metadata.parquet, its card."""
    copied = 0
    names = table.column("file_name").to_pylist()
    fetched = out.read_many(names) if out.local is None else iter(())
    for name in names:
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if out.local is None:
            data = next(fetched)
            if data is None:
                raise InputError(f"{out.where(name)} is missing; `{resume_command(out)}` remakes it")
            target.write_bytes(data)
            copied += 1
            continue
        try:
            os.link(out.local / name, target)
        except OSError:  # another file system, or one without hard links
            shutil.copyfile(out.local / name, target)
            copied += 1
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    atomic_write(folder / "metadata.parquet", buffer.getvalue().to_pybytes())
    write_card(folder, table, run, note=f"Exported by `cxrgen export` from the run {out}: {what}.")
    return ["metadata.parquet", "README.md"], copied
