"""What each --dtype means on each device: the dtype chosen, TF32, and float16 attention that cannot overflow."""
from __future__ import annotations

from typing import Iterable

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BF16_CAPABILITY = (8, 0)  # Ampere: the first GPUs with bfloat16 tensor cores


def bf16_native(device: torch.device) -> bool:
    """Whether this device computes bfloat16 in hardware: a GPU of compute capability 8.0 or newer.

    Not torch.cuda.is_bf16_supported(): it counts emulation too (a V100 or T4 runs bfloat16 several times
    slower than float16) and asks the current device, not this one. Reading the capability needs no CUDA
    context, so a parent process that only plans a run can ask it.
    """
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return tuple(torch.cuda.get_device_capability(index)) >= BF16_CAPABILITY


def dtype_supported(dtype: str, device: torch.device) -> bool:
    """Whether cxrgen can sample in this dtype on this device (CPU autocast: bfloat16 only; a GPU older than
    Ampere runs bfloat16 emulated: correct but slow)."""
    if dtype == "float32":
        return True
    if device.type == "cuda":
        return dtype in DTYPES
    return dtype == "bfloat16"


def resolve_dtype(dtype: str, device: torch.device | Iterable[torch.device], recorded: str | None = None) -> str:
    """auto -> the dtype a resumed run was made in when these devices can run it; else float32 unless every
    device is a GPU, then bfloat16 where every GPU has it in hardware and float16 otherwise."""
    devices = [device] if isinstance(device, torch.device) else list(device)
    if dtype != "auto":
        return dtype
    if recorded in DTYPES and all(dtype_supported(recorded, d) for d in devices):
        return recorded
    if not devices or any(d.type != "cuda" for d in devices):
        return "float32"
    return "bfloat16" if all(bf16_native(d) for d in devices) else "float16"


def run_dtypes(dtype: str, devices: Iterable[torch.device], recorded: str | None,
               recorded_devices: Iterable[str] = ()) -> tuple[str, str]:
    """(the run's dtype, compared on resume; the dtype this process samples in).

    They differ in one case: a 16-bit run made on a GPU and resumed on the CPU with --dtype auto samples in
    float32 there. CPU autocast keeps GroupNorm, LayerNorm and softmax in 16 bits where CUDA autocast runs
    them in float32, so CPU bfloat16 is a third computation, further from the GPU's than float32 is, and
    slow on CPUs without AMX; each image's metadata row records the dtype it was made in.
    """
    devices = list(devices)
    made_on_gpu = any(str(d).startswith("cuda") for d in recorded_devices)
    if dtype == "auto" and recorded in ("bfloat16", "float16") and made_on_gpu and devices and \
            all(d.type == "cpu" for d in devices):
        return recorded, "float32"
    resolved = resolve_dtype(dtype, devices, recorded)
    return resolved, resolved


def set_precision(device: torch.device, dtype: str) -> None:
    """TF32 only for 16-bit runs on CUDA (for what stays float32 there: the decoder, the text encoder), so that
    --dtype float32 means IEEE float32 everywhere; cuDNN's autotuner on CUDA, where every step has the same
    shapes. The switches are global: the engine built last in a process decides them."""
    tf32 = device.type == "cuda" and dtype != "float32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32  # PyTorch's default is True: float32 convolutions would be TF32
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def fold_attention_scale(model: torch.nn.Module) -> int:
    """Scale each attention block's query projection by 1/sqrt(head width) and its logit scale to 1.

    MONAI forms q @ k^T first and scales it after; under float16 autocast that product is stored in float16
    before the scale, and with 512- and 768-wide heads it overflows to inf, then softmax gives NaN. With the
    scale inside the query the product is already the logits. The same mathematics (rounding aside), no
    extra work; used for float16 only, so float32 and bfloat16 keep their exact arithmetic. Returns the
    number of blocks changed.
    """
    from monai.networks.blocks.crossattention import CrossAttentionBlock
    from monai.networks.blocks.selfattention import SABlock

    changed = 0
    for block in model.modules():
        if not isinstance(block, (SABlock, CrossAttentionBlock)) or block.scale == 1.0 or \
                getattr(block, "rel_positional_embedding", None) is not None:  # it reads the unscaled q
            continue
        if isinstance(block.to_q, torch.nn.Linear):
            rows = slice(None)
            linear = block.to_q
        else:  # one combined qkv projection: the query is its first inner_dim outputs
            rows = slice(0, block.inner_dim)
            linear = block.qkv
        with torch.no_grad():
            linear.weight[rows] *= block.scale
            if linear.bias is not None:
                linear.bias[rows] *= block.scale
        block.scale = 1.0
        changed += 1
    return changed
