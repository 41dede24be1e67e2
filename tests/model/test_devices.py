"""GPU memory logic, checked on the CPU: the out-of-memory back-off (injected errors), batch sizing from
measured peaks, and the padding that keeps --compile's shapes static (issue 18, items 1, 6, 7 and 10)."""
from __future__ import annotations

import weakref

import pytest
import torch

from cxrgen.errors import RunError
from cxrgen.manifests.workitems import WorkItem
from cxrgen.model.bundle import load_bundle, read_spec
from cxrgen.model.devices import (
    GIB,
    MAX_AUTO_BATCH,
    MIB,
    RESERVE_BYTES,
    auto_batch_size,
    calibrated_batch_size,
    is_out_of_memory,
)
from cxrgen.model.engine import Engine, EngineOptions

STEPS = 2
PROMPTS = ["Small left pleural effusion.", "Right lower lobe consolidation.", "Mild cardiomegaly.",
           "Moderate pulmonary edema!", "No acute cardiopulmonary process.", "Left apical pneumothorax.",
           "Bibasilar atelectasis.", "Hyperinflated lungs."]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def items():
    return [WorkItem(index=i, image_id=f"img{i}", file_name=f"images/img{i}.png", row=i + 1, row_id=None,
                     sample_index=0, seed=500 + i, prompt=p, negative_prompt="", guidance_scale=6.0)
            for i, p in enumerate(PROMPTS)]


def make_engine(bundle_dir, text, **options):
    options = {"dtype": "float32", "scheduler": "ddim", "steps": STEPS, **options}
    return Engine(load_bundle(read_spec(bundle_dir)), text, EngineOptions(device=torch.device("cpu"), **options))


@pytest.fixture(scope="module")
def plain(bundle_dir, text, items):
    return make_engine(bundle_dir, text).run_batch(items)


