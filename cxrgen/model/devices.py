"""Which device a process samples on, how many images fit on it, and how an out-of-memory error is told apart."""
from __future__ import annotations

import gc
from typing import Sequence

import torch

from cxrgen.errors import InputError

MIB, GIB = 2**20, 2**30
# Activation peaks of the bundle's networks, measured on the meta device (issue 18) at the bundle's 64x64
# latent / 512x512 image: the UNet holds ~61 MiB per row in float32 and ~30 MiB per row under 16-bit
# autocast, two rows per image (classifier-free guidance); the float32 decoder ~384 MiB per image of its
# sub-batch. Other latent sizes scale with the area. The first batch on a GPU replaces these figures by
# the allocator's own peak (calibrated_batch_size).
UNET_ROW_BYTES = {"float32": 61 * MIB, "bfloat16": 30 * MIB, "float16": 30 * MIB}
ROWS_PER_IMAGE = 2
DECODE_IMAGE_BYTES = 384 * MIB  # why decoding runs in sub-batches (default_decode_batch_size)
REFERENCE_LATENT_AREA = 64 * 64
# Kept free beside the estimate: cuDNN workspaces, autocast's 16-bit copies of the UNet weights (~0.5 GiB),
# the text encoder's activations and allocator fragmentation.
RESERVE_BYTES = 1.5 * GIB
FREE_SHARE = 0.9
# More images per call stop paying once the GPU is saturated, and a batch is also the unit of loss when a
# run is killed (its images are remade): 128 of the bundle's images are ~8 TFLOP per UNet call.
MAX_AUTO_BATCH = 128
CPU_BATCH = 4  # --batch-size 0 on the CPU (docs/performance.md)
# cuDNN and cuBLAS report a failed workspace allocation as a plain RuntimeError, not as OutOfMemoryError.
_OOM_WORDS = ("out of memory", "CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED",
              "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE")


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


def use_device(device: torch.device | str) -> None:
    """Make a CUDA device this process's current one, so that nothing lands on GPU 0 by default (cuDNN
    handles, autocast caches, a bare `cuda` tensor)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception is the GPU (or cuDNN/cuBLAS) running out of memory."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(word in str(exc) for word in _OOM_WORDS)


def release_memory(device: torch.device) -> None:
    """Hand cached blocks back after an out-of-memory error (call it outside the `except` block: the
    exception's traceback keeps the failed call's tensors alive until then)."""
    gc.collect()  # tensors caught in reference cycles with the failed frames
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _area_scale(latent_shape: Sequence[int]) -> float:
    return (int(latent_shape[-2]) * int(latent_shape[-1])) / REFERENCE_LATENT_AREA


def usable_bytes(free_bytes: int) -> int:
    """What the batch may take of the free memory, headroom kept."""
    return int(FREE_SHARE * free_bytes - RESERVE_BYTES)


def auto_batch_size(free_bytes: int, dtype: str, latent_shape: Sequence[int] = (3, 64, 64)) -> int:
    """Images per UNet call that fit in `free_bytes` of GPU memory (weights already loaded), from the
    measured per-row peak; at least 1, at most MAX_AUTO_BATCH.

    The decoder runs after the UNet on its own sub-batch (--decode-batch-size), so its peak does not add to
    the UNet's and does not grow with the batch; its own out-of-memory back-off shrinks only the sub-batch.
    """
    per_image = ROWS_PER_IMAGE * UNET_ROW_BYTES[dtype] * _area_scale(latent_shape)
    return int(max(1, min(MAX_AUTO_BATCH, usable_bytes(free_bytes) // per_image)))


def calibrated_batch_size(current: int, images: int, start_bytes: int, peak_bytes: int, budget_bytes: int) -> int:
    """The batch size the allocator's own peak of a finished batch of `images` allows.

    Every byte the batch added is charged per image (its fixed part too), so the answer errs small and is
    never below `current`: the estimate only grows a batch that used less than the budget.
    """
    used = max(1, peak_bytes - start_bytes)
    per_image = used / max(1, images)
    fits = int((budget_bytes - start_bytes) // per_image)
    return int(max(current, min(MAX_AUTO_BATCH, fits)))


def default_batch_size(device: torch.device, dtype: str = "bfloat16", latent_shape: Sequence[int] = (3, 64, 64)) -> int:
    """Images per UNet call when --batch-size is 0: small on CPU, sized from this GPU's free memory on CUDA.

    Reading free memory creates a CUDA context on the device: call it only in the process that samples there.
    """
    if device.type != "cuda":
        return CPU_BATCH
    free, _ = torch.cuda.mem_get_info(device)
    return auto_batch_size(free, dtype, latent_shape)


def default_decode_batch_size(device: torch.device) -> int:
    """Latents per decoder call when --decode-batch-size is 0: one at a time on CPU, 8 on CUDA.

    On CPU one-at-a-time decoding used less CPU time than whole-batch decoding and cut a 4-image
    batch's peak RSS from 6.0 to 3.7 GiB (docs/performance.md). On CUDA a 512x512 float32 decode holds
    ~384 MiB per image, so a whole 64-128 image batch would not fit; 8 keeps the decoder's share of
    memory small. Every image decodes on its own, so only float rounding of the batched kernels can
    depend on it.
    """
    return 1 if device.type == "cpu" else 8
