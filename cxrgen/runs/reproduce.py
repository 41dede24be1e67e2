"""Regenerate one finished image from its metadata row and compare it with the stored file."""
from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cxrgen.config import RunConfig, is_url
from cxrgen.errors import InputError
from cxrgen.files import (
    STATE_DIR,
    atomic_write,
    inside,
    refuse_url,
    resume_command,
)
from cxrgen.hub.info import offline_problem
from cxrgen.manifests.workitems import WorkItem
from cxrgen.model.bundle import BundleSource, resolve_model
from cxrgen.provenance import encode_image, provenance_of, read_provenance
from cxrgen.runs.journal import read_records
from cxrgen.runs.state import image_ok, read_run_json
from cxrgen.storage.base import METADATA, Store
from cxrgen.storage.open import open_store

_SUFFIXES = {"jpg": (".jpg", ".jpeg"), "png": (".png",)}


@dataclass(frozen=True)
class ReproduceResult:
    """How a regenerated image compares with the stored one (pixels after decoding both files)."""

    image_id: str
    stored: Path | str  # the run's file (a URL in an object store)
    output: Path | None  # where the regenerated image was written, if asked
    device: str
    dtype: str
    max_abs_diff: int  # gray levels
    mean_abs_diff: float
    identical_fraction: float  # share of pixels with exactly the same value
    same_bytes: bool  # the regenerated file's bytes equal the stored file's


def reproduce_image(out: str | Path, image_id: str, *, bundle_source: BundleSource | None = None,
                    device: str | None = None, dtype: str | None = None, output: str | Path | None = None,
                    model: str | None = None, text_encoder: str | None = None,
                    offline: bool = False) -> ReproduceResult:
    """Remake one image of the run in OUT alone (a batch of one) and measure how far it is from the stored file.

    device None means the kind the image was made on (its device_type); dtype None means the image's own.
    model / text_encoder replace the run's saved locations (e.g. on another machine); the weights must
    still be the run's (checkpoint md5s and the text encoder's fingerprint are checked).
    """
    from cxrgen.runs.generate import load_models, make_engine

    for what, value in (("--model", model), ("--text-encoder", text_encoder), ("--out", output)):
        refuse_url(value, what)
    out = open_store(out)
    saved = read_run_json(out)
    if saved is None:
        raise InputError(f"{out} is not a cxrgen run (no run.json); give the output folder of a run")
    config = RunConfig.from_dict(saved["config"])
    record = _find_record(out, image_id)
    stored = out.local / record["file_name"] if out.local is not None else out.where(record["file_name"])
    original = out.read_bytes(inside(Path("."), record["file_name"]).as_posix())
    if original is None or not image_ok(io.BytesIO(original)):
        raise InputError(f"{stored} is missing or damaged, so there is nothing to compare; "
                         f"`{resume_command(out)}` remakes it")
    output = _check_output(out, output, config.image_format)
    # 1. the run's networks, on the chosen device; compile only pays off over many batches
    config = dataclasses.replace(config, compile=False, model=model or config.model,
                                 text_encoder=text_encoder or config.text_encoder, offline=offline)
    device = device or record.get("device_type") or "cpu"
    # the image's own dtype: a 16-bit GPU run resumed on the CPU made those images in float32
    dtype = dtype or record.get("dtype") or saved["settings"]["dtype"]
    cache_dir = config.cache_dir or str(Path.home() / ".cache" / "cxrgen")  # as the run resolved it
    problem = offline_problem(cache_dir, config.model, config.text_encoder) if offline else None
    if problem:  # the bundle and the text encoder named together
        raise problem
    bundle_root = resolve_model(config.model, cache_dir, bundle_source, offline=offline)
    bundle, text = load_models(config, bundle_root, device)
    if bundle.md5 != saved["settings"]["checkpoint_md5"]:
        raise InputError(f"the checkpoints in {bundle_root} are not the ones this run used (md5 {bundle.md5} vs "
                         f"{saved['settings']['checkpoint_md5']}); pass the run's bundle with --model")
    recorded = saved["settings"].get("text_encoder_fingerprint")  # absent in runs of older cxrgen versions
    if recorded is not None and text.fingerprint != recorded:
        raise InputError(f"the text encoder {config.text_encoder} is not the one this run used ({text.fingerprint} vs "
                         f"{recorded}); pass the run's text encoder with --text-encoder")
    engine = make_engine(config, bundle, text, device, dtype)
    # 2. one image, from the same inputs the run recorded
    pixels = engine.run_batch([_work_item(record)])[0].numpy()
    data = encode_image(pixels, config.image_format, config.jpeg_quality, _marker(record, original))
    if output is not None:
        atomic_write(output, data)
    # 3. compare what a viewer sees: both files decoded (a JPEG run's stored pixels are the decoded JPEG)
    diff = np.abs(_decode(data) - _decode(original))
    return ReproduceResult(image_id, stored, output, str(engine.options.device), dtype, int(diff.max()),
                           float(diff.mean()), float((diff == 0).mean()), data == original)


def _marker(record: dict, stored: bytes) -> dict | None:
    """The marker the stored file carries, so identical pixels give identical bytes (older runs carry none)."""
    return provenance_of(record) if read_provenance(io.BytesIO(stored)) is not None else None


def _find_record(out: Store, image_id: str) -> dict:
    """The image's metadata row: metadata.parquet once the run is complete, else the journal."""
    if out.sizes([METADATA])[0] is not None:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        with out.open_input(METADATA) as handle:
            rows = pq.read_table(handle)
        rows = rows.filter(pc.equal(rows.column("image_id"), image_id)).to_pylist()
        hint = f"the ids are in the image_id column of {out.where(METADATA)}"
    else:
        found = read_records(out).get(image_id)
        rows = [found] if found else []
        hint = (f"the run is unfinished, so only images already made can be remade; `{resume_command(out)}` "
                "finishes it, and its metadata.parquet lists every id in the image_id column")
    if not rows:
        raise InputError(f"image id {image_id!r} is not in the run {out}; {hint}")
    return rows[0]


def _work_item(record: dict) -> WorkItem:
    return WorkItem(index=-1,  # its place in the plan: the engine never reads it
                    image_id=record["image_id"], file_name=record["file_name"], row=int(record["manifest_row"]),
                    row_id=record["row_id"], sample_index=int(record["sample_index"]), seed=int(record["seed"]),
                    prompt=record["prompt"], negative_prompt=record["negative_prompt"],
                    guidance_scale=float(record["guidance_scale"]))


def _check_output(out: Store, output: str | Path | None, image_format: str) -> Path | None:
    """Refuse, before loading anything, a target that would be mistaken for run data or has the wrong suffix."""
    if output is None:
        return None
    output = Path(output)
    if output.suffix.lower() not in _SUFFIXES[image_format]:
        raise InputError(f"--out {output}: the run stores {image_format} images, so the copy is one too; "
                         f"name it *{_SUFFIXES[image_format][0]}")
    if output.is_dir():
        raise InputError(f"--out {output} is a folder; give a file name such as {output / ('copy' + output.suffix)}")
    if is_url(str(output)):
        raise InputError(f"--out {output}: the copy is written to a local file; give a local path")
    parent = output.resolve().parent
    for folder in (out.local / "images", out.local / STATE_DIR) if out.local is not None else ():
        if parent == folder.resolve() or folder.resolve() in parent.parents:
            # cxrgen status would report the copy as an orphan (or it would replace the image itself)
            raise InputError(f"--out {output} is inside the run's {folder.name}/ folder; write it outside {out}")
    return output


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("L"), dtype=np.int16)
