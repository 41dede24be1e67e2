"""What --dtype means, checked on the CPU (issue 18, items 3, 4, 8 and 9): the dtype picked by compute capability,
float32 without TF32, float16 attention that cannot overflow, the NaN guard, batched prompt encoding, and a
16-bit GPU run resumed on the CPU."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from monai.networks.blocks.selfattention import SABlock

from cxrgen.config import RunConfig
from cxrgen.errors import RunError
from cxrgen.manifests.workitems import WorkItem, load_plan
from cxrgen.model.bundle import load_bundle, read_spec
from cxrgen.model.engine import Engine, EngineOptions
from cxrgen.model.precision import (
    fold_attention_scale,
    resolve_dtype,
    run_dtypes,
    set_precision,
)
from cxrgen.model.text_encoder import load_text_encoder
from cxrgen.runs.generate import generate, resume

PROMPTS = ["Small left pleural effusion.", "Right lower lobe consolidation.", "Mild cardiomegaly.",
           "Moderate pulmonary edema!", "Small left pleural effusion."]
CPU, CUDA0, CUDA1 = torch.device("cpu"), torch.device("cuda:0"), torch.device("cuda:1")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def items():
    return [WorkItem(index=i, image_id=f"img{i}", file_name=f"images/img{i}.png", row=i + 1, row_id=None,
                     sample_index=0, seed=70 + i, prompt=p, negative_prompt="" if i % 2 else "blurry",
                     guidance_scale=5.0) for i, p in enumerate(PROMPTS)]


def make_engine(bundle_dir, text_encoder_dir, text=None, **options):
    text = text or load_text_encoder(str(text_encoder_dir), "cpu")
    options = {"dtype": "float32", "scheduler": "ddim", "steps": 2, **options}
    return Engine(load_bundle(read_spec(bundle_dir)), text, EngineOptions(device=CPU, **options))


@pytest.fixture()
def restore_backend_flags():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


# ------------------------------------------------------------------ item 4: auto dtype by compute capability

@pytest.fixture()
def volta_and_ampere(monkeypatch):
    """GPU 0 a V100 (7.0), GPU 1 an A100 (8.0); torch.cuda.is_bf16_supported says yes (it counts emulation)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: {0: (7, 0), 1: (8, 0)}[index])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)


def test_auto_picks_bfloat16_only_on_gpus_that_have_it_in_hardware(volta_and_ampere):
    assert resolve_dtype("auto", CUDA0) == "float16"  # emulated bfloat16 would be several times slower
    assert resolve_dtype("auto", CUDA1) == "bfloat16"
    assert resolve_dtype("auto", torch.device("cuda")) == "bfloat16"  # a bare cuda: the current device (1)
    assert resolve_dtype("auto", [CUDA1, CUDA0]) == "float16"  # one dtype for a run: what every GPU has
    assert resolve_dtype("auto", CPU) == "float32"
    assert resolve_dtype("bfloat16", CUDA0) == "bfloat16"  # asked for: allowed (emulated)
    assert resolve_dtype("auto", CUDA0, recorded="bfloat16") == "bfloat16"  # a resume keeps the run's dtype


def test_a_16_bit_gpu_run_resumed_on_the_cpu_samples_in_float32():
    assert run_dtypes("auto", [CPU], "bfloat16", ["cuda:0"]) == ("bfloat16", "float32")
    assert run_dtypes("auto", [CPU], "float16", ["cuda:1", "cuda:0"]) == ("float16", "float32")
    assert run_dtypes("auto", [CPU], "bfloat16", ["cpu"]) == ("bfloat16", "bfloat16")  # made on a CPU: kept
    assert run_dtypes("bfloat16", [CPU], "bfloat16", ["cuda:0"]) == ("bfloat16", "bfloat16")  # asked for
    assert run_dtypes("auto", [CPU], None, []) == ("float32", "float32")  # a new run


