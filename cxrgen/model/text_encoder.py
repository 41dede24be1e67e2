"""The CLIP tokenizer and text encoder that turn prompts into prompt_embeds, cached per prompt."""
from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from cxrgen.config import split_ref
from cxrgen.errors import InputError, first_line
from cxrgen.files import file_digest
from cxrgen.hub.components import is_staged, read_marker, text_encoder_component
from cxrgen.hub.download import stage
from cxrgen.hub.sources import hub_unreachable

MAX_TOKENS = 77
MIN_VOCAB = 1000  # a real CLIP vocabulary has 49,408 tokens; fewer means the tokenizer files were not found
# Distinct prompt_embeds kept (on the CPU, or on the GPU that encodes them), least recently used dropped first:
# about 315 kB each at width 1024, so ~80 MB per worker. Plan order keeps a row's images together, so a prompt
# rarely returns later.
CACHE_LIMIT = 256
# The weight files transformers looks for in a text_encoder folder, in the order it prefers them.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class TokenInfo:
    """How a prompt tokenised: count includes the start and end tokens; truncated means > 77."""

    token_count: int
    truncated: bool


class TextEncoder:
    """Tokenizer + CLIPTextModel; encode() returns the last hidden state, one row per prompt."""

    def __init__(self, tokenizer, model, source: str, weights: tuple[str, str, str] | None = None,
                 cache_limit: int = CACHE_LIMIT):
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.source = source
        # (where, subfolder, "folder" or "hub"): where the weights were loaded from, for the fingerprint
        self.weights = weights
        self.cache_limit = cache_limit
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._fingerprint: str | None = None
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
    def encode(self, prompts: list[str], device: torch.device, batched: bool = False) -> torch.Tensor:
        """prompt_embeds of shape (len(prompts), 77, width), computed once per distinct recent prompt.

        batched=False: one encoder call per uncached prompt, its embedding kept on the CPU, so that it cannot
        depend on which prompts share a batch. batched=True (a GPU): every uncached prompt of the call in one
        encoder call and the cache kept on `device`: no host-device round trip per prompt. Every sequence is
        padded to 77 tokens, so the rows are the same computation either way, up to the rounding of batched
        kernels (on the CPU they came out bit-identical for the tiny and the full-size text encoder).
        """
        # Held locally too: a batch with more distinct prompts than the cache holds still gets all of them.
        embeds: dict[str, torch.Tensor] = {}
        missing: list[str] = []
        with self._lock:
            for prompt in dict.fromkeys(prompts):
                embed = self._cache.get(prompt)
                if embed is not None:
                    self._cache.move_to_end(prompt)
                    embeds[prompt] = embed
                else:
                    missing.append(prompt)
        for group in ([missing] if batched and missing else [[p] for p in missing]):
            with self._lock:  # the tokenizer keeps padding state between calls
                ids = self.tokenizer(group, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                                     return_tensors="pt").input_ids
            out = self.model(ids.to(self.model.device))[0].float()
            # a row of its own (clone): a cached view would keep its whole batch's tensor alive
            rows = [row.clone() for row in out] if batched else [out[0].cpu()]
            with self._lock:
                for prompt, embed in zip(group, rows):
                    self._cache[prompt] = embeds[prompt] = embed
                while len(self._cache) > self.cache_limit:
                    self._cache.popitem(last=False)
        return torch.stack([embeds[p].to(device) for p in prompts])

    @property
    def fingerprint(self) -> str:
        """`revision:<commit>` for a hub repo, else `sha256:<hex>` of the weights loaded (hashed once)."""
        if self._fingerprint is None:
            self._fingerprint = _fingerprint(self.weights, self.model)
        return self._fingerprint


def text_encoder_fingerprint(text: TextEncoder) -> str:
    """Identity of the text encoder's weights: `revision:<commit>` (hub repo) or `sha256:<hex>` (folder)."""
    return text.fingerprint


def _fingerprint(weights: tuple[str, str, str] | None, model) -> str:
    if weights is None:
        raise ValueError("this TextEncoder was not made by load_text_encoder; its weights file is unknown")
    where, subfolder, kind = weights
    if kind == "hub":
        commit = getattr(model.config, "_commit_hash", None)  # set by transformers 4.x, gone in 5.x
        resolved = None
        for name in WEIGHT_FILES:
            resolved = _cached_hub_file(where, f"{subfolder}/{name}" if subfolder else name)
            if resolved is not None:
                break
        if resolved is not None and not commit:
            match = re.search(r"snapshots/([0-9a-f]{40})/", Path(resolved).as_posix())
            commit = match.group(1) if match else None
        if commit:
            return f"revision:{commit}"
        if resolved is None:
            raise ValueError(f"no weights file of {where} is in the local Hugging Face cache")
        return _weights_digest(Path(resolved))
    folder = Path(where) / subfolder if subfolder else Path(where)
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return _weights_digest(folder / name)
    raise ValueError(f"no weights file ({', '.join(WEIGHT_FILES)}) in {folder}")


def _cached_hub_file(repo: str, filename: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo, filename)
    return path if isinstance(path, str) else None