def assert_within_one_gray_level(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype == torch.uint8
    assert (a.int() - b.int()).abs().max() <= 1


class OutOfMemoryAbove:
    """Wraps engine.denoise: a call with more than `fits` images raises `error` after allocating what a real
    attempt would hold (its activations); every tensor of a failed attempt is watched through a weakref, and
    each later call records whether any of them is still alive."""

    def __init__(self, engine, fits: int, error=torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")):
        self.original, self.fits, self.error = engine.denoise, fits, error
        self.watched: list[weakref.ref] = []
        self.alive_at_retry: list[int] = []
        self.sizes: list[int] = []
        engine.denoise = self

    def __call__(self, x, timesteps, context):
        self.alive_at_retry.append(sum(ref() is not None for ref in self.watched))
        images = x.shape[0] // 2
        self.sizes.append(images)
        if images > self.fits:
            activations = torch.empty(images, 64, 1024)  # what the failed UNet call had allocated
            self.watched += [weakref.ref(t) for t in (x, context, activations)]
            raise type(self.error)(*self.error.args)  # a new one each time, as torch raises them
        return self.original(x, timesteps, context)


def test_out_of_memory_frees_the_failed_attempt_and_settles_at_the_largest_batch_that_fits(
        bundle_dir, text, items, plain):
    engine = make_engine(bundle_dir, text)
    fake = OutOfMemoryAbove(engine, fits=3)
    images = engine.run_batch(items)
    # no tensor of a failed attempt was alive when the next attempt started
    assert fake.watched and set(fake.alive_at_retry) == {0}, fake.alive_at_retry
    # 8 fails, 4 fails, 2 runs, 3 (between 2 and 4) runs: then 3 at a time
    assert fake.sizes[0] == 8 and engine.fail == 4 and engine.fit == 3 and engine.batch_size == 3
    ran = [n for n in fake.sizes if n <= 3]
    assert sum(ran) == len(items) * STEPS and max(ran) == 3
    # the next batch goes straight to 3 images per call: no more failures
    fake.sizes.clear()
    engine.run_batch(items[:6])
    assert fake.sizes == [3] * (2 * STEPS)
    assert_within_one_gray_level(images, plain)


def test_cudnn_and_cublas_allocation_failures_back_off_too(bundle_dir, text, items, plain):
    # cuDNN/cuBLAS report a failed workspace allocation as a plain RuntimeError
    engine = make_engine(bundle_dir, text)
    OutOfMemoryAbove(engine, fits=4, error=RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert_within_one_gray_level(engine.run_batch(items), plain)
    assert engine.fit == 4


def test_other_runtime_errors_are_not_mistaken_for_out_of_memory(bundle_dir, text, items):
    engine = make_engine(bundle_dir, text)
    fake = OutOfMemoryAbove(engine, fits=0, error=RuntimeError("CUDA error: an illegal memory access"))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        engine.run_batch(items)
    assert fake.sizes == [8] and engine.fail == 0  # no retry


def test_out_of_memory_for_one_image_is_one_run_error(bundle_dir, text, items):
    engine = make_engine(bundle_dir, text)
    OutOfMemoryAbove(engine, fits=0)
    with pytest.raises(RunError, match="even for one image"):
        engine.run_batch(items[:2])


def test_is_out_of_memory():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_out_of_memory(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_with_compile_the_back_off_only_halves(bundle_dir, text, items):
    engine = make_engine(bundle_dir, text)
    engine.static_shapes = True  # what --compile sets; the UNet stays eager here (compiling takes minutes)
    fake = OutOfMemoryAbove(engine, fits=3)
    engine.run_batch(items)
    # 8 fails, 4 fails, then 2 for good: 3 would be one more compilation for one image more per call
    assert engine.batch_size == 2 and engine.compiled_batch == 2
    assert [n for n in fake.sizes if n <= 3] == [2] * (4 * STEPS)


def test_padding_to_the_compiled_size_keeps_the_real_images(bundle_dir, text, items, plain):
    """The last partial batch is padded with copies of a real item to the compiled size, and the padding's
    outputs dropped: the real images are unchanged (bit for bit on the CPU in float32)."""
    engine = make_engine(bundle_dir, text)
    engine.static_shapes = True
    first = engine.run_batch(items[:5])
    assert engine.compiled_batch == 5 and engine.rows_run == 5
    last = engine.run_batch(items[5:])  # 3 real items padded to 5
    assert engine.rows_run == 5 and last.shape[0] == 3
    unpadded = make_engine(bundle_dir, text).run_batch(items[5:])
    assert torch.equal(last, unpadded)
    assert_within_one_gray_level(torch.cat([first, last]), plain)


# ------------------------------------------------------------------ batch sizing arithmetic (item 6)

def test_auto_batch_size_follows_the_measured_peaks():
    free = 3 * GIB
    bf16, fp32 = auto_batch_size(free, "bfloat16"), auto_batch_size(free, "float32")
    # 16-bit rows take half the memory of float32 rows (30 vs 61 MiB per row, two rows per image)
    assert abs(bf16 - 2 * fp32) <= 2
    for n, dtype, row in ((bf16, "bfloat16", 30 * MIB), (fp32, "float32", 61 * MIB)):
        # the estimate uses the free memory minus the headroom, and one image more would not fit
        assert n * 2 * row <= 0.9 * free - RESERVE_BYTES < (n + 1) * 2 * row
    # a latent of half the side holds a quarter of the activations
    assert auto_batch_size(free, "bfloat16", (3, 32, 32)) in range(4 * bf16 - 3, 4 * bf16 + 4)
    assert auto_batch_size(0, "bfloat16") == 1
    assert auto_batch_size(200 * GIB, "bfloat16") == MAX_AUTO_BATCH
    # a 24 GB card with the weights loaded (~21 GiB free): the old 0.45 GiB-per-image rule gave 33
    assert auto_batch_size(21 * GIB, "bfloat16") >= 3 * 33


def test_calibration_from_the_first_batch_peak():
    start, budget = 2 * GIB, 32 * GIB
    # 16 images added 8 GiB at peak: 0.5 GiB each, and 30 GiB of budget above the start hold 60
    assert calibrated_batch_size(16, 16, start, start + 8 * GIB, budget) == 60
    # a batch that used more than estimated never shrinks the size (out-of-memory handling does that)
    assert calibrated_batch_size(16, 16, start, start + 40 * GIB, budget) == 16
    assert calibrated_batch_size(16, 16, start, start + 1 * MIB, budget) == MAX_AUTO_BATCH
