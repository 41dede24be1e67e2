"""Checkpoint files: safe loading, the old GenerativeModels key layout, and key/shape checks."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from cxrgen.errors import InputError
from cxrgen.files import file_digest


def md5sum(path: Path) -> str:
    """Hex md5 of a file (the bundle publishes md5s of its checkpoints)."""
    return file_digest(path, "md5")


def old_key(new_key: str) -> str:
    """The GenerativeModels name of one MONAI-core parameter (the inverse of load_old_state_dict)."""
    key = new_key.replace("postconv", "conv")
    if "transformer_blocks" in key and ".out_proj." in key:
        return key.replace(".out_proj.", ".to_out.0.")
    for part in ("to_q", "to_k", "to_v"):
        if f".attn.{part}." in key:  # spatial attention; transformer blocks use attn1/attn2
            return key.replace(f".attn.{part}.", f".{part}.")
    if ".attn.out_proj." in key:
        return key.replace(".attn.out_proj.", ".proj_attn.")
    return key


def old_layout(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Every parameter name and shape a GenerativeModels checkpoint of this architecture holds."""
    return {old_key(k): tuple(v.shape) for k, v in model.state_dict().items()}


def to_old_layout(state_dict: dict) -> dict:
    """Rename a MONAI-core state_dict to the GenerativeModels layout (used to build test bundles)."""
    return {old_key(k): v for k, v in state_dict.items()}


def read_state_dict(path: Path) -> dict:
    """Load tensors only: safetensors, or torch.load with weights_only=True (never a full unpickle)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise InputError(f"checkpoint {path} cannot be read ({_reason(exc)}); re-download the bundle") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError(f"checkpoint {path} holds a {type(state).__name__}, not a state_dict")
    return state


def _reason(exc: Exception) -> str:
    """One short line for an exception whose text may span many lines (torch's are long, with colours)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    if text.startswith("Weights only load failed"):
        return "it holds Python objects, not only tensors, and cxrgen never unpickles those (weights_only=True)"
    first = text.splitlines()[0][:200] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def load_into(model: torch.nn.Module, state: dict, path: Path) -> str:
    """Check every key and shape, then load; returns the layout found ("old" or "new")."""
    new_layout = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # Judge the file against the layout it is closest to, so that one missing key is named as itself.
    layout, expected = min((("new", new_layout), ("old", old_layout(model))),
                           key=lambda pair: len(set(pair[1]) ^ set(state)))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {', '.join(map(repr, missing[:3]))}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(map(repr, unexpected[:3]))}")
        raise InputError(f"checkpoint {path} does not match the architecture in configs/inference.json: "
                         f"{'; '.join(parts)}; check that the bundle's files belong together")
    _check_shapes(state, expected, path)
    if layout == "old":
        # The old layout differs only in names (old_key is the inverse of MONAI's load_old_state_dict), so
        # the tensors are renamed here: load_old_state_dict would copy into the model's own tensors, which
        # are empty placeholders on the meta device when the model was built without initialising it.
        state = {new: state[old_key(new)] for new in new_layout}
    # assign: the loaded tensors become the parameters, so a model built on the meta device (no random
    # initialisation, no memory) is complete after this; strict=True re-checks every key
    model.load_state_dict(state, strict=True, assign=True)
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise InputError(f"checkpoint {path} left {len(left)} tensor(s) of the network unset, e.g. {left[0]!r}; "
                         "check that the bundle's files belong together")
    return layout


def _check_shapes(state: dict, expected: dict, path: Path) -> None:
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise InputError(f"checkpoint {path}, key {key!r}: shape {tuple(state[key].shape)} "
                             f"but the architecture needs {shape}; check configs/inference.json")