def _weights_digest(path: Path) -> str:
    """sha256 of one weights file; of a sharded checkpoint, over the index then each shard in name order."""
    if not path.name.endswith(".index.json"):
        return f"sha256:{file_digest(path, 'sha256')}"
    shards = sorted(set(json.loads(path.read_text(encoding="utf-8")).get("weight_map", {}).values()))
    digest = hashlib.sha256(file_digest(path, "sha256").encode())
    for shard in shards:
        digest.update(file_digest(path.parent / shard, "sha256").encode())
    return f"sha256:{digest.hexdigest()}"


def load_text_encoder(text_encoder: str, device: torch.device | str = "cpu", *, cache_dir: str | Path | None = None,
                      offline: bool = False, source=None, progress: bool = True, log=None) -> TextEncoder:
    """Load from a local directory (with or without tokenizer/ and text_encoder/ subfolders) or a hub repo.

    A repo id (REPO[@REVISION]) is looked up, in order, as a copy staged in cache_dir by `cxrgen download`,
    in the local Hugging Face cache, and, unless offline, downloaded into cache_dir (cxrgen.hub.download).
    Without cache_dir a repo not in the Hugging Face cache is loaded from the hub by transformers.
    """
    from transformers import CLIPTextModel, CLIPTokenizer

    local = Path(text_encoder).expanduser()
    if local.is_dir():
        split = (local / "tokenizer").is_dir()
        where = (str(local), "tokenizer" if split else None, "text_encoder" if split else None)
        tried = f"local folder {local}"
    elif local.is_absolute() or text_encoder.startswith((".", "~")):
        raise InputError(f"--text-encoder {text_encoder}: no such folder; give a folder holding tokenizer/ and "
                         "text_encoder/ or a Hugging Face repo id")
    else:
        repo, revision = split_ref(text_encoder)
        where = (repo, "tokenizer", "text_encoder")
        tried = f"Hugging Face repo {text_encoder} (subfolders tokenizer/, text_encoder/)"

    def fail(reason: str) -> InputError:
        return InputError(f"cannot load the text encoder from {tried}: {reason}; on an offline machine or if the "
                          "repo is gone, pass --text-encoder /path/to/local/copy (a folder with tokenizer/ and "
                          "text_encoder/)")

    def load(folder=where[0], **options):
        return (CLIPTokenizer.from_pretrained(folder, subfolder=where[1] or "", **options),
                CLIPTextModel.from_pretrained(folder, subfolder=where[2] or "", **options))

    kind, commit = "folder" if local.is_dir() else "hub", None
    try:
        if kind == "folder":
            tokenizer, model = load()
        elif cache_dir is None:
            tokenizer, model = _load_from_hub(load, fail, revision)
        else:
            # 1. staged by `cxrgen download`, 2. the Hugging Face cache, 3. staged now (unless offline)
            component = text_encoder_component(text_encoder, cache_dir)
            if not is_staged(component):
                try:
                    return _finish(*load(local_files_only=True, **_revision(revision)), text_encoder, device,
                                   where, "hub", None, fail)
                except InputError:
                    raise
                except Exception:  # noqa: BLE001 - not (or not wholly) in the Hugging Face cache
                    stage(component, source, offline=offline, progress=progress, log=log)
            kind, commit = "staged", (read_marker(component) or {}).get("revision")
            tokenizer, model = load(str(component.folder))
            where = (str(component.folder), *where[1:])
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - hub, network and file errors all get one actionable line
        raise fail(first_line(exc)) from None
    return _finish(tokenizer, model, text_encoder, device, where, kind, commit, fail)


def _finish(tokenizer, model, text_encoder: str, device, where: tuple, kind: str, commit: str | None,
            fail) -> TextEncoder:
    if len(tokenizer) < MIN_VOCAB:
        # transformers builds an empty tokenizer, silently, from a folder without tokenizer files; every
        # prompt would then become unknown tokens and every image would ignore its prompt
        raise fail(f"its tokenizer has {len(tokenizer)} tokens (the SD 2.x CLIP tokenizer has 49,408): the "
                   "tokenizer files (vocab.json, merges.txt) are missing")
    text = TextEncoder(tokenizer, model.to(device), text_encoder,
                       weights=(where[0], where[2] or "", "hub" if kind == "hub" else "folder"))
    if commit:  # a staged copy is identified by the commit it was fetched at, as a hub-cache copy is
        text._fingerprint = f"revision:{commit}"
    return text


def _revision(revision: str | None) -> dict:
    return {"revision": revision} if revision else {}


def _load_from_hub(load, fail, revision: str | None):
    """The local Hugging Face cache first; the network only after a quick probe says the hub answers."""
    from huggingface_hub import constants

    try:
        return load(local_files_only=True, **_revision(revision))
    except Exception:  # noqa: BLE001 - any miss or damage in the cache: the hub may still have it
        pass
    if constants.HF_HUB_OFFLINE:
        raise fail("it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    endpoint = constants.ENDPOINT
    problem = hub_unreachable(endpoint)
    if problem:
        raise fail(f"it is not in the local Hugging Face cache and the hub {endpoint} is unreachable ({problem})")
    return load(**_revision(revision))
