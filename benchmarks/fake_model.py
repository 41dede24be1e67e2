"""Stand-ins for the real model files, built on the fly: the bundle's architecture with random weights.

The benchmark needs the real model's cost, not its pictures, so the networks have exactly the
bundle's architecture (docs/algorithm.md) and seeded random weights, saved in the old GenerativeModels
checkpoint layout the published files use; the text encoder has the SD 2.x text architecture and
the real tokenizer files. `tiny=True` gives toy sizes for the smoke test.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from cxrgen.model.checkpoint import to_old_layout

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_FILES = REPO / "tests" / "fixtures" / "sd2-tokenizer"  # data files, not test code

# configs/inference.json of the model-zoo bundle (v1.0.1+), as docs/algorithm.md lists them.
REAL_AUTOENCODER = dict(spatial_dims=2, in_channels=1, out_channels=1, latent_channels=3,
                        channels=[64, 128, 128, 128], num_res_blocks=2, norm_num_groups=32, norm_eps=1e-6,
                        attention_levels=[False, False, False, False], with_encoder_nonlocal_attn=False,
                        with_decoder_nonlocal_attn=False)
REAL_UNET = dict(spatial_dims=2, in_channels=3, out_channels=3, channels=[256, 512, 768], num_res_blocks=2,
                 attention_levels=[False, True, True], norm_num_groups=32, norm_eps=1e-6, resblock_updown=False,
                 num_head_channels=[0, 512, 768], with_conditioning=True, transformer_num_layers=1,
                 cross_attention_dim=1024)
REAL_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16)
REAL_LATENT = (3, 64, 64)

TINY_AUTOENCODER = dict(REAL_AUTOENCODER, channels=[8, 8, 8], num_res_blocks=1, norm_num_groups=4,
                        attention_levels=[False, False, False])
TINY_UNET = dict(REAL_UNET, channels=[16, 32], num_res_blocks=1, attention_levels=[False, True], norm_num_groups=8,
                 num_head_channels=[0, 16], cross_attention_dim=32)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TINY_LATENT = (3, 8, 8)

SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0205, schedule="scaled_linear_beta",
                 prediction_type="v_prediction", clip_sample=False)


def architecture(tiny: bool) -> dict:
    """Network arguments, text sizes and latent shape of the real model (or of the toy one)."""
    if tiny:
        return {"autoencoder": TINY_AUTOENCODER, "unet": TINY_UNET, "text": TINY_TEXT, "latent": TINY_LATENT}
    return {"autoencoder": REAL_AUTOENCODER, "unet": REAL_UNET, "text": REAL_TEXT, "latent": REAL_LATENT}


def fill_random(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded weights with unit-scale activations; MONAI zero-initialises its output convolutions,
    which would make every image flat, so every tensor is overwritten."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=gen).mul_(1.0 / math.sqrt(param[0].numel())))
            elif name.endswith("weight") and "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    return model


def build_bundle(root: Path, tiny: bool = False, seed: int = 0) -> Path:
    """configs/inference.json, configs/metadata.json and models/*.pth (old layout) under root."""
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

    arch = architecture(tiny)
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(parents=True, exist_ok=True)
    autoencoder = fill_random(AutoencoderKL(**arch["autoencoder"]), seed)
    torch.save(to_old_layout(autoencoder.state_dict()), root / "models" / "autoencoder.pth")
    del autoencoder
    unet = fill_random(DiffusionModelUNet(**arch["unet"]), seed + 1)
    torch.save(to_old_layout(unet.state_dict()), root / "models" / "diffusion_model.pth")
    del unet
    c, h, w = arch["latent"]
    config = {
        "bundle_root": ".", "load_old": 1,
        "autoencoder_def": {"_target_": "monai.networks.nets.AutoencoderKL", **arch["autoencoder"]},
        "diffusion_def": {"_target_": "monai.networks.nets.DiffusionModelUNet", **arch["unet"]},
        "scheduler": {"_target_": "monai.networks.schedulers.DDIMScheduler", **SCHEDULER},
        "noise": f"$torch.randn((1, {c}, {h}, {w})).to(@device)",
        "guidance_scale": 7.0,
    }
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    meta = {"name": "benchmark_random_weights", "version": "1.0.1",
            "intended_use": "throughput benchmark only: random weights, the images are noise"}
    (root / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2))
    return root


def build_text_encoder(root: Path, tiny: bool = False, seed: int = 0) -> Path:
    """A CLIPTextModel of the SD 2.x text architecture (random weights) with the SD 2.x tokenizer files."""
    from transformers import CLIPTextConfig, CLIPTextModel

    sizes = architecture(tiny)["text"]
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="gelu",
                            projection_dim=sizes["hidden_size"], pad_token_id=0, bos_token_id=49406,
                            eos_token_id=49407, **sizes)
    CLIPTextModel(config).eval().save_pretrained(root / "text_encoder")
    shutil.copytree(TOKENIZER_FILES, root / "tokenizer", dirs_exist_ok=True)
    return root


_FINDINGS = ["small left pleural effusion", "right lower lobe consolidation", "mild cardiomegaly",
             "moderate pulmonary edema", "left apical pneumothorax", "bibasilar atelectasis",
             "no acute cardiopulmonary process", "right upper lobe mass", "hyperinflated lungs",
             "left lower lobe opacity", "small bilateral pleural effusions", "enlarged cardiac silhouette"]
_TAILS = ["", " unchanged from prior", " new since the prior study", " with adjacent atelectasis",
          " likely representing pneumonia", " in the appropriate clinical setting"]


def report_prompts(count: int) -> list[str]:
    """`count` distinct report-like sentences (distinct so no text-embedding cache hides work)."""
    prompts = []
    for i in range(count):
        finding = _FINDINGS[i % len(_FINDINGS)]
        tail = _TAILS[(i // len(_FINDINGS)) % len(_TAILS)]
        serial = i // (len(_FINDINGS) * len(_TAILS))
        text = f"{finding[0].upper()}{finding[1:]}{tail}"
        prompts.append(text + (f", finding {serial + 1}" if serial else "") + ".")
    return prompts


def write_manifest(path: Path, prompts: list[str]) -> Path:
    """A CSV manifest with one prompt per row."""
    import csv

    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt"])
        for prompt in prompts:
            writer.writerow([prompt])
    return path