def test_resuming_a_gpu_bfloat16_run_on_the_cpu(tmp_path, bundle_dir, text_encoder_dir):
    """The run's dtype stays bfloat16 (a resume is not refused); the images made on the CPU are float32, say so
    in their metadata, and are exactly what a float32 run makes."""
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"prompt": PROMPTS[:4]}).to_csv(manifest, index=False)
    common = dict(manifest=str(manifest), model=str(bundle_dir), text_encoder=str(text_encoder_dir), steps=2,
                  batch_size=2, image_format="png", quiet=True, device="cpu")
    out = tmp_path / "gpu_run"
    calls = []

    def stop_after_one_batch(engine, name):
        original = engine.run_batch

        def run_batch(items, on_step=None):
            calls.append(len(items))
            if len(calls) > 1:
                raise KeyboardInterrupt  # the machine went away after the first batch
            return original(items, on_step)
        engine.run_batch = run_batch
        return engine

    with pytest.raises(KeyboardInterrupt):
        generate(RunConfig(out=str(out), dtype="bfloat16", **common), engine_hook=stop_after_one_batch)
    run_json = json.loads((out / "run.json").read_text())
    run_json["config"]["dtype"], run_json["resolved"]["devices"] = "auto", ["cuda:0"]  # as a GPU writes it
    (out / "run.json").write_text(json.dumps(run_json))

    result = resume(out, quiet=True)
    assert result.complete and result.written == 2
    assert json.loads((out / "run.json").read_text())["settings"]["dtype"] == "bfloat16"
    meta = pd.read_parquet(out / "metadata.parquet")
    assert list(meta.dtype) == ["bfloat16", "bfloat16", "float32", "float32"]
    fp32 = generate(RunConfig(out=str(tmp_path / "fp32"), dtype="float32", **common))
    for name in meta.file_name[2:]:
        assert (out / name).read_bytes() == (fp32.out / name).read_bytes()


# ------------------------------------------------------------------ item 9: float32 means float32

def test_float32_leaves_tf32_off(bundle_dir, text_encoder_dir, restore_backend_flags):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # a process that had them on
    make_engine(bundle_dir, text_encoder_dir, dtype="float32")
    assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
    assert torch.get_float32_matmul_precision() == "highest"


def test_tf32_only_for_16_bit_runs_on_cuda(restore_backend_flags):
    set_precision(torch.device("cuda"), "bfloat16")  # flags only: no GPU needed
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    set_precision(torch.device("cuda"), "float32")
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    set_precision(CPU, "bfloat16")
    assert not torch.backends.cuda.matmul.allow_tf32


# ------------------------------------------------------------------ item 3: float16 attention, NaN guard

