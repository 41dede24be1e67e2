"""Image files with their synthetic-image marker: one JSON object in a JPEG comment or a PNG iTXt chunk.

A file copied out of its folder still says that it is synthetic, what made it and how (docs/generating.md,
"Provenance inside every file"). Read it back with `read_provenance(path)` or Pillow: `Image.open(f).info`.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

GENERATOR = "cxrgen"
NOTICE = ("Synthetic chest X-ray made by a diffusion model; not an image of a real patient. "
          "Research use only, not for clinical use.")
PNG_KEY = "Comment"  # the PNG spec's keyword for free text: exiftool and viewers show it as they show a JPEG comment
_JPEG_LIMIT = 65533  # bytes one JPEG COM segment holds

# Metadata columns copied into the marker, in this order (a fixed order keeps a resumed file byte-identical).
ROW_FIELDS = ("image_id", "seed", "prompt", "negative_prompt", "guidance_scale", "steps", "scheduler",
              "model_name", "model_version", "autoencoder_md5", "diffusion_model_md5")


def provenance_of(row: dict) -> dict:
    """The marker of one image from its metadata row (a journal record or a metadata.parquet row)."""
    marker = {"synthetic": True, "notice": NOTICE, "generator": GENERATOR,
              "generator_version": row["cxrgen_version"]}
    marker.update((name, row[name]) for name in ROW_FIELDS)
    if row.get("attempt"):  # a --verify retry: its seed is the attempt's (a first try's marker is a plain run's)
        marker["attempt"] = row["attempt"]
    return marker


def encode_provenance(marker: dict) -> str:
    """Compact, deterministic JSON (no timestamps, fixed key order), ASCII so any tool prints it.

    Prompts too long for a JPEG comment segment (64 KB) are shortened to fit, with "prompt_cut": true;
    the full prompts stay in metadata.parquet.
    """
    text = json.dumps(marker, separators=(",", ":"))
    if len(text) <= _JPEG_LIMIT:
        return text
    cut = dict(marker, prompt_cut=True)
    names = [name for name in _CUT_FIELDS if isinstance(cut.get(name), str)]
    # Both prompts get the same budget of escaped bytes (a shorter one keeps all of its own), and the largest
    # budget that fits is found by bisection: a character takes 1 to 12 bytes once escaped ("é" is "\u00e9"), so
    # a cut must be measured in escaped bytes, never in characters.
    low, high = 0, max(_escaped(cut[name]) for name in names)
    while low < high:
        budget = (low + high + 1) // 2
        if len(json.dumps(_within(cut, names, budget), separators=(",", ":"))) <= _JPEG_LIMIT:
            low = budget
        else:
            high = budget - 1
    return json.dumps(_within(cut, names, low), separators=(",", ":"))


_CUT_FIELDS = ("prompt", "negative_prompt")


def _escaped(text: str) -> int:
    return len(json.dumps(text)) - 2  # without the quotes


def _within(marker: dict, names: list[str], budget: int) -> dict:
    """The marker with each named field cut to its longest start whose escaped JSON fits in `budget` bytes."""
    result = dict(marker)
    for name in names:
        text = marker[name]
        if _escaped(text) <= budget:
            continue
        low, high = 0, len(text)  # characters kept: escaped length grows with them, so bisect
        while low < high:
            keep = (low + high + 1) // 2
            if _escaped(text[:keep]) <= budget:
                low = keep
            else:
                high = keep - 1
        result[name] = text[:low]
    return result


def save_options(marker: dict | None, image_format: str) -> dict:
    """Pillow save() keyword arguments that embed the marker (none when marker is None)."""
    if marker is None:
        return {}
    text = encode_provenance(marker)
    if image_format == "png":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_itxt(PNG_KEY, text)
        return {"pnginfo": info}
    return {"comment": text.encode("ascii")}


def read_provenance(path: str | Path) -> dict | None:
    """The marker of an image file, or None when it has none (e.g. an image made by an older cxrgen)."""
    with Image.open(path) as image:
        value = image.info.get("comment") or image.info.get(PNG_KEY)
    if value is None:
        return None
    try:
        marker = json.loads(value.decode("utf-8") if isinstance(value, bytes) else value)
    except (ValueError, UnicodeDecodeError):
        return None
    return marker if isinstance(marker, dict) and marker.get("generator") == GENERATOR else None


def encode_image(pixels, image_format: str, jpeg_quality: int, provenance: dict | None = None) -> bytes:
    """8-bit grayscale JPEG or PNG bytes of an (H, W) uint8 array, no transpose or flip.

    provenance: the synthetic-image marker (cxrgen.provenance) to embed; it never changes the pixels.
    """
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)  # a 2-D uint8 array is mode "L"
    if image_format == "png":
        image.save(buffer, format="PNG", **save_options(provenance, "png"))
    else:
        image.save(buffer, format="JPEG", quality=jpeg_quality, **save_options(provenance, "jpg"))
    return buffer.getvalue()
