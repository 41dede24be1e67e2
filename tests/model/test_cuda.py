"""The GPU paths of issue 18 on a real GPU; every test here is marked `cuda` and skips cleanly without one.

benchmarks/gpu_check.py runs them (`pytest -m cuda`) as part of the prepared GPU check. The same logic is
tested on the CPU in test_devices.py and test_precision.py (and tests/runs/test_workers.py).
"""
from __future__ import annotations

import functools
import json

import pandas as pd
import pytest
import tiny
import torch

from cxrgen.config import RunConfig
from cxrgen.manifests.workitems import WorkItem
from cxrgen.model.bundle import load_bundle, read_spec
from cxrgen.model.engine import Engine, EngineOptions
from cxrgen.model.text_encoder import load_text_encoder
from cxrgen.runs.generate import generate

CUDA = torch.cuda.is_available()
GPUS = torch.cuda.device_count() if CUDA else 0
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (none here)")]
PROMPTS = ["Small left pleural effusion.", "Right lower lobe consolidation.", "Mild cardiomegaly.",
           "Moderate pulmonary edema!"]


@pytest.fixture(scope="module")
def items():
    return [WorkItem(index=i, image_id=f"img{i}", file_name=f"images/img{i}.png", row=i + 1, row_id=None,
                     sample_index=0, seed=900 + i, prompt=p, negative_prompt="", guidance_scale=7.0)
            for i, p in enumerate(PROMPTS)]


def make_engine(bundle_dir, text_encoder_dir, device, **options):
    text = load_text_encoder(str(text_encoder_dir), device)
    options = {"dtype": "float32", "scheduler": "ddim", "steps": 3, **options}
    return Engine(load_bundle(read_spec(bundle_dir)), text, EngineOptions(device=torch.device(device), **options))


def test_an_engine_makes_its_gpu_current_and_keeps_everything_there(bundle_dir, text_encoder_dir, items):
    last = f"cuda:{GPUS - 1}"
    engine = make_engine(bundle_dir, text_encoder_dir, last)
    assert torch.cuda.current_device() == GPUS - 1
    assert {str(p.device) for p in engine.unet.parameters()} == {last}
    assert engine.run_batch(items).shape == (len(items), 32, 32)


def test_float32_on_cuda_is_ieee_float32_and_matches_the_cpu(bundle_dir, text_encoder_dir, items):
    gpu = make_engine(bundle_dir, text_encoder_dir, "cuda:0")
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    on_gpu = gpu.run_batch(items)
    on_cpu = make_engine(bundle_dir, text_encoder_dir, "cpu").run_batch(items)
    diff = (on_gpu.int() - on_cpu.int()).abs()
    assert (diff <= 1).float().mean() >= 0.999, f"max {int(diff.max())}, mean {float(diff.float().mean()):.3f}"


def test_batched_prompt_encoding_on_cuda_equals_one_prompt_at_a_time(text_encoder_dir):
    one, many = (load_text_encoder(str(text_encoder_dir), "cuda:0") for _ in range(2))
    prompts = PROMPTS + [""]
    batched = many.encode(prompts, torch.device("cuda:0"), batched=True)
    single = one.encode(prompts, torch.device("cuda:0"))
    assert batched.device.type == "cuda" and torch.allclose(batched, single, rtol=1e-4, atol=1e-5)


def test_float16_images_are_finite_and_the_attention_scale_is_folded(bundle_dir, text_encoder_dir, items):
    engine = make_engine(bundle_dir, text_encoder_dir, "cuda:0", dtype="float16")
    assert {m.scale for m in engine.unet.modules() if hasattr(m, "to_q") and hasattr(m, "scale")} == {1.0}
    images = engine.run_batch(items)  # a NaN would raise RunError instead of becoming black pixels
    assert images.float().std() > 1


def test_auto_batch_size_fills_the_gpu_then_calibrates(bundle_dir, text_encoder_dir, items):
    engine = make_engine(bundle_dir, text_encoder_dir, "cuda:0", dtype="bfloat16")
    estimated = engine.batch_size
    assert estimated >= 1 and engine._budget > torch.cuda.memory_allocated(0)
    engine.run_batch(items)
    assert engine.batch_size >= estimated  # the measured peak of the tiny model only ever allows more


@pytest.mark.skipif(GPUS < 2, reason="needs two GPUs")
def test_two_local_workers_sample_on_two_gpus(bundle_dir, text_encoder_dir, tmp_path):
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"prompt": PROMPTS}).to_csv(manifest, index=False)
    config = RunConfig(manifest=str(manifest), out=str(tmp_path / "out"), model=str(bundle_dir),
                       text_encoder=str(text_encoder_dir), steps=2, device="cuda", image_format="png", quiet=True)
    generate(config, engine_hook=functools.partial(tiny.record_device, folder=str(tmp_path)))
    placed = {name: json.loads((tmp_path / name).read_text()) for name in (f"w{i}" for i in range(GPUS))}
    for i, (name, where) in enumerate(sorted(placed.items())):
        assert where == {"device": f"cuda:{i}", "weights": f"cuda:{i}", "current": i}, (name, where)
