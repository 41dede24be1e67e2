"""Every speed option makes the same images as the plain path (within 1 gray level, float32, CPU).

Options: channels_last, decoding in sub-batches, other batch sizes, background writing, and
torch.compile (opt-in on CPU, see below). The 16-bit paths are checked on CUDA only.
"""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from cxrgen.config import RunConfig
from cxrgen.manifests.workitems import WorkItem, load_plan
from cxrgen.model.bundle import load_bundle, read_spec
from cxrgen.model.engine import Engine, EngineOptions
from cxrgen.provenance import encode_image
from cxrgen.runs.generate import generate
from cxrgen.runs.loop import batches_of

STEPS = 3
PROMPTS = ["Small left pleural effusion.", "Right lower lobe consolidation.", "Mild cardiomegaly.",
           "Moderate pulmonary edema!", "No acute cardiopulmonary process."]
CUDA = torch.cuda.is_available()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def items():
    return [WorkItem(index=i, image_id=f"img{i}", file_name=f"images/img{i}.png", row=i + 1, row_id=None,
                     sample_index=0, seed=1000 + i, prompt=p, negative_prompt="", guidance_scale=7.0 - i)
            for i, p in enumerate(PROMPTS)]


def make_engine(bundle_dir, text, device="cpu", **options):
    # A fresh bundle per engine: Engine moves and re-lays out the networks in place.
    options = {"dtype": "float32", "scheduler": "ddim", "steps": STEPS, **options}
    return Engine(load_bundle(read_spec(bundle_dir)), text, EngineOptions(device=torch.device(device), **options))


def run_in_batches(engine, items, batch_size):
    return torch.cat([engine.run_batch(batch) for batch in batches_of(items, batch_size)])


def assert_within_one_gray_level(a: torch.Tensor, b: torch.Tensor):
    assert a.dtype == b.dtype == torch.uint8 and a.shape == b.shape
    diff = (a.int() - b.int()).abs()
    assert diff.max() <= 1, f"{int((diff > 1).sum())} pixel(s) differ by more than 1 (max {int(diff.max())})"


@pytest.fixture(scope="module")
def plain(bundle_dir, text, items):
    """The plain path: float32, whole batch, no options."""
    images = make_engine(bundle_dir, text).run_batch(items)
    assert images.shape == (len(items), 32, 32) and images.dtype == torch.uint8
    assert images.float().std() > 1  # not a flat image: the comparison means something
    return images


def test_channels_last_gives_the_same_images(bundle_dir, text, items, plain):
    assert_within_one_gray_level(make_engine(bundle_dir, text, channels_last=True).run_batch(items), plain)


@pytest.mark.parametrize("decode_batch_size", [1, 2, len(PROMPTS)])
def test_decoding_in_sub_batches_gives_the_same_images(bundle_dir, text, items, plain, decode_batch_size):
    # The plain path decodes one latent at a time on CPU (engine.default_decode_batch_size); the
    # whole batch at once and sub-batches of 2 must give the same pixels.
    engine = make_engine(bundle_dir, text, decode_batch_size=decode_batch_size)
    assert_within_one_gray_level(engine.run_batch(items), plain)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_other_batch_sizes_give_the_same_images(bundle_dir, text, items, plain, batch_size):
    assert_within_one_gray_level(run_in_batches(make_engine(bundle_dir, text), items, batch_size), plain)


def test_dpmpp2m_images_do_not_depend_on_the_batch_size(bundle_dir, text, items):
    engine = make_engine(bundle_dir, text, scheduler="dpmpp2m")
    assert_within_one_gray_level(run_in_batches(engine, items, 2), engine.run_batch(items))


@pytest.mark.parametrize("image_format", ["png", "jpg"])
def test_background_writing_matches_direct_encoding(tmp_path, bundle_dir, text_encoder_dir, text, image_format):
    """generate() encodes and writes on worker threads while the next batch samples; the files must
    hold exactly what encoding the engine's pixels directly gives."""
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("prompt\n" + "\n".join(f'"{p}"' for p in PROMPTS) + "\n", encoding="utf-8")
    config = RunConfig(manifest=str(manifest), out=str(tmp_path / "out"), model=str(bundle_dir),
                       text_encoder=str(text_encoder_dir), steps=STEPS, batch_size=2, device="cpu",
                       dtype="float32", image_format=image_format, quiet=True)
    result = generate(config, log=lambda message: None)
    assert result.written == len(PROMPTS)

    plan = load_plan(config)[1]
    engine = make_engine(bundle_dir, text)
    direct = run_in_batches(engine, plan, 2)  # the same batches the run used
    for item, pixels in zip(plan, direct):
        written = (tmp_path / "out" / item.file_name).read_bytes()
        expected = encode_image(pixels.numpy(), image_format, config.jpeg_quality)
        got = np.asarray(Image.open(io.BytesIO(written)))
        want = np.asarray(Image.open(io.BytesIO(expected)))
        assert got.shape == want.shape == tuple(pixels.shape) and got.dtype == np.uint8
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, item.file_name
        if image_format == "png":
            assert np.abs(got.astype(int) - pixels.numpy().astype(int)).max() <= 1


# torch.compile on CPU works with this torch (inductor builds C++ with the machine's compiler). It is
# the slowest test (1.5-4 minutes on 2 shared cores) but CI has the time, so it always runs.
def test_compile_gives_the_same_images(bundle_dir, text, items, plain):
    from torch._dynamo.utils import counters

    engine = make_engine(bundle_dir, text, compile=True)
    assert_within_one_gray_level(engine.run_batch(items), plain)
    # the last, partial batch is padded to the compiled size: it runs the compiled graph, no new compilation
    graphs = counters["stats"]["unique_graphs"]
    assert_within_one_gray_level(engine.run_batch(items[:3]), plain[:3])
    assert counters["stats"]["unique_graphs"] == graphs


# ------------------------------------------------------------------------------------ CUDA only

def needs_cuda(test):
    """CUDA-only: marked `cuda` (benchmarks/gpu_check.py runs `pytest -m cuda`), skipped without a GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not CUDA, reason="16-bit autocast paths are checked on CUDA only "
                                                                "(no GPU here)")(test))


@pytest.fixture(scope="module")
def plain_cuda(bundle_dir, text, items):
    if not CUDA:
        pytest.skip("no CUDA device")
    return make_engine(bundle_dir, text, device="cuda").run_batch(items)


@needs_cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_autocast_stays_close_to_float32_on_cuda(bundle_dir, text, items, plain_cuda, dtype):
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    images = make_engine(bundle_dir, text, device="cuda", dtype=dtype).run_batch(items)
    assert images.shape == plain_cuda.shape and images.dtype == torch.uint8
    diff = (images.int() - plain_cuda.int()).abs().float()
    # 16-bit UNet arithmetic moves pixels a little; the scheduler and the decoder stay in float32.
    assert diff.mean() <= 2.0, f"mean difference {diff.mean():.2f} gray levels"


@needs_cuda
def test_cuda_float32_matches_cpu_float32(bundle_dir, text, items, plain, plain_cuda):
    diff = (plain_cuda.int() - plain.int()).abs().float()
    assert diff.mean() <= 1.0


@needs_cuda
@pytest.mark.parametrize("options", [{"channels_last": True}, {"decode_batch_size": 2}])
def test_speed_options_on_cuda_float32(bundle_dir, text, items, plain_cuda, options):
    assert_within_one_gray_level(make_engine(bundle_dir, text, device="cuda", **options).run_batch(items),
                                 plain_cuda)
