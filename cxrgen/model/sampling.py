"""Pure tensor code: initial noise per seed, batched classifier-free guidance, decoding to uint8 (finite only)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

# denoise(x, timesteps, context) -> model output in float32; the caller owns autocast and device.
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Decoder = Callable[[torch.Tensor], torch.Tensor]


class NonFinite(Exception):
    """NaN or inf where pixels come from; `rows` are the images (rows of the batch) affected."""

    def __init__(self, rows: list[int], stage: str):
        super().__init__(f"non-finite values in the {stage} of row(s) {rows}")
        self.rows, self.stage = rows, stage


def nonfinite_rows(x: torch.Tensor) -> list[int]:
    """Indices of the rows of x that hold a NaN or an inf: one host-device transfer of B booleans."""
    finite = torch.isfinite(x).flatten(1).all(1).cpu()
    return [] if bool(finite.all()) else [i for i, ok in enumerate(finite.tolist()) if not ok]


def initial_latents(seeds: Sequence[int], latent_shape: Sequence[int]) -> torch.Tensor:
    """The noise contract: one CPU generator per image, randn((1, C, h, w)) in float32, stacked."""
    return torch.cat([
        torch.randn((1, *latent_shape), generator=torch.Generator("cpu").manual_seed(int(s)), dtype=torch.float32)
        for s in seeds
    ])


@torch.no_grad()
def sample_cfg(denoise: Denoiser, latents: torch.Tensor, prompt_embeds: torch.Tensor,
               negative_prompt_embeds: torch.Tensor, guidance_scale: torch.Tensor, scheduler,
               on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Classifier-free guided sampling of a batch: one denoiser call on 2B rows per step.

    Rows are ordered [unconditional..., conditional...] as in the bundle's sampler; guidance_scale
    holds one weight per image. Latents and the scheduler arithmetic stay in float32.
    """
    latents = latents.float()
    context = torch.cat([negative_prompt_embeds, prompt_embeds])
    g = guidance_scale.float().view(-1, *([1] * (latents.dim() - 1)))
    for i, t in enumerate(scheduler.timesteps):
        # 1. one call on both halves of the guidance pair
        x_in = torch.cat([latents, latents])
        timesteps = torch.full((x_in.shape[0],), int(t), device=latents.device, dtype=torch.long)
        out = denoise(x_in, timesteps, context).float()
        # 2. guidance, per image
        uncond, cond = out.chunk(2)
        model_output = uncond + g * (cond - uncond)
        # 3. scheduler update in float32
        latents, _ = scheduler.step(model_output, t, latents)
        if on_step is not None:
            on_step(i)
    return latents


@torch.no_grad()
def decode_to_uint8(decode: Decoder, latents: torch.Tensor, scale_factor: float,
                    decode_batch_size: int = 0) -> torch.Tensor:
    """Decode latents / scale_factor in sub-batches and convert as the reference: clip, x255, truncate.

    Raises NonFinite rather than convert: the cast to uint8 would turn NaN into 0, a black image.
    """
    step = decode_batch_size or latents.shape[0]
    images = []
    for start in range(0, latents.shape[0], step):
        image = decode(latents[start:start + step] / scale_factor).float()
        bad = nonfinite_rows(image)
        if bad:
            raise NonFinite([start + row for row in bad], "decoded images")
        images.append(to_uint8(image))
    return torch.cat(images)


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) floats in [0, 1] -> (B, H, W) uint8 of channel 0, truncating like the reference."""
    return (image[:, 0].clamp(0, 1) * 255).to(torch.uint8).cpu()
