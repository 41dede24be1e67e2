"""The one place a run's settings live: a frozen dataclass, saved to run.json."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cxrgen.errors import InputError
from cxrgen.files import refuse_url
from cxrgen.pins import DEFAULT_MODEL, DEFAULT_TEXT_ENCODER

SCHEDULERS = ("ddim", "dpmpp2m")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Spellings other tools use; run.json records the canonical name, so a resume is not refused over spelling.
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "float": "float32", "bf16": "bfloat16",
                 "fp16": "float16", "f16": "float16", "half": "float16"}
IMAGE_FORMATS = ("jpg", "png")
FILE_NAMES = ("index", "id")
# Fields whose default changed: a run.json without the field was made with the old value.
LEGACY_DEFAULTS = {"file_names": "id"}
MANIFEST_FORMATS = ("auto", "csv", "tsv", "parquet")
ENGINES = ("local", "ray")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class RunConfig:
    """Every setting of one run; per-row manifest columns override the run-wide defaults."""

    manifest: str  # absolute path of the manifest file
    out: str  # absolute path of the output folder, or an object-store URL (s3://bucket/prefix)
    manifest_format: str = "auto"  # "auto" picks csv/tsv/parquet from the file suffix
    prompt_column: str = "prompt"  # column holding the report sentence
    allow_empty_prompt: bool = False  # blank prompts become unconditional samples instead of an error
    model: str = DEFAULT_MODEL  # bundle directory, or bundle name downloaded into cache_dir
    text_encoder: str = DEFAULT_TEXT_ENCODER  # Hugging Face repo id or local directory
    cache_dir: str = ""  # where bundles are downloaded; "" means $CXRGEN_HOME or ~/.cache/cxrgen
    num_images: int = 1  # images per manifest row, unless the row's num_images column says otherwise
    guidance_scale: float = 7.0  # classifier-free guidance weight, as the model card uses
    negative_prompt: str = ""  # replaces the empty unconditional prompt when not empty
    seed: int = 0  # base seed; each image's seed derives from it, the row identity and the sample index
    steps: int = 50  # num_inference_steps of the scheduler, as the model card uses
    scheduler: str = "ddim"  # "ddim" (the model card's) or "dpmpp2m" (DPM-Solver++(2M), fewer steps)
    batch_size: int = 0  # images per UNet call; 0 = 4 on CPU, sized from each GPU's free memory and first batch
    decode_batch_size: int = 0  # latents per decoder call; 0 = 1 on CPU (least memory), 8 on CUDA
    device: str = "auto"  # "auto" (every visible GPU, else CPU), "cpu", "cuda" (all GPUs; a rank's own), "cuda:N", list
    dtype: str = "auto"  # "auto" = float32 on CPU, bfloat16 autocast on CUDA (float16 below compute capability 8.0)
    channels_last: bool = False  # channels_last memory format for the UNet (measure it before relying on it)
    compile: bool = False  # torch.compile the UNet; compile time is reported separately
    image_format: str = "jpg"  # "jpg" or "png" (lossless)
    jpeg_quality: int = 95  # JPEG quality 1-95, ignored for png
    # "index": images/00000/00000042.jpg, no manifest text in any path, so tools that read split names from
    # paths (datasets' imagefolder takes "test-3.jpg" for a test split) see one dataset; "id":
    # images/00000/<image_id>.jpg, the only layout of earlier cxrgen builds (their run.json lacks this field).
    file_names: str = "index"
    workers: int = 1  # worker processes on this machine (CPU: N processes; CUDA: one per device)
    rank_wait: float = 60.0  # seconds a rank whose share is done waits at least for other ranks to start
    verify: bool = False  # at start, re-read, checksum and decode every recorded image (else one stat each)
    quiet: bool = False  # no progress bar or summary
    verbose: bool = False  # let MONAI's and transformers' own log lines through, in worker processes too
    offline: bool = False  # never touch the network: models must be in cache_dir (`cxrgen download`) or folders
    # --verify: every image whose row has a positive label is scored by a torchxrayvision classifier and made
    # again, with the next attempt's seed, until each positive label reaches min_score (docs: "Verified generation")
    verify_labels: bool = False
    min_score: float = 0.5  # calibrated score a label must reach (0.5 = the release's operating point)
    max_attempts: int = 8  # attempts per image at most; then the best one is kept with verified = false
    verify_negatives: bool = False  # findings labelled 0 must also stay below min_score (all-negative rows too)
    keep_rejected: bool = False  # write rejected attempts to OUT/rejected/ with their own metadata.parquet
    verifier_weights: str = ""  # torchxrayvision release name or release file; "" = pins.VERIFIER_RELEASE
    label_map: str = ""  # JSON file label column -> pathology, as `cxrgen evaluate --label-map`; "" = built-in map
    # Where the batches run (placement and speed, never pixels: not compared on resume). "local": this machine's
    # processes (--workers, --device, torchrun/Slurm ranks); "ray": a pool of Ray actors that each hold the models.
    engine: str = "local"
    ray_address: str = ""  # Ray cluster to join: host:port, ray://host:port or auto; "" starts a Ray on this machine
    ray_workers: str = "auto"  # actors: "auto" (one per GPU of the cluster, else one per node), N, or MIN-MAX to autoscale
    ray_gpus_per_worker: float | None = None  # GPUs per actor: None = 1 when the cluster has GPUs, else 0 (CPU actors)

    def __post_init__(self) -> None:
        for flag, value in (("MANIFEST", self.manifest), ("--model", self.model),
                            ("--text-encoder", self.text_encoder), ("--cache-dir", self.cache_dir)):
            refuse_url(value, flag)
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))  # frozen: normalised once, here
        _check_choice("scheduler", self.scheduler, SCHEDULERS)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("image-format", self.image_format, IMAGE_FORMATS)
        _check_choice("file-names", self.file_names, FILE_NAMES)
        _check_choice("manifest-format", self.manifest_format, MANIFEST_FORMATS)
        _check_choice("engine", self.engine, ENGINES)
        ray_worker_bounds(self.ray_workers)
        gpus = self.ray_gpus_per_worker
        if gpus is not None and (isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not 0 <= gpus <= 1):
            raise InputError(f"--ray-gpus-per-worker {gpus!r}: use a number from 0 (CPU workers) to 1; a worker "
                             "samples on one GPU, and a fraction such as 0.5 puts two workers on each GPU")
        _check_range("steps", self.steps, 1, 1000)
        _check_range("num-images", self.num_images, 0, 100_000)
        _check_range("batch-size", self.batch_size, 0, 4096)
        _check_range("decode-batch-size", self.decode_batch_size, 0, 4096)
        _check_range("jpeg-quality", self.jpeg_quality, 1, 95)
        _check_range("workers", self.workers, 1, 256)
        _check_range("seed", self.seed, 0, 2**63 - 1)
        if not (0 <= self.rank_wait <= 86_400):
            raise InputError(f"--rank-wait {self.rank_wait}: use a number of seconds from 0 to 86400")
        if not (isinstance(self.min_score, (int, float)) and 0.0 <= self.min_score <= 1.0):
            raise InputError(f"--min-score {self.min_score}: use a calibrated score from 0 to 1 (0.5 is the "
                             "classifier's operating point)")
        _check_range("max-attempts", self.max_attempts, 1, 1000)
        if not (0 <= self.guidance_scale <= 100):
            raise InputError(f"--guidance-scale {self.guidance_scale}: use a value between 0 and 100")
        devices = [d.strip() for d in self.device.split(",")]
        if not all(_DEVICE.fullmatch(d) for d in devices) or (len(devices) > 1 and "auto" in devices):
            raise InputError(f"--device {self.device!r}: use auto, cpu, cuda, cuda:N (N a GPU number such as 0) "
                             "or a list such as cuda:0,cuda:2")

    def to_dict(self) -> dict:
        """The settings as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        """Rebuild a config saved by to_dict, ignoring fields a newer cxrgen added."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**LEGACY_DEFAULTS, **{k: v for k, v in data.items() if k in names}})


# The --verify settings: they decide which attempt of an image is kept, so a resume must keep them too (the
# run's verifier block in run.json, weights by sha256, is what is compared; see cxrgen.runs.verify).
VERIFY_FIELDS = ("verify_labels", "min_score", "max_attempts", "verify_negatives", "keep_rejected",
                 "verifier_weights", "label_map")
# Settings that change which images exist or their pixels; a resume must match them exactly.
PIXEL_FIELDS = (
    "prompt_column", "allow_empty_prompt", "model", "text_encoder", "num_images",
    "guidance_scale", "negative_prompt", "seed", "steps", "scheduler", "image_format", "jpeg_quality",
    "file_names",
)


def ray_worker_bounds(text: str) -> tuple[int, int] | None:
    """--ray-workers: None for "auto", (N, N) for a fixed pool, (MIN, MAX) for an autoscaling one."""
    value = str(text).strip().lower()
    if value == "auto":
        return None
    low, sep, high = value.partition("-")
    if low.isdigit() and (high.isdigit() if sep else True):
        bounds = (int(low), int(high) if sep else int(low))
        if 1 <= bounds[0] <= bounds[1] <= 100_000:
            return bounds
    raise InputError(f"--ray-workers {text!r}: use auto, a number of workers such as 8, or MIN-MAX such as 2-16 "
                     "for a pool that Ray grows and shrinks with the cluster (each at least 1, MIN <= MAX)")


def canonical_dtype(dtype: str) -> str:
    """float32/bfloat16/float16 for their common short spellings (fp32, bf16, fp16, ...); others unchanged."""
    key = str(dtype).strip().lower()
    return DTYPE_ALIASES.get(key, key if key in DTYPES else dtype)


def split_ref(value: str) -> tuple[str, str | None]:
    """`NAME@VERSION` -> (NAME, VERSION); without `@` the version is None."""
    name, sep, version = value.rpartition("@")
    return (name, version or None) if sep and name else (value, None)


def _check_choice(flag: str, value: str, choices: tuple) -> None:
    if value not in choices:
        extra = f" (or {', '.join(DTYPE_ALIASES)})" if flag == "dtype" else ""
        raise InputError(f"--{flag} {value!r}: use one of {', '.join(choices)}{extra}")


def _check_range(flag: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not (low <= value <= high):
        raise InputError(f"--{flag} {value!r}: use a whole number from {low} to {high}")


def default_cache_dir(environ: dict | None = None) -> str:
    """$CXRGEN_HOME or ~/.cache/cxrgen; called by the CLI, never deep inside."""
    environ = os.environ if environ is None else environ
    return environ.get("CXRGEN_HOME") or str(Path("~/.cache/cxrgen").expanduser())


def offline_from_env(environ: dict | None = None) -> bool:
    """Whether HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE asks for no network; called by the CLI only."""
    environ = os.environ if environ is None else environ
    return any(str(environ.get(name, "")).strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def is_url(location: str) -> bool:
    """Whether an output location is a URL (SCHEME://...) rather than a local path."""
    return bool(_URL.match(str(location)))


def with_absolute_paths(config: RunConfig) -> RunConfig:
    """The config with local paths made absolute, so a run is saved, compared and resumed from anywhere.

    --model and --text-encoder stay as typed when no such folder exists here: then they name a bundle
    to download or a Hugging Face repo; --verifier-weights stays as typed when no such file exists (a release name).
    """
    def absolute(value: str, always: bool = False, file: bool = False) -> str:
        path = Path(value).expanduser()
        return str(path.resolve()) if value and (always or path.is_dir() or (file and path.is_file())) else value

    out = config.out if is_url(config.out) else absolute(config.out, True)
    return dataclasses.replace(config, manifest=absolute(config.manifest, True), out=out,
                               model=absolute(config.model), text_encoder=absolute(config.text_encoder),
                               cache_dir=absolute(config.cache_dir, True), label_map=absolute(config.label_map, True),
                               verifier_weights=absolute(config.verifier_weights, file=True))


def pixel_differences(saved: dict, current: dict) -> list[str]:
    """Describe each pixel-changing setting that differs between two run.json 'settings' dicts.

    A setting an older cxrgen did not record (absent from `saved`) is not compared.
    """
    changed = []
    for key in sorted(saved):
        if saved.get(key) != current.get(key):
            changed.append(f"{key}: {json.dumps(saved.get(key))} -> {json.dumps(current.get(key))}")
    return changed
