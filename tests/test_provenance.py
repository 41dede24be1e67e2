"""Issue 10: every JPEG and PNG carries its synthetic-image marker, readable with Pillow alone, equal to its
metadata row and run.json, and the marker never changes a pixel."""
from __future__ import annotations

import io
import json
import struct

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import make_small_run as make_run
from PIL import Image

from cxrgen.provenance import (
    PNG_KEY,
    ROW_FIELDS,
    encode_image,
    encode_provenance,
    provenance_of,
    read_provenance,
)


@pytest.fixture(scope="module", params=["jpg", "png"])
def run(request, tmp_path_factory, bundle_dir, text_encoder_dir, one_torch_thread):
    return make_run(tmp_path_factory.mktemp(request.param), bundle_dir, text_encoder_dir, request.param)


def test_every_file_carries_its_marker_equal_to_metadata_and_run_json(run):
    saved = json.loads((run / "run.json").read_text(encoding="utf-8"))
    rows = pq.read_table(run / "metadata.parquet").to_pylist()
    assert len(rows) == 5
    for row in rows:
        with Image.open(run / row["file_name"]) as image:  # Pillow alone, as docs/generating.md says
            raw = image.info["comment"] if image.format == "JPEG" else image.info[PNG_KEY]
        marker = json.loads(raw)
        assert marker == read_provenance(run / row["file_name"]) == provenance_of(row)
        assert list(marker) == ["synthetic", "notice", "generator", "generator_version", *ROW_FIELDS]
        assert marker["synthetic"] is True and marker["generator"] == "cxrgen"
        assert marker["generator_version"] == saved["cxrgen_version"]
        assert {marker["autoencoder_md5"], marker["diffusion_model_md5"]} == set(saved["settings"]["checkpoint_md5"].values())
        assert (marker["steps"], marker["scheduler"]) == (saved["config"]["steps"], saved["config"]["scheduler"])
        assert (marker["model_name"], marker["model_version"]) == (saved["resolved"]["model_name"],
                                                                   saved["resolved"]["model_version"])
        for name in ("image_id", "seed", "prompt", "negative_prompt", "guidance_scale"):
            assert marker[name] == row[name], name
    assert any("<script>" in json.loads(encode_provenance(provenance_of(r)))["prompt"] for r in rows)


def _without_marker(data: bytes) -> bytes:
    """The file's bytes with the JPEG COM segment or the PNG iTXt chunk cut out."""
    if data[:2] == b"\xff\xd8":
        at = data.index(b"\xff\xfe")
        return data[:at] + data[at + 2 + struct.unpack(">H", data[at + 2:at + 4])[0]:]
    at = data.index(b"iTXt") - 4
    return data[:at] + data[at + 12 + struct.unpack(">I", data[at:at + 4])[0]:]


@pytest.mark.parametrize("image_format", ["jpg", "png"])
def test_the_marker_adds_bytes_but_never_changes_pixels(image_format):
    pixels = np.random.default_rng(0).integers(0, 256, (64, 48), dtype=np.uint8)
    row = {"cxrgen_version": "0.1.0", "image_id": "a_0000", "seed": 1, "prompt": "Pleural effusion. \u00e9\u4e2d",
           "negative_prompt": "", "guidance_scale": 7.0, "steps": 50, "scheduler": "ddim", "model_name": "m",
           "model_version": "1", "autoencoder_md5": "x", "diffusion_model_md5": "y"}
    marked = encode_image(pixels, image_format, 95, provenance_of(row))
    bare = encode_image(pixels, image_format, 95)
    assert _without_marker(marked) == bare  # the encoded image itself is byte for byte the same
    decoded = [np.asarray(Image.open(io.BytesIO(d))) for d in (marked, bare)]
    assert np.array_equal(decoded[0], decoded[1])
    assert encode_image(pixels, image_format, 95, provenance_of(row)) == marked  # deterministic
    assert Image.open(io.BytesIO(bare)).info.get("comment") is None


def test_a_prompt_too_long_for_a_jpeg_comment_is_cut_to_fit():
    row = {"cxrgen_version": "0.1.0", "image_id": "a_0000", "seed": 1, "prompt": "\u4e2d" * 40_000,
           "negative_prompt": "n" * 30_000, "guidance_scale": 7.0, "steps": 50, "scheduler": "ddim",
           "model_name": "m", "model_version": "1", "autoencoder_md5": "x", "diffusion_model_md5": "y"}
    data = encode_image(np.zeros((8, 8), np.uint8), "jpg", 95, provenance_of(row))
    marker = json.loads(Image.open(io.BytesIO(data)).info["comment"])
    assert marker["prompt_cut"] is True and marker["image_id"] == "a_0000"
    assert row["prompt"].startswith(marker["prompt"]) and row["negative_prompt"].startswith(marker["negative_prompt"])


def _row(prompt: str, negative_prompt: str = "") -> dict:
    return {"cxrgen_version": "0.1.0", "image_id": "a_0000", "seed": 1, "prompt": prompt,
            "negative_prompt": negative_prompt, "guidance_scale": 7.0, "steps": 50, "scheduler": "ddim",
            "model_name": "m", "model_version": "1", "autoencoder_md5": "x", "diffusion_model_md5": "y"}


@pytest.mark.parametrize("prompt, negative", [("\u00e9" * 70_000, ""), ("\u00e9" * 70_000, "\u00e9" * 70_000),
                                              ("\U0001F600" * 20_000, "no"), ("a" * 70_000, "\u00e9" * 50)])
def test_non_ascii_prompts_are_cut_to_fit_not_to_nothing(prompt, negative):
    # issue 19, item 11: the excess was measured in escaped bytes but removed in characters
    text = encode_provenance(provenance_of(_row(prompt, negative)))
    marker = json.loads(text)
    assert len(text) <= 65533 and text.isascii() and marker["prompt_cut"] is True
    assert prompt.startswith(marker["prompt"]) and negative.startswith(marker["negative_prompt"])
    assert len(marker["prompt"]) > 1000  # cut to fit: most of the 64 KB segment still holds the prompt
    assert len(text) > 65533 - 12  # and no shorter than it must be: one more character would not fit
    if len(negative) > 1000:  # both long: both keep a fair share, neither is emptied for the other
        assert len(marker["negative_prompt"]) > 1000
    else:  # a short one is kept whole
        assert marker["negative_prompt"] == negative
    data = encode_image(np.zeros((8, 8), np.uint8), "jpg", 95, provenance_of(_row(prompt, negative)))
    assert read_provenance(io.BytesIO(data))["prompt"] == marker["prompt"]
