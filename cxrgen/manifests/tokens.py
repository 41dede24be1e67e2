"""CLIP token counts without torch: the SD 2.x tokenizer shipped with cxrgen, a folder, or the local HF cache."""
from __future__ import annotations

from pathlib import Path

from cxrgen.errors import InputError, first_line
from cxrgen.pins import DEFAULT_TEXT_ENCODER

MAX_TOKENS = 77  # the text encoder's context, start and end tokens included (cxrgen.model.text_encoder.MAX_TOKENS)
# A copy of tokenizer/ of the default text encoder's repo: vocab and merges are 1.5 MB, and with them a
# manifest can be checked on any machine, offline, without the 1.3 GB text encoder.
SHIPPED_TOKENIZER = Path(__file__).parent.parent / "data" / "sd2-tokenizer"
_FILES = ("vocab.json", "merges.txt")


class TokenCounter:
    """Counts CLIP tokens the way generation does (start and end tokens included, nothing truncated)."""

    def __init__(self, tokenizer, source: str):
        self.tokenizer = tokenizer
        self.source = source
        self._cache: dict[str, int] = {}

    def count(self, text: str) -> int:
        """Tokens of one text, start and end included."""
        found = self._cache.get(text)
        if found is None:
            found = self._cache[text] = len(self.tokenizer(text, truncation=False)["input_ids"])
        return found

    def counts(self, texts: list[str]) -> list[int]:
        """Tokens of each text; the distinct new ones are tokenized in one batch."""
        new = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if new:
            for text, ids in zip(new, self.tokenizer(new, truncation=False)["input_ids"]):
                self._cache[text] = len(ids)
        return [self._cache[t] for t in texts]


def load_counter(source: str | None = None, option: str = "--tokenizer") -> TokenCounter:
    """A counter from the shipped tokenizer (None or the default text encoder), a folder, or a cached repo id.

    A folder may hold the tokenizer files or a tokenizer/ subfolder (a text-encoder folder). A repo id other
    than the default is read from the local Hugging Face cache only, never the network.
    """
    from transformers import (
        CLIPTokenizer,  # imported here: it takes a second, and torch is never needed
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if source is None or source == DEFAULT_TEXT_ENCODER:
        return TokenCounter(CLIPTokenizer.from_pretrained(str(SHIPPED_TOKENIZER)), DEFAULT_TEXT_ENCODER)
    local = Path(source).expanduser()
    if local.is_dir():
        folder = local / "tokenizer" if (local / "tokenizer").is_dir() else local
    elif local.is_absolute() or source.startswith((".", "~")) or source.count("/") != 1:
        raise InputError(f"{option} {source}: no such folder; give a folder with the SD 2.x tokenizer files "
                         "(or a text-encoder folder holding tokenizer/)")
    else:
        folder = _cached_tokenizer(source, option)
    # transformers 5 builds an empty two-token tokenizer from a folder without these files, silently
    missing = [name for name in _FILES if not (folder / name).is_file()]
    if missing:
        raise InputError(f"{option} {source}: no {' or '.join(missing)} in {folder}; give a folder with the "
                         "SD 2.x tokenizer files, or a text-encoder folder holding tokenizer/")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - damaged files: one line naming the folder
        raise InputError(f"{option} {source}: the tokenizer in {folder} cannot be loaded ({first_line(exc)}); "
                         "give a folder with the SD 2.x tokenizer files") from None
    if len(tokenizer) < 1000:
        raise InputError(f"{option} {source}: the tokenizer in {folder} has only {len(tokenizer)} tokens; give a "
                         "folder with the SD 2.x tokenizer files")
    return TokenCounter(tokenizer, source if not local.is_dir() else str(folder))


def _cached_tokenizer(repo: str, option: str) -> Path:
    """The tokenizer/ folder of a repo's snapshot in the local Hugging Face cache; never the network."""
    from huggingface_hub import try_to_load_from_cache

    found = [try_to_load_from_cache(repo, f"tokenizer/{name}") for name in _FILES]
    if not all(isinstance(f, str) for f in found):
        raise InputError(f"{option} {repo}: the tokenizer of this Hugging Face repo is not in the local cache "
                         f"(cxrgen does not download it to count tokens); give {option} DIR, a folder with the "
                         "SD 2.x tokenizer files")
    return Path(found[0]).parent
