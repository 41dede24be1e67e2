"""Loaded networks plus the per-batch work: embeddings, noise, guided sampling, decoding."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import platform
import sys
import time
from dataclasses import dataclass

import torch

from cxrgen.errors import InputError, RunError
from cxrgen.manifests.workitems import WorkItem
from cxrgen.model.bundle import SCALE_FACTOR, LoadedBundle
from cxrgen.model.sampling import decode_to_uint8, initial_latents, sample_cfg
from cxrgen.model.schedulers import make_scheduler
from cxrgen.model.text_encoder import TextEncoder

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """auto -> cuda when available, else cpu; a CUDA request without CUDA is an input error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s); "
                             f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return resolved


def dtype_supported(dtype: str, device: torch.device) -> bool:
    """Whether cxrgen can sample in this dtype on this device (CPU autocast: bfloat16 only)."""
    if dtype == "float32":
        return True
    if device.type == "cuda":
        return dtype == "float16" or torch.cuda.is_bf16_supported()
    return dtype == "bfloat16"


def resolve_dtype(dtype: str, device: torch.device, recorded: str | None = None) -> str:
    """auto -> the dtype a resumed run was made in when this device can run it; else float32 on CPU,
    bfloat16 on CUDA (float16 where the GPU lacks bfloat16)."""
    if dtype != "auto":
        return dtype
    if recorded is not None and recorded in _DTYPES and dtype_supported(recorded, device):
        return recorded
    if device.type != "cuda":
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def default_batch_size(device: torch.device) -> int:
    """Images per UNet call when --batch-size is 0: small on CPU, sized from free memory on CUDA."""
    if device.type != "cuda":
        return 4
    free, _ = torch.cuda.mem_get_info(device)
    # ~0.45 GiB of activations per image at 512x512 in 16-bit autocast (2 guidance rows), measured
    # headroom kept for the decoder and the allocator.
    return int(max(1, min(128, (free - 6 * 2**30) // int(0.45 * 2**30))))


def default_decode_batch_size(device: torch.device) -> int:
    """Latents per decoder call when --decode-batch-size is 0: one at a time on CPU, 8 on CUDA.

    On CPU one-at-a-time decoding used less CPU time than whole-batch decoding and cut a 4-image
    batch's peak RSS from 6.0 to 3.7 GiB (docs/performance.md). On CUDA a 512x512 float32 decode holds
    several 128 MiB activations per image, so a whole 64-128 image batch would not fit; 8 keeps the
    decoder's share of memory small. Every image decodes on its own, so only float rounding of the
    batched kernels can depend on it.
    """
    return 1 if device.type == "cpu" else 8


def check_widths(bundle: LoadedBundle, text: TextEncoder) -> None:
    """The text encoder's width must equal the UNet's cross_attention_dim."""
    cross = bundle.spec.unet_args.get("cross_attention_dim")
    if cross is not None and int(cross) != text.width:
        raise InputError(f"text encoder {text.source} gives {text.width}-wide embeddings but the UNet's "
                         f"cross_attention_dim in {bundle.spec.root}/configs/inference.json is {cross}; "
                         "use the text encoder the bundle was trained with")


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)


def tune_cpu_allocator() -> bool:
    """Let glibc keep and reuse freed blocks instead of handing every large one back to the kernel.

    By default glibc serves each block above its mmap threshold (32 MiB at most) with a fresh mmap and
    unmaps it on free, so every 128 MiB activation of a 512x512 decode is page-faulted and zeroed by
    the kernel again: measured here, ~880k page faults and a third of the decoder's CPU time per
    image, ~8% of the UNet's. With mmap off and a high trim threshold the same memory is reused.
    Pixels are unchanged. Linux/glibc only, best effort. Returns whether the settings were applied.
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


@dataclass
class EngineOptions:
    """Resolved speed and precision options of one engine."""

    device: torch.device
    dtype: str  # float32, bfloat16 or float16
    scheduler: str
    steps: int
    decode_batch_size: int = 0
    channels_last: bool = False
    compile: bool = False


class Engine:
    """Makes uint8 images for a batch of work items; holds models loaded once."""

    def __init__(self, bundle: LoadedBundle, text: TextEncoder, options: EngineOptions):
        check_widths(bundle, text)
        self.bundle, self.text, self.options = bundle, text, options
        if options.device.type == "cpu":
            tune_cpu_allocator()
        else:
            # Fixed shapes every step: let cuDNN pick its fastest kernels; TF32 where float32 remains
            # (the decoder), whose rounding is far below one gray level.
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.unet = bundle.unet.to(options.device)
        self.autoencoder = bundle.autoencoder.to(options.device)
        if options.channels_last:
            self.unet = self.unet.to(memory_format=torch.channels_last)
        self._unet_call = torch.compile(self.unet) if options.compile else self.unet
        self.max_batch = 0  # lowered after an out-of-memory error; 0 = no limit
        self.decode_batch = options.decode_batch_size or default_decode_batch_size(options.device)
        self.first_batch_seconds: float | None = None  # includes torch.compile's compilation

    def _autocast(self):
        dtype = _DTYPES[self.options.dtype]
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.options.device.type, dtype=dtype)

    def denoise(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """UNet output in float32, under autocast when a 16-bit dtype is chosen."""
        if self.options.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            return self._unet_call(x, timesteps=timesteps, context=context).float()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Autoencoder decoder in float32: it is ~1% of the work and sets the final pixels."""
        return self.autoencoder.decode_stage_2_outputs(z)

    def latents(self, items: list[WorkItem]) -> torch.Tensor:
        """Initial noise of each item by the noise contract, on the device."""
        return initial_latents([i.seed for i in items], self.bundle.spec.latent_shape).to(self.options.device)

    def run_batch(self, items: list[WorkItem], on_step=None) -> torch.Tensor:
        """(B, H, W) uint8 images for the items, in order; on out-of-memory the batch is halved, not lost."""
        size = self.max_batch
        if size and len(items) > size:
            return torch.cat([self.run_batch(items[i:i + size], on_step) for i in range(0, len(items), size)])
        try:
            started = time.perf_counter()
            images = self._run_batch(items, on_step)
            if self.first_batch_seconds is None:
                self.first_batch_seconds = time.perf_counter() - started
            return images
        except torch.cuda.OutOfMemoryError:
            if len(items) == 1:
                raise RunError(f"out of GPU memory on {self.options.device} even for one image; free the GPU "
                               "or use --dtype bfloat16") from None
            # Each image owns its noise, so smaller batches give the same images (up to float rounding).
            torch.cuda.empty_cache()
            self.max_batch = len(items) // 2
            return self.run_batch(items, on_step)

    @torch.no_grad()
    def _run_batch(self, items: list[WorkItem], on_step=None) -> torch.Tensor:
        device = self.options.device
        # 1. prompt_embeds and negative prompt_embeds, cached per distinct prompt
        prompt_embeds = self.text.encode([i.prompt for i in items], device)
        negative_embeds = self.text.encode([i.negative_prompt for i in items], device)
        guidance_scale = torch.tensor([i.guidance_scale for i in items], dtype=torch.float32, device=device)
        # 2. guided sampling from each image's own noise
        scheduler = make_scheduler(self.options.scheduler, self.bundle.spec.scheduler_args, self.options.steps)
        latents = sample_cfg(self.denoise, self.latents(items), prompt_embeds, negative_embeds,
                             guidance_scale, scheduler, on_step=on_step)
        # 3. decode to pixels exactly as the reference converts them
        return self._decode(latents)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode in sub-batches; on out-of-memory only the decoder's sub-batch shrinks (no re-sampling)."""
        while True:
            try:
                return decode_to_uint8(self.decode, latents, SCALE_FACTOR, self.decode_batch)
            except torch.cuda.OutOfMemoryError:
                if self.decode_batch == 1:
                    raise
                torch.cuda.empty_cache()
                self.decode_batch = max(1, min(self.decode_batch, latents.shape[0]) // 2)
