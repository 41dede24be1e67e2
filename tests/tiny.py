"""Tiny bundles and text encoders with random weights, in the real files' layouts (built at test time)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from cxrgen.model.checkpoint import to_old_layout

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER = FIXTURES / "sd2-tokenizer"
WIDTH = 32  # text width = the tiny UNet's cross_attention_dim

TINY_AUTOENCODER = dict(spatial_dims=2, in_channels=1, out_channels=1, latent_channels=3, channels=[8, 8, 8],
                        num_res_blocks=1, norm_num_groups=4, norm_eps=1e-6, attention_levels=[False, False, False],
                        with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)
TINY_UNET = dict(spatial_dims=2, in_channels=3, out_channels=3, channels=[16, 32], num_res_blocks=1,
                 attention_levels=[False, True], norm_num_groups=8, norm_eps=1e-6, resblock_updown=False,
                 num_head_channels=[0, 16], with_conditioning=True, transformer_num_layers=1,
                 cross_attention_dim=WIDTH)
SCHEDULER = dict(beta_start=0.0015, beta_end=0.0205, num_train_timesteps=1000, schedule="scaled_linear_beta",
                 prediction_type="v_prediction", clip_sample=False)
LATENT = (3, 8, 8)


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
                 autoencoder_args=None, unet_args=None, latent=LATENT) -> Path:
    """Write configs/inference.json, configs/metadata.json and models/*.pth like the real bundle."""
    ae_args = dict(autoencoder_args or TINY_AUTOENCODER)
    unet_args = dict(unet_args or TINY_UNET)
    ae, unet = build_networks(seed, ae_args, unet_args)
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(parents=True, exist_ok=True)
    convert = to_old_layout if layout == "old" else dict
    torch.save(convert(ae.state_dict()), root / "models" / "autoencoder.pth")
    torch.save(convert(unet.state_dict()), root / "models" / "diffusion_model.pth")
    config = _inference_json(generation, ae_args, unet_args, latent)
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    meta = {"version": generation, "name": "tiny_cxr_bundle", "intended_use": "tests only"}
    (root / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2))
    return root


def _inference_json(generation: str, ae_args: dict, unet_args: dict, latent) -> dict:
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
    shutil.copytree(TOKENIZER, root / "tokenizer", dirs_exist_ok=True)
    return root


def first_worker_waits_for_the_other(engine, name: str, out: str = "", records: int = 0):
    """engine_hook for tests: w0 holds its first batch until w1 has journaled `records` images.

    Deterministic, unlike a sleep racing real work: w1 must take more of the queue whatever the load.
    Bind `out` and `records` with functools.partial (picklable: module-level).
    """
    import time

    if name == "w0":
        original = engine.run_batch
        journal = Path(out) / ".cxrgen" / "records" / "part-w1.jsonl"

        def wait_then_run(items, on_step=None):
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                if journal.is_file() and len(journal.read_text().splitlines()) >= records:
                    break
                time.sleep(0.05)
            return original(items, on_step)

        engine.run_batch = wait_then_run
    return engine


def fail_in_w1(engine, name: str, after: int = 1, marker: str = ""):
    """engine_hook for tests: worker w1 raises a plain RuntimeError (not a cxrgen error) after `after` batches,
    first creating the file `marker` (when given) so a test knows when it failed."""
    if name == "w1":
        original = engine.run_batch
        calls = [0]

        def failing(items, on_step=None):
            calls[0] += 1
            if calls[0] > after:
                if marker:
                    Path(marker).touch()
                raise RuntimeError("simulated worker bug")
            return original(items, on_step)

        engine.run_batch = failing
    return engine


def fail_at_start_in_w1(engine, name: str):
    """engine_hook for tests: worker w1 raises a plain RuntimeError as it starts (whatever the timing)."""
    if name == "w1":
        raise RuntimeError("simulated worker bug")
    return engine


def sigterm_in_w1_before_sampling(engine, name: str):
    """engine_hook for tests: worker w1 gets SIGTERM after loading its models, before the batch loop."""
    import os
    import signal
    import time

    if name == "w1":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # the signal is delivered here, outside the loop's own handler
    return engine


def w1_never_ends_and_the_other_fails(engine, name: str):
    """engine_hook for tests: w1 ignores SIGTERM and never ends (as if stuck on a dead process's queue lock);
    the other worker fails, so the parent stops both."""
    import signal
    import time

    if name == "w1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(3600)
    time.sleep(1.0)  # w1 is in its sleep by now
    raise RuntimeError("simulated worker bug")


def log_library_lines(engine, name: str):
    """engine_hook for tests: a worker's MONAI and transformers loggers each log a warning."""
    import logging

    from transformers.utils import logging as hf_logging

    logging.getLogger("monai.bundle").warning(f"monai warning from {name}")
    hf_logging.get_logger("transformers.modeling_utils").warning(f"transformers warning from {name}")
    return engine


def record_threads(engine, name: str, folder: str = ""):
    """engine_hook for tests: each worker writes its torch intra-op thread count to folder/<name>."""
    import torch

    (Path(folder) / name).write_text(str(torch.get_num_threads()))
    return engine


def oom_above_two_images(engine, name: str):
    """engine_hook for tests: the UNet 'runs out of memory' for more than 2 images (4 guidance rows)."""
    import torch

    original = engine.denoise

    def denoise(x, timesteps, context):
        if x.shape[0] > 4:
            raise torch.cuda.OutOfMemoryError("simulated: CUDA out of memory")
        return original(x, timesteps, context)

    engine.denoise = denoise
    return engine


def decoder_oom_above_one_latent(engine, name: str):
    """engine_hook for tests: the decoder 'runs out of memory' for more than one latent; counts UNet calls."""
    import torch

    original_decode, original_denoise = engine.decode, engine.denoise
    engine.unet_calls = 0

    def decode(z):
        if z.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("simulated: CUDA out of memory")
        return original_decode(z)

    def denoise(x, timesteps, context):
        engine.unet_calls += 1
        return original_denoise(x, timesteps, context)

    engine.decode, engine.denoise = decode, denoise
    return engine


def sigkill_once_after(engine, name: str, marker: str = "", batches: int = 1):
    """engine_hook for tests (Ray actors): the first worker to start its batch number `batches` + 1 SIGKILLs its
    own process, once per marker file (created exclusively, so exactly one incarnation of one actor dies)."""
    import os
    import signal

    original = engine.run_batch
    calls = [0]

    def run_batch(items, on_step=None):
        calls[0] += 1
        if calls[0] > batches:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return original(items, on_step)

    engine.run_batch = run_batch
    return engine


def fail_with_run_error(engine, name: str):
    """engine_hook for tests: every batch fails with a cxrgen RunError (as a full disk would)."""
    from cxrgen.errors import RunError

    def run_batch(items, on_step=None):
        raise RunError(f"simulated full disk in {name}")

    engine.run_batch = run_batch
    return engine


def slow_batches(engine, name: str, seconds: float = 0.5):
    """engine_hook for tests: every batch takes at least `seconds` longer (a run that is surely mid-way when killed)."""
    import time

    original = engine.run_batch

    def run_batch(items, on_step=None):
        time.sleep(seconds)
        return original(items, on_step)

    engine.run_batch = run_batch
    return engine
