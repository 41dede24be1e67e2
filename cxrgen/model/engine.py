"""Loaded networks plus the per-batch work: embeddings, noise, guided sampling, decoding, memory back-off."""
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
from cxrgen.model.devices import (  # noqa: F401 - resolve_device/default_batch_size: the engine's public names
    auto_batch_size,
    calibrated_batch_size,
    default_batch_size,
    default_decode_batch_size,
    is_out_of_memory,
    release_memory,
    resolve_device,
    usable_bytes,
    use_device,
)
from cxrgen.model.precision import (  # noqa: F401 - resolve_dtype/dtype_supported: the engine's public names
    DTYPES,
    dtype_supported,
    fold_attention_scale,
    resolve_dtype,
    set_precision,
)
from cxrgen.model.sampling import (
    NonFinite,
    decode_to_uint8,
    initial_latents,
    nonfinite_rows,
    sample_cfg,
)
from cxrgen.model.schedulers import make_scheduler
from cxrgen.model.text_encoder import TextEncoder


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
    batch_size: int = 0  # images per UNet call wanted; 0 = sized for the device (and calibrated on a GPU)


class Engine:
    """Makes uint8 images for a batch of work items; holds models loaded once."""

    def __init__(self, bundle: LoadedBundle, text: TextEncoder, options: EngineOptions):
        check_widths(bundle, text)
        self.bundle, self.text, self.options = bundle, text, options
        device = options.device
        use_device(device)
        set_precision(device, options.dtype)
        if device.type == "cpu":
            tune_cpu_allocator()
        self.unet = bundle.unet.to(device)
        self.autoencoder = bundle.autoencoder.to(device)
        if options.dtype == "float16":
            fold_attention_scale(self.unet)
        if options.channels_last:
            self.unet = self.unet.to(memory_format=torch.channels_last)
        # Static shapes: every call is padded to the compiled batch size (_padded), so neither the last
        # partial batch nor a later smaller one compiles again.
        self._unet_call = torch.compile(self.unet, dynamic=False) if options.compile else self.unet
        self.static_shapes = options.compile
        self.decode_batch = options.decode_batch_size or default_decode_batch_size(device)
        # One text-encoder call per batch on a GPU, where each call costs a host-device round trip; one per
        # prompt on the CPU, where that keeps an embedding independent of its batch (bit-identical resumes).
        self.batched_prompts = device.type == "cuda"
        self._budget = 0  # bytes the allocator may hold on a GPU (set by _auto_batch_size)
        # The batch size callers should cut batches to: asked, or sized from free memory, then calibrated
        # by the first batch's measured peak on a GPU and lowered after an out-of-memory error.
        self.batch_size = options.batch_size or self._auto_batch_size()
        self._calibrate = options.batch_size == 0 and device.type == "cuda"
        self.fit = 0  # the largest chunk that ran
        self.fail = 0  # the smallest chunk that ran out of memory (0: none yet)
        self.compiled_batch = 0
        self.rows_run = 0  # images in the last UNet call, padding included
        self.first_batch_seconds: float | None = None  # includes torch.compile's compilation

    def _auto_batch_size(self) -> int:
        device = self.options.device
        if device.type != "cuda":
            return default_batch_size(device)
        free, _ = torch.cuda.mem_get_info(device)  # after the weights moved here: what the batches may use
        self._budget = torch.cuda.memory_allocated(device) + usable_bytes(free)
        return auto_batch_size(free, self.options.dtype, self.bundle.spec.latent_shape)

    def _autocast(self):
        dtype = DTYPES[self.options.dtype]
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
        """(B, H, W) uint8 images for the items, in order; on out-of-memory the batch is cut, not lost.

        A chunk that runs out of memory is retried at half its size, then bisected up to the largest size
        that fits (with --compile only halved: each new size compiles again). Each image owns its noise,
        so smaller chunks give the same images, up to float rounding.
        """
        parts, start = [], 0
        while start < len(items):
            size = min(len(items) - start, self._limit() or len(items))
            images = self._attempt(items[start:start + size], on_step)
            if images is not None:
                parts.append(images)
                start += size
        if self.fail:
            self.batch_size = min(self.batch_size, self._limit())
        return torch.cat(parts)

    def _limit(self) -> int:
        """The chunk size to try next after an out-of-memory error; 0 while there was none."""
        if not self.fail:
            return 0
        half = max(1, self.fail // 2)
        if self.static_shapes:  # each new size compiles again: halve only
            return max(self.fit, half)
        if not self.fit:
            return half
        return (self.fit + self.fail) // 2 if self.fail - self.fit > 1 else self.fit

    def _attempt(self, items: list[WorkItem], on_step) -> torch.Tensor | None:
        """The chunk's images, or None after an out-of-memory error (with the memory it held released)."""
        try:
            return self._timed(items, on_step)
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
        # Only here, outside the except block, are the exception and its traceback gone, and with them every
        # tensor of the failed attempt: retrying inside the block would run with that memory still held.
        if len(items) == 1:
            raise RunError(f"out of GPU memory on {self.options.device} even for one image; free the GPU "
                           "(another process may hold its memory), then resume")
        self.fail = len(items)
        if self.fit >= self.fail:
            self.fit = 0  # what ran before no longer fits (another process, fragmentation): start over
        release_memory(self.options.device)
        return None

    def _timed(self, items: list[WorkItem], on_step) -> torch.Tensor:
        device, calibrate = self.options.device, self._calibrate and not self.fail
        if calibrate:
            torch.cuda.reset_peak_memory_stats(device)
            start_bytes = torch.cuda.memory_allocated(device)
        started = time.perf_counter()
        images = self._run_batch(items, on_step)
        if self.first_batch_seconds is None:
            self.first_batch_seconds = time.perf_counter() - started
        self.fit = max(self.fit, len(items))
        if calibrate:  # once: the first batch's real peak replaces the estimate
            self._calibrate = False
            self.batch_size = calibrated_batch_size(self.batch_size, self.rows_run, start_bytes,
                                                    torch.cuda.max_memory_allocated(device), self._budget)
        return images

    def _padded(self, items: list[WorkItem]) -> list[WorkItem]:
        """With --compile, the items plus copies of the last one up to the compiled batch size."""
        if not self.static_shapes:
            return items
        n = len(items)
        # The first call fixes the size; a larger chunk (after calibration) or one after an out-of-memory
        # error at the compiled size compiles once more at its own size.
        if not self.compiled_batch or n > self.compiled_batch or (self.fail and self.compiled_batch >= self.fail):
            self.compiled_batch = n
        return items + [items[-1]] * (self.compiled_batch - n)

    @torch.no_grad()
    def _run_batch(self, items: list[WorkItem], on_step=None) -> torch.Tensor:
        device, real = self.options.device, len(items)
        items = self._padded(items)
        self.rows_run = len(items)
        # 1. prompt_embeds and negative prompt_embeds: one encoder call for what the cache lacks (on a GPU)
        embeds = self.text.encode([i.prompt for i in items] + [i.negative_prompt for i in items], device,
                                  batched=self.batched_prompts)
        prompt_embeds, negative_embeds = embeds[:len(items)], embeds[len(items):]
        guidance_scale = torch.tensor([i.guidance_scale for i in items], dtype=torch.float32, device=device)
        # 2. guided sampling from each image's own noise
        scheduler = make_scheduler(self.options.scheduler, self.bundle.spec.scheduler_args, self.options.steps)
        latents = sample_cfg(self.denoise, self.latents(items), prompt_embeds, negative_embeds,
                             guidance_scale, scheduler, on_step=on_step)
        # 3. decode to pixels exactly as the reference converts them (padding dropped first)
        return self._decode(latents[:real], items[:real])

    def _decode(self, latents: torch.Tensor, items: list[WorkItem]) -> torch.Tensor:
        """Decode in sub-batches, finite values only; on out-of-memory only the decoder's sub-batch shrinks."""
        try:
            bad = nonfinite_rows(latents)  # one host-device sync per batch: a NaN would become a black image
            if bad:
                raise NonFinite(bad, "sampled latents")
            while True:
                try:
                    return decode_to_uint8(self.decode, latents, SCALE_FACTOR, self.decode_batch)
                except RuntimeError as exc:
                    if not is_out_of_memory(exc) or self.decode_batch == 1:
                        raise
                # outside the except block, so the failed sub-batch's activations are gone (see _attempt)
                release_memory(self.options.device)
                self.decode_batch = max(1, min(self.decode_batch, latents.shape[0]) // 2)
        except NonFinite as exc:
            raise self._nonfinite_error(exc, items) from None

    def _nonfinite_error(self, exc: NonFinite, items: list[WorkItem]) -> RunError:
        names = ", ".join(items[row].image_id for row in exc.rows[:3])
        where = f"{self.options.dtype} on {self.options.device}"
        if self.options.dtype == "float16":
            fix = ("float16's range is too small for this model here; start a new run with --dtype bfloat16 "
                   "(GPUs of compute capability 8.0 or newer) or --dtype float32 (a resume in float16 fails the "
                   "same way)")
        else:
            fix = "check the model files (a damaged or foreign checkpoint gives NaN) and the GPU, then resume"
        return RunError(f"{len(exc.rows)} of {len(items)} image(s) of a batch came out as NaN or inf in the "
                        f"{exc.stage} ({where}), e.g. {names}; nothing of that batch was written (a NaN would "
                        f"have become a black image): {fix}")
