"""The CLIP tokenizer and text encoder that turn prompts into prompt_embeds, cached per prompt."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from cxrgen.errors import InputError

MAX_TOKENS = 77
CACHE_LIMIT = 4096  # distinct prompt_embeds kept on the CPU (about 315 kB each at width 1024)


@dataclass(frozen=True)
class TokenInfo:
    """How a prompt tokenised: count includes the start and end tokens; truncated means > 77."""

    token_count: int
    truncated: bool


class TextEncoder:
    """Tokenizer + CLIPTextModel; encode() returns the last hidden state, one row per prompt."""

    def __init__(self, tokenizer, model, source: str):
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.source = source
        self._cache: dict[str, torch.Tensor] = {}
        # The tokenizer keeps padding/truncation state between calls; callers on other threads must queue.
        self._lock = threading.Lock()

    @property
    def width(self) -> int:
        """Hidden size of the embeddings (must equal the UNet's cross_attention_dim)."""
        return int(self.model.config.hidden_size)

    def token_info(self, prompt: str) -> TokenInfo:
        """Token count before truncation, and whether the model sees all of it."""
        with self._lock:
            count = len(self.tokenizer(prompt, truncation=False)["input_ids"])
        return TokenInfo(count, count > MAX_TOKENS)

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """prompt_embeds of shape (len(prompts), 77, width), computed once per distinct prompt."""
        if len(self._cache) > CACHE_LIMIT:
            self._cache.clear()  # plan order keeps a row's images together, so old prompts rarely return
        for prompt in dict.fromkeys(prompts):
            if prompt not in self._cache:
                # One prompt per call: its embedding must not depend on which prompts share a batch.
                with self._lock:
                    ids = self.tokenizer([prompt], padding="max_length", max_length=MAX_TOKENS, truncation=True,
                                         return_tensors="pt").input_ids
                self._cache[prompt] = self.model(ids.to(self.model.device))[0][0].float().cpu()
        return torch.stack([self._cache[p] for p in prompts]).to(device)


def load_text_encoder(text_encoder: str, device: torch.device | str = "cpu") -> TextEncoder:
    """Load from a local directory (with or without tokenizer/ and text_encoder/ subfolders) or a hub repo."""
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    local = Path(text_encoder).expanduser()
    if local.is_dir():
        split = (local / "tokenizer").is_dir()
        where = (str(local), "tokenizer" if split else None, "text_encoder" if split else None)
        tried = f"local folder {local}"
    elif local.is_absolute() or text_encoder.startswith((".", "~")):
        raise InputError(f"--text-encoder {text_encoder}: no such folder; give a folder holding tokenizer/ and "
                         "text_encoder/ or a Hugging Face repo id")
    else:
        where = (text_encoder, "tokenizer", "text_encoder")
        tried = f"Hugging Face repo {text_encoder} (subfolders tokenizer/, text_encoder/)"
    try:
        tokenizer = CLIPTokenizer.from_pretrained(where[0], subfolder=where[1] or "")
        model = CLIPTextModel.from_pretrained(where[0], subfolder=where[2] or "")
    except Exception as exc:  # noqa: BLE001 - hub, network and file errors all get one actionable line
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot load the text encoder from {tried}: {reason}; on an offline machine or if the "
                         "repo is gone, pass --text-encoder /path/to/local/copy (a folder with tokenizer/ and "
                         "text_encoder/)") from None
    return TextEncoder(tokenizer, model.to(device), text_encoder)
