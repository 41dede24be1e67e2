"""cxrgen reproduce: one image remade alone from its metadata row, compared with the stored file.

Measured on the tiny bundle (CPU, float32, one thread): every image, whether made alone or inside a
batch of 4, came back pixel-identical and, PNG or JPEG, byte-identical. The batched case is asserted
with the documented bound (1 gray level), because batched float kernels may round differently on
other CPUs; an image made alone is the same computation and must match exactly.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import tiny
from helpers import bucket_objects, upload_run
from typer.testing import CliRunner

from cxrgen.cli import app
from cxrgen.config import RunConfig
from cxrgen.errors import InputError
from cxrgen.model import demo
from cxrgen.runs.generate import generate
from cxrgen.runs.reproduce import reproduce_image

MANIFEST = "id,prompt,label\na,Big right-sided pleural effusion,1\nb,Normal chest radiograph.,0\n"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def make_run(tmp_path_factory, bundle_dir, text_encoder_dir):
    """A finished tiny run (2 rows x 2 images) in a fresh folder, with the given batch size and format."""
    def make(batch_size: int, image_format: str) -> Path:
        root = tmp_path_factory.mktemp(f"{image_format}{batch_size}")
        (root / "m.csv").write_text(MANIFEST)
        config = RunConfig(manifest=str(root / "m.csv"), out=str(root / "out"), model=str(bundle_dir),
                           text_encoder=str(text_encoder_dir), steps=2, num_images=2, batch_size=batch_size,
                           image_format=image_format, device="cpu", quiet=True)
        assert generate(config).metadata is not None
        return root / "out"
    return make


@pytest.fixture(scope="module")
def png_alone(make_run) -> Path:
    return make_run(1, "png")


@pytest.fixture(scope="module")
def png_batched(make_run) -> Path:
    return make_run(4, "png")


@pytest.fixture(scope="module")
def jpg_alone(make_run) -> Path:
    return make_run(1, "jpg")


def test_an_image_made_alone_comes_back_identical(png_alone, tmp_path):
    result = reproduce_image(png_alone, "b_0001", output=tmp_path / "copy.png")
    assert (result.max_abs_diff, result.mean_abs_diff, result.identical_fraction) == (0, 0.0, 1.0)
    assert result.same_bytes and result.device == "cpu" and result.dtype == "float32"
    assert (tmp_path / "copy.png").read_bytes() == result.stored.read_bytes()


def test_an_image_made_inside_a_batch_of_four_comes_back_within_one_gray_level(png_batched):
    # b_0000 was the third of four images in the run's only UNet batch
    assert pq.read_table(png_batched / "metadata.parquet").column("image_id").to_pylist()[2] == "b_0000"
    result = reproduce_image(png_batched, "b_0000")
    assert result.max_abs_diff <= 1 and result.identical_fraction >= 0.99, result


def test_an_unfinished_run_is_read_from_its_journal(png_alone, tmp_path):
    unfinished = tmp_path / "out"
    shutil.copytree(png_alone, unfinished)
    (unfinished / "metadata.parquet").unlink()
    assert reproduce_image(unfinished, "a_0000").same_bytes
    with pytest.raises(InputError, match="'c_0000' is not in the run .* unfinished"):
        reproduce_image(unfinished, "c_0000")


def test_other_weights_are_refused(png_alone, tmp_path):
    bundle = demo.build_bundle(tmp_path / "other_bundle", seed=7)
    with pytest.raises(InputError, match="checkpoints in .* are not the ones this run used"):
        reproduce_image(png_alone, "a_0000", model=str(bundle))
    text_encoder = demo.build_text_encoder(tmp_path / "other_text", seed=7)
    with pytest.raises(InputError, match="text encoder .* is not the one this run used"):
        reproduce_image(png_alone, "a_0000", text_encoder=str(text_encoder))


def test_cli_reproduces_a_jpeg_and_writes_it(jpg_alone, tmp_path):
    copy = tmp_path / "remade" / "a_0001.jpg"
    result = CliRunner().invoke(app, ["reproduce", str(jpg_alone), "a_0001", "--out", str(copy)])
    assert result.exit_code == 0, result.output
    stored = pq.read_table(jpg_alone / "metadata.parquet").to_pandas().set_index("image_id").file_name["a_0001"]
    # identical pixels encode to identical JPEG bytes
    assert copy.read_bytes() == (jpg_alone / stored).read_bytes()


@pytest.mark.parametrize("image_id, extra, words", [
    ("c_0000", [], ["'c_0000'", "image_id", "metadata.parquet"]),
    ("a_0000", ["--out", "copy.png"], ["copy.png", "jpg"]),
    ("a_0000", ["--out", "{out}/images/copy.jpg"], ["inside the run's images/"]),
])
def test_cli_bad_input_exits_2_with_one_line(jpg_alone, tmp_path, image_id, extra, words):
    extra = [e.format(out=jpg_alone) for e in extra]
    result = CliRunner().invoke(app, ["reproduce", str(jpg_alone), image_id, *extra])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cxrgen: error: "), result.stderr
    assert all(word in lines[0] for word in words), lines[0]
    assert not (jpg_alone / "images" / "copy.jpg").exists()


def test_an_image_of_a_run_in_a_bucket_is_remade_and_compared(png_alone, s3, tmp_path):
    url = upload_run(png_alone, s3)
    image_id = pq.read_table(png_alone / "metadata.parquet").column("image_id").to_pylist()[1]
    result = reproduce_image(url, image_id, output=tmp_path / "copy.png")
    assert result.same_bytes and result.max_abs_diff == 0 and result.stored.startswith(f"{url}/images/")
    assert (tmp_path / "copy.png").read_bytes() == bucket_objects(s3, url)[result.stored[len(url) + 1:]]
    with pytest.raises(InputError, match="image id 'nope' is not in the run s3://"):
        reproduce_image(url, "nope")
