"""The demo model: a tiny random-weight bundle and text encoder in the real files' layouts (`cxrgen download --demo`).

It runs every command of the pipeline in seconds on any machine, so an install, a GPU, a cluster launch, an
object store or a gallery can be checked before the 2.5 GB download. Its weights are random: every image it
makes is noise. The bundle's configs/metadata.json says so (`cxrgen_demo: true`), its model name and version
say so, and so does every output that names the model (run.json, metadata.parquet, each image's provenance
marker, the dataset card, `cxrgen status`, the evaluation report, the gallery). The test suite builds its
tiny models with these same functions.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from cxrgen.errors import InputError
from cxrgen.model.checkpoint import to_old_layout
from cxrgen.pins import DEFAULT_TEXT_ENCODER

WIDTH = 32  # text width = the tiny UNet's cross_attention_dim
TINY_AUTOENCODER = dict(spatial_dims=2, in_channels=1, out_channels=1, latent_channels=3, channels=[8, 8, 8],
                        num_res_blocks=1, norm_num_groups=4, norm_eps=1e-6, attention_levels=[False, False, False],
                        with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)
TINY_UNET = dict(spatial_dims=2, in_channels=3, out_channels=3, channels=[16, 32], num_res_blocks=1,
                 attention_levels=[False, True], norm_num_groups=8, norm_eps=1e-6, resblock_updown=False,
                 num_head_channels=[0, 16], with_conditioning=True, transformer_num_layers=1,
                 cross_attention_dim=WIDTH)
# The real bundle's scheduler (../shared/REFERENCE.md), so the demo samples exactly as a real run does.
SCHEDULER = dict(beta_start=0.0015, beta_end=0.0205, num_train_timesteps=1000, schedule="scaled_linear_beta",
                 prediction_type="v_prediction", clip_sample=False)
LATENT = (3, 8, 8)  # the smallest latent: 32 x 32 pixel images (what the tests use)
DEMO_LATENT = (3, 16, 16)  # the demo's: 64 x 64 pixel images, seconds per batch of 50 steps on one CPU core
DEMO_NAME = "cxrgen_demo_random_weights"
DEMO_VERSION = "demo (random weights: images are noise)"
NOISE = ("demo model with random weights: its images are noise, not chest X-rays; for checking an install, a GPU, "
         "a cluster launch or a gallery only")
_TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "sd2-tokenizer"  # shipped: the real SD 2.x tokenizer


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-zero random weights everywhere (MONAI zero-initialises output convs, which would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            else:
                base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
    return model


def build_networks(seed: int = 0, autoencoder_args=None, unet_args=None):
    """The tiny AutoencoderKL and DiffusionModelUNet with seeded random weights."""
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

    ae = randomize(AutoencoderKL(**(autoencoder_args or TINY_AUTOENCODER)), seed)
    unet = randomize(DiffusionModelUNet(**(unet_args or TINY_UNET)), seed + 1)
    return ae.eval(), unet.eval()


def build_bundle(root: Path, *, generation: str = "1.0.1", seed: int = 0, layout: str = "old",
                 autoencoder_args=None, unet_args=None, latent=LATENT, metadata: dict | None = None) -> Path:
    """Write configs/inference.json, configs/metadata.json and models/*.pth like the real bundle.

    generation "1.0.0" writes the GenerativeModels config spelling, "1.0.1" MONAI core's; layout "old" saves
    the checkpoints in the published parameter layout (load_old_state_dict), "new" in MONAI core's.
    """
    ae_args = dict(autoencoder_args or TINY_AUTOENCODER)
    unet_args = dict(unet_args or TINY_UNET)
    ae, unet = build_networks(seed, ae_args, unet_args)
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(parents=True, exist_ok=True)
    convert = to_old_layout if layout == "old" else dict
    torch.save(convert(ae.state_dict()), root / "models" / "autoencoder.pth")
    torch.save(convert(unet.state_dict()), root / "models" / "diffusion_model.pth")
    config = inference_config(generation, ae_args, unet_args, latent)
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    meta = metadata or {"version": generation, "name": "tiny_cxr_bundle", "intended_use": "tests only"}
    (root / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2))
    return root


def inference_config(generation: str, ae_args: dict, unet_args: dict, latent) -> dict:
    """configs/inference.json of either bundle generation for these network arguments and latent shape."""
    if generation == "1.0.0":
        ae = {"_target_": "generative.networks.nets.AutoencoderKL", **_old_names(ae_args)}
        unet = {"_target_": "generative.networks.nets.DiffusionModelUNet", **_old_names(unet_args)}
        sched = {"_target_": "generative.networks.schedulers.DDIMScheduler", **SCHEDULER}
        extra = {}
    else:
        ae = {"_target_": "monai.networks.nets.AutoencoderKL", **ae_args}
        unet = {"_target_": "monai.networks.nets.DiffusionModelUNet", **unet_args}
        sched = {"_target_": "monai.networks.schedulers.DDIMScheduler", **SCHEDULER}
        extra = {"load_old": 1}
    sched["_requires_"] = ["@load_diffusion", "@load_autoencoder"]
    return {"bundle_root": ".", **extra, "autoencoder_def": ae, "diffusion_def": unet, "scheduler": sched,
            "noise": f"$torch.randn((1, {latent[0]}, {latent[1]}, {latent[2]})).to(@device)",
            "guidance_scale": 7.0}


def _old_names(args: dict) -> dict:
    args = dict(args)
    args["num_channels"] = args.pop("channels")
    return args


def build_text_encoder(root: Path, seed: int = 0, width: int = WIDTH) -> Path:
    """A random CLIPTextModel of the given width plus the real SD 2.x tokenizer, in subfolders."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            hidden_act="gelu", projection_dim=width, pad_token_id=0, bos_token_id=49406,
                            eos_token_id=49407)
    model = CLIPTextModel(config).eval()
    model.save_pretrained(root / "text_encoder")
    shutil.copytree(_TOKENIZER, root / "tokenizer", dirs_exist_ok=True)
    return root


# The demo manifest: the prompts of manifests/demo.csv, two images each, with label columns for the gallery.
DEMO_MANIFEST = ("id,prompt,num_images,effusion,cardiomegaly,pneumothorax,view\n"
                 "demo-001,Big right-sided pleural effusion,2,1,0,0,PA\n"
                 "demo-002,\"Moderate cardiomegaly with mild pulmonary edema, no effusion\",2,0,1,0,PA\n"
                 "demo-003,Small left apical pneumothorax,2,0,0,1,AP\n"
                 "demo-004,No acute cardiopulmonary process.,2,0,0,0,PA\n")


@dataclass(frozen=True)
class DemoKit:
    """What `cxrgen download --demo DIR` writes."""

    root: Path
    bundle: Path  # a MONAI bundle folder: pass it as --model
    text_encoder: Path  # tokenizer/ and text_encoder/: pass it as --text-encoder
    manifest: Path  # a four-row manifest with label columns


def write_demo(folder: str | Path) -> DemoKit:
    """FOLDER/bundle, FOLDER/text-encoder and FOLDER/manifest.csv: the demo model (random weights; images are noise).

    Refuses a folder that holds anything else, so nothing of the user's is overwritten; the same folder given
    again is rebuilt (the weights are seeded: the same files every time). A run's output inside it is kept.
    """
    folder = Path(folder).expanduser().resolve()
    ours = {"bundle", "text-encoder", "manifest.csv", "README.txt", "out", "shards"}
    if folder.is_file() or (folder.is_dir() and any(p.name not in ours for p in folder.iterdir())):
        raise InputError(f"--demo {folder}: not an empty folder (nor an earlier demo); give a new folder")
    meta = {"name": DEMO_NAME, "version": DEMO_VERSION, "cxrgen_demo": True, "description": NOISE,
            "intended_use": "checking cxrgen's install, a GPU, a cluster launch or a gallery; never as data",
            "text_encoder": f"random-weight CLIP text encoder with {DEFAULT_TEXT_ENCODER}'s tokenizer"}
    try:
        bundle = build_bundle(folder / "bundle", latent=DEMO_LATENT, metadata=meta)
        text = build_text_encoder(folder / "text-encoder")
        (folder / "manifest.csv").write_text(DEMO_MANIFEST, encoding="utf-8")
        (folder / "README.txt").write_text(f"cxrgen {NOISE}.\n\nbundle/        a MONAI bundle in the real layout "
                                           "(tiny networks)\ntext-encoder/  tokenizer/ and text_encoder/ (tiny CLIP)\n"
                                           "manifest.csv  four prompts with label columns\n", encoding="utf-8")
    except OSError as exc:
        raise InputError(f"--demo {folder}: cannot write there ({exc.strerror or exc}); give a writable folder") \
            from None
    return DemoKit(folder, bundle, text, folder / "manifest.csv")