def test_folding_the_attention_scale_keeps_the_unet_and_stops_the_float16_overflow(bundle_dir):
    import copy

    torch.manual_seed(0)
    block = SABlock(hidden_size=512, num_heads=1, qkv_bias=True, use_combined_linear=False).eval()
    x = 3 * torch.randn(1, 64, 512)
    folded = copy.deepcopy(block)
    with torch.no_grad():
        assert fold_attention_scale(folded) == 1 and folded.scale == 1.0
        assert torch.allclose(folded(x), block(x), rtol=1e-5, atol=1e-5)  # the same mathematics in float32
        for net in (block, folded):  # activations large enough that q @ k^T, unscaled, exceeds float16's 65504
            net.to_q.weight.mul_(30)
            net.to_k.weight.mul_(30)
        assert (block.to_q(x) @ block.to_k(x).transpose(1, 2)).abs().max() > 65504
        with torch.autocast("cpu", dtype=torch.float16):
            assert not torch.isfinite(block(x)).all()  # inf logits, then NaN from softmax
            assert torch.isfinite(folded(x)).all()
    # the whole UNet: every attention block folded, the float32 output unchanged up to rounding
    bundle = load_bundle(read_spec(bundle_dir))
    x, t, context = torch.randn(2, 3, 8, 8), torch.tensor([500, 500]), torch.randn(2, 77, 32)
    with torch.no_grad():
        before = bundle.unet(x, timesteps=t, context=context)
        assert fold_attention_scale(bundle.unet) == 8
        assert torch.allclose(bundle.unet(x, timesteps=t, context=context), before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype, folded", [("float16", True), ("bfloat16", False), ("float32", False)])
def test_only_float16_engines_fold_the_scale(bundle_dir, text_encoder_dir, dtype, folded):
    engine = make_engine(bundle_dir, text_encoder_dir, dtype=dtype)
    scales = {m.scale for m in engine.unet.modules() if hasattr(m, "scale") and hasattr(m, "to_q")}
    assert (scales == {1.0}) == folded


def test_nan_latents_fail_the_batch_instead_of_writing_black_images(bundle_dir, text_encoder_dir, items):
    engine = make_engine(bundle_dir, text_encoder_dir)
    latents = torch.randn(3, 3, 8, 8)
    latents[1, 0, 2, 2] = float("nan")
    with pytest.raises(RunError, match="img1"):
        engine._decode(latents, items[:3])
    latents[1, 0, 2, 2] = 0.0
    assert engine._decode(latents, items[:3]).shape == (3, 32, 32)  # finite: decoded as before
    # a decoder that itself produces NaN is caught too
    engine.decode = lambda z: torch.full((z.shape[0], 1, 32, 32), float("nan"))
    with pytest.raises(RunError, match="decoded images"):
        engine._decode(latents, items[:3])


def test_a_nan_batch_stops_the_run_and_nothing_of_it_is_written(tmp_path, bundle_dir, text_encoder_dir):
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"prompt": PROMPTS[:4]}).to_csv(manifest, index=False)
    config = RunConfig(manifest=str(manifest), out=str(tmp_path / "out"), model=str(bundle_dir),
                       text_encoder=str(text_encoder_dir), steps=2, batch_size=2, image_format="png", quiet=True)

    def nan_in_the_second_batch(engine, name):
        original, calls = engine.denoise, []

        def denoise(x, timesteps, context):
            calls.append(x.shape[0])
            out = original(x, timesteps, context)
            return out * float("nan") if len(calls) > 2 else out  # the second batch's UNet calls
        engine.denoise = denoise
        return engine

    with pytest.raises(RunError, match="NaN"):
        generate(config, engine_hook=nan_in_the_second_batch)
    plan = load_plan(config)[1]
    files = sorted(str(p.relative_to(config.out)) for p in (Path(config.out) / "images").rglob("*.png"))
    assert files == sorted(i.file_name for i in plan[:2])  # the first batch only
    records = [json.loads(line) for line in next((Path(config.out) / ".cxrgen" / "records").glob("*.jsonl"))
               .read_text().splitlines()]
    assert [r["image_id"] for r in records] == [i.image_id for i in plan[:2]]


# ------------------------------------------------------------------ item 8: one encoder call per batch

class CountCalls:
    def __init__(self, module):
        self.calls, self.rows = 0, []
        module.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.calls += 1
        self.rows.append(args[0].shape[0])


def test_batched_prompt_encoding_equals_one_prompt_at_a_time(text_encoder_dir):
    one, many = (load_text_encoder(str(text_encoder_dir), "cpu") for _ in range(2))
    counted = CountCalls(many.model)
    batched = many.encode(PROMPTS + [""], CPU, batched=True)
    single = one.encode(PROMPTS + [""], CPU)
    assert counted.calls == 1 and counted.rows == [5]  # 5 distinct prompts, one call
    assert torch.equal(batched, single)  # bit-identical on the CPU (padded to 77 tokens either way)
    many.encode(PROMPTS[:2] + ["Hyperinflated lungs."], CPU, batched=True)
    assert counted.rows == [5, 1]  # only what the cache lacked


def test_a_gpu_engine_encodes_each_batch_in_one_call(bundle_dir, text_encoder_dir, items):
    text = load_text_encoder(str(text_encoder_dir), "cpu")
    engine = make_engine(bundle_dir, text_encoder_dir, text=text)
    engine.batched_prompts = True  # what a CUDA engine does
    counted = CountCalls(text.model)
    images = engine.run_batch(items)
    assert counted.calls == 1  # prompts and negative prompts of the batch together
    plain = make_engine(bundle_dir, text_encoder_dir).run_batch(items)
    assert torch.equal(images, plain)
