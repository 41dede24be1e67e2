"""cxrgen's images equal docs/algorithm.md's single-image algorithm, whatever the batch around them."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tiny
import torch
from PIL import Image

from cxrgen.config import RunConfig
from cxrgen.model import demo
from cxrgen.runs.generate import generate

STEPS = 3


def reference_image(prompt: str, seed: int, guidance_scale: float, text_dir, steps: int = STEPS) -> np.ndarray:
    """docs/algorithm.md's algorithm for ONE image, written out independently of cxrgen."""
    from monai.networks.schedulers import DDIMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    autoencoder, unet = demo.build_networks(seed=0)
    tokenizer = CLIPTokenizer.from_pretrained(str(text_dir / "tokenizer"))
    text_encoder = CLIPTextModel.from_pretrained(str(text_dir / "text_encoder")).eval()
    ids = tokenizer(["", prompt], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    scheduler = DDIMScheduler(**demo.SCHEDULER)
    scheduler.set_timesteps(num_inference_steps=steps)
    with torch.no_grad():
        prompt_embeds = text_encoder(ids)[0]
        x = torch.randn((1, *demo.LATENT), generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
        for t in scheduler.timesteps:
            out = unet(torch.cat([x, x]), timesteps=torch.Tensor((t,)).long(), context=prompt_embeds)
            u, c = out.chunk(2)
            x, _ = scheduler.step(u + guidance_scale * (c - u), t, x)
        image = autoencoder.decode_stage_2_outputs(x / 0.3)
    return (image.clamp(0, 1) * 255).to(torch.uint8)[0, 0].numpy()


def run(tmp_path, bundle_dir, text_encoder_dir, rows: list[dict], name: str, **options) -> pd.DataFrame:
    manifest = tmp_path / f"{name}.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    config = RunConfig(manifest=str(manifest), out=str(tmp_path / name), model=str(bundle_dir),
                       text_encoder=str(text_encoder_dir), steps=STEPS, image_format="png", quiet=True,
                       **options)
    generate(config)
    return pd.read_parquet(tmp_path / name / "metadata.parquet")


def pixels(out_dir, file_name) -> np.ndarray:
    with Image.open(out_dir / file_name) as image:
        assert image.mode == "L"
        return np.asarray(image)


def assert_close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    diff = np.abs(a.astype(int) - b.astype(int))
    assert (diff <= 1).mean() >= 0.999, f"max diff {diff.max()}, {(diff > 1).sum()} pixels off by > 1"


TARGET = {"id": "target", "prompt": "Big right-sided pleural effusion", "seed": 1234, "guidance_scale": 7.0}
OTHERS = [
    {"id": "o1", "prompt": "Normal chest radiograph.", "seed": 5, "guidance_scale": 3.0},
    {"id": "o2", "prompt": "Cardiomegaly with pulmonary edema!", "seed": 77, "guidance_scale": 0.0},
    {"id": "o3", "prompt": "Left lower lobe consolidation", "seed": 9, "guidance_scale": 12.5},
]


@pytest.fixture(scope="module")
def expected(text_encoder_dir) -> np.ndarray:
    image = reference_image(TARGET["prompt"], TARGET["seed"], TARGET["guidance_scale"], text_encoder_dir)
    assert image.std() > 5, "the tiny model must give a non-trivial image, or the comparison proves nothing"
    return image


def test_batch_of_one_equals_reference(tmp_path, bundle_dir, text_encoder_dir, expected):
    meta = run(tmp_path, bundle_dir, text_encoder_dir, [TARGET], "single", batch_size=1)
    assert meta.loc[0, "seed"] == TARGET["seed"]
    assert_close(pixels(tmp_path / "single", meta.loc[0, "file_name"]), expected)


def test_batch_of_one_with_default_options_equals_reference_exactly(tmp_path, bundle_dir, text_encoder_dir,
                                                                    expected):
    """Bit-exact at batch size 1 (PNG is lossless): catches rounding instead of truncation to uint8."""
    meta = run(tmp_path, bundle_dir, text_encoder_dir, [TARGET], "exact", batch_size=1)
    got = pixels(tmp_path / "exact", meta.loc[0, "file_name"])
    assert got.shape == expected.shape
    assert np.array_equal(got, expected), f"{int((got != expected).sum())} pixels differ"


def test_image_inside_mixed_batch_equals_reference(tmp_path, bundle_dir, text_encoder_dir, expected):
    rows = [OTHERS[0], TARGET, *OTHERS[1:]]
    meta = run(tmp_path, bundle_dir, text_encoder_dir, rows, "mixed", batch_size=4)
    target = meta[meta.row_id == "target"].iloc[0]
    assert_close(pixels(tmp_path / "mixed", target.file_name), expected)
    # The other images are the reference algorithm too, each with its own guidance scale.
    for row in OTHERS:
        got = meta[meta.row_id == row["id"]].iloc[0]
        assert got.guidance_scale == row["guidance_scale"]
        want = reference_image(row["prompt"], row["seed"], row["guidance_scale"], text_encoder_dir)
        assert_close(pixels(tmp_path / "mixed", got.file_name), want)


def test_guidance_scale_changes_the_image(tmp_path, bundle_dir, text_encoder_dir, expected):
    """The reference bundle ignores its guidance flag; cxrgen must not."""
    rows = [dict(TARGET, guidance_scale=1.0)]
    meta = run(tmp_path, bundle_dir, text_encoder_dir, rows, "g1", batch_size=1)
    image = pixels(tmp_path / "g1", meta.loc[0, "file_name"])
    assert np.abs(image.astype(int) - expected.astype(int)).max() > 1


def test_batch_size_does_not_change_ids_seeds_or_pixels(tmp_path, bundle_dir, text_encoder_dir):
    rows = [{"prompt": p} for p in ("Pleural effusion", "Pneumothorax on the left", "No acute findings")]
    metas = {b: run(tmp_path, bundle_dir, text_encoder_dir, rows, f"b{b}", batch_size=b, num_images=2)
             for b in (1, 3, 6)}
    base = metas[1]
    assert len(base) == 6 and base.image_id.is_unique
    for b, meta in metas.items():
        assert list(meta.image_id) == list(base.image_id)
        assert list(meta.seed) == list(base.seed)
        for name in base.file_name:
            assert_close(pixels(tmp_path / f"b{b}", name), pixels(tmp_path / "b1", name))


def test_out_of_memory_halves_the_batch_and_keeps_the_images(tmp_path, bundle_dir, text_encoder_dir):
    rows = [{"prompt": p} for p in ("Pleural effusion", "Pneumothorax on the left", "No acute findings")]
    manifest = tmp_path / "m.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    common = dict(manifest=str(manifest), model=str(bundle_dir), text_encoder=str(text_encoder_dir), steps=STEPS,
                  image_format="png", quiet=True, num_images=2)
    generate(RunConfig(out=str(tmp_path / "small"), batch_size=2, **common))
    result = generate(RunConfig(out=str(tmp_path / "oom"), batch_size=6, **common),
                      engine_hook=tiny.oom_above_two_images)
    assert result.written == 6
    small, oom = (pd.read_parquet(tmp_path / n / "metadata.parquet") for n in ("small", "oom"))
    assert list(small.image_id) == list(oom.image_id)
    for name in small.file_name:
        assert_close(pixels(tmp_path / "oom", name), pixels(tmp_path / "small", name))


def test_decoder_out_of_memory_shrinks_only_the_decode(tmp_path, bundle_dir, text_encoder_dir):
    """A decoder OOM must not throw away the sampled latents: the UNet runs steps x batches times only."""
    rows = [{"prompt": p} for p in ("Pleural effusion", "Pneumothorax on the left")]
    manifest = tmp_path / "m.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    common = dict(manifest=str(manifest), model=str(bundle_dir), text_encoder=str(text_encoder_dir), steps=STEPS,
                  image_format="png", quiet=True, num_images=2, batch_size=4)
    generate(RunConfig(out=str(tmp_path / "plain"), decode_batch_size=1, **common))
    engines = []
    hook = lambda engine, name: engines.append(tiny.decoder_oom_above_one_latent(engine, name)) or engines[-1]  # noqa: E731
    generate(RunConfig(out=str(tmp_path / "oom"), decode_batch_size=4, **common), engine_hook=hook)
    assert engines[0].decode_batch == 1 and engines[0].unet_calls == STEPS  # one batch of 4, sampled once
    plain = pd.read_parquet(tmp_path / "plain" / "metadata.parquet")
    for name in plain.file_name:
        assert_close(pixels(tmp_path / "oom", name), pixels(tmp_path / "plain", name))
