"""cxrgen evaluate: fidelity, diversity and label adherence of a finished run, and a verdict per image.

Reads OUT (never changes metadata.parquet or the images), runs every image once through torchxrayvision's
DenseNet (features for FID/KID, calibrated scores for adherence), and writes OUT/quality/:
scores.parquet, summary.json, report.md and its PNG plots (docs/evaluation.md).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from cxrgen import __version__
from cxrgen.config import is_url
from cxrgen.errors import InputError, RunError
from cxrgen.evaluation import metrics as em
from cxrgen.evaluation.run_files import fetch, finished_run, upload, verifier_of
from cxrgen.extras import require_extra
from cxrgen.files import atomic_write, built_aside, inside, refuse_url
from cxrgen.hub.sources import Source
from cxrgen.model.classifier import (
    FEATURES,
    RELEASE,
    Evaluator,
    load_evaluator,
    prepare,
    release_info,
    resolve_weights,
    weights_identity,
)
from cxrgen.runs.journal import EVAL_DIR, METADATA_SCHEMA
from cxrgen.runs.record import library_versions
from cxrgen.runs.state import read_run_json
from cxrgen.storage.open import open_store

FLAGS = ("unreadable", "blank", "saturated", "label_missing")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CACHE_VERSION = 1  # bump when the preprocessing or the cache layout changes
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class EvalOptions:
    """Every setting of one evaluation."""

    out: str  # a finished cxrgen run: a folder, or an object-store URL
    real: str | None = None  # folder of real PNG/JPEG images, or a CSV/Parquet table with a `path` column
    label_map: str | None = None  # JSON file column -> pathology that extends or overrides the built-in map
    min_score: float = 0.5  # calibrated score (0.5 = the release's operating point) a positive label must reach
    batch_size: int = 0  # images per DenseNet call; 0 = 8 on CPU (fastest there, measured), 64 on CUDA
    device: str = "auto"  # auto (CUDA when available, else CPU), cpu, cuda or cuda:N
    evaluator_weights: str | None = None  # a local file in the release's format instead of the cached download
    unsafe_pickle: bool = False  # load the weight file with plain torch.load: runs code from the file
    max_pairs: int = 2000  # MS-SSIM pairs per set at most (0: no diversity figures)
    cache_dir: str = ""  # $CXRGEN_HOME: weights under torchxrayvision/, real-set features under eval-cache/
    threads: int = 0  # decode/preprocess threads working ahead of the network; 0 = decode_threads()
    quiet: bool = False  # no progress bar
    offline: bool = False  # never download the weights: they must be staged (`cxrgen download --evaluator`)

    def __post_init__(self) -> None:
        for flag, value in (("--real", self.real), ("--label-map", self.label_map),
                            ("--evaluator-weights", self.evaluator_weights), ("--cache-dir", self.cache_dir)):
            refuse_url(value, flag)
        if not (0.0 <= self.min_score <= 1.0):
            raise InputError(f"--min-score {self.min_score}: use a calibrated score from 0 to 1 (0.5 is the "
                             "classifier's operating point)")
        for flag, value, low, high in (("batch-size", self.batch_size, 0, 4096),
                                       ("max-pairs", self.max_pairs, 0, 10_000_000), ("threads", self.threads, 0, 64)):
            if isinstance(value, bool) or not isinstance(value, int) or not (low <= value <= high):
                raise InputError(f"--{flag} {value!r}: use a whole number from {low} to {high}")
        if not _DEVICE.fullmatch(self.device):
            raise InputError(f"--device {self.device!r}: use auto, cpu, cuda or cuda:N")


@dataclass
class ImageSet:
    """What one pass over a set of image files produced (rows in file order)."""

    features: np.ndarray  # (N, 1024) float32, NaN rows for unreadable files
    scores: np.ndarray  # (N, P) float64, NaN rows for unreadable files
    flags: list[list[str]]  # per file: "unreadable", "blank", "saturated"
    small: dict[int, np.ndarray] = field(default_factory=dict)  # 224 x 224 uint8 crops kept for MS-SSIM

    @property
    def readable(self) -> np.ndarray:
        return np.array(["unreadable" not in f for f in self.flags], dtype=bool)


@dataclass
class EvalResult:
    """What an evaluation wrote and found; `features` hold the DenseNet features2 vectors used for FID/KID."""

    out: Path | str  # URLs (str) for a run in an object store
    summary: dict
    scores_path: Path | str
    summary_path: Path | str
    report_path: Path | str
    synthetic_features: np.ndarray  # readable synthetic images, metadata order
    real_features: np.ndarray | None  # readable real images, file order
    real_from_cache: bool = False

    def headline(self) -> list[str]:
        """The few lines the CLI prints at the end."""
        s, weights = self.summary, self.summary["evaluator"]
        flagged = ", ".join(f"{k} {v}" for k, v in s["n_flagged"].items())
        lines = ["DEMO MODEL: these images are noise; the figures below only show that the pipeline runs"] \
            if s.get("demo_model") else []
        published = {True: "the published release", False: "NOT the published release",
                     None: "not checked"}[weights["published_release"]]
        lines.append(f"evaluator: {weights['file_name']} (sha256 {weights['sha256'][:16]}...): {published}"
                     + ("" if weights["published_release"] else f" ({weights['check']})"))
        lines.append(f"images:    {s['n_images']} ({s['n_accepted']} accepted; flagged: {flagged})")
        if s["n_real"] is not None:
            cache = "features from cache" if self.real_from_cache else "features computed"
            lines.append(f"real:      {s['n_real']} images ({s['n_real_unreadable']} unreadable skipped; {cache})")
            absurd = s.get("not_meaningful", {})
            fid = f"not meaningful ({absurd['fid']['reason']})" if "fid" in absurd else _fmt(s["fid"])
            kid = f"not meaningful ({absurd['kid']['reason']})" if "kid" in absurd else \
                f"{_fmt(s['kid_mean'])} +- {_fmt(s['kid_std'])}"
            lines.append(f"FID:       {fid}   KID: {kid}"
                         + (" (biased: fewer than 1,024 images)" if s["fid_biased"] and not absurd else ""))
        lines.append(f"MS-SSIM:   within prompt {_fmt(s['ms_ssim_within_prompt'])}, random {_fmt(s['ms_ssim_random'])}"
                     + (f", real {_fmt(s['ms_ssim_real'])}" if s["n_real"] is not None else "") + " (lower = more diverse)")
        for name, f in s["findings"].items():
            lines.append(f"finding:   {name} -> {f['pathology']}: AUROC {_fmt(f['auroc'])}, agreement "
                         f"{_fmt(f['agreement'])} ({f['n_pos']} pos, {f['n_neg']} neg)")
        if s["not_evaluated"]:
            lines.append(f"not evaluated: {', '.join(s['not_evaluated'])}")
        if (s.get("verifier") or {}).get("is_evaluator"):
            lines.append("note:      the evaluator is the run's --verify classifier: its adherence figures are circular")
        lines.append(f"report:    {self.report_path}")
        return lines


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def evaluate_run(options: EvalOptions, *, weights_source: Source | None = None) -> EvalResult:
    """Evaluate the finished run in options.out and write OUT/quality/ (see the module docstring)."""
    started = time.monotonic()
    # 1. check every input before loading the network or writing anything
    require_extra()
    out = open_store(options.out if is_url(options.out) else Path(options.out).expanduser().resolve())
    table, planned = finished_run(out)
    # a metadata.parquet may come from anywhere: never read a file outside OUT (export and preview refuse too)
    names = [inside(Path("."), name).as_posix() for name in table.column("file_name").to_pylist()]
    info = release_info()
    pathologies = [name for name in info["labels"] if name]
    user_map = em.read_label_map(options.label_map, pathologies)
    label_columns = [c for c in table.column_names if c not in METADATA_SCHEMA.names]
    mapped, not_evaluated = em.map_columns(label_columns, pathologies, user_map)
    real_files, real_table = _real_files(options.real) if options.real else (None, None)
    device = _device(options.device)
    if options.batch_size == 0:
        options = dataclasses.replace(options, batch_size=64 if device.startswith("cuda") else 8)
    options = dataclasses.replace(options, threads=decode_threads(options.threads, device, os.cpu_count() or 1))
    weights = resolve_weights(options.evaluator_weights, options.cache_dir, weights_source, offline=options.offline,
                              progress=not options.quiet)
    evaluator = load_evaluator(weights, device, options.unsafe_pickle)
    timings = {"load_s": time.monotonic() - started}  # extras imported, inputs checked, network loaded

    # 2. one pass over the synthetic images; MS-SSIM pairs are chosen first so only their crops are kept
    # a bucket's images are fetched on the decode threads, one each, as they are needed
    files = [out.local / n for n in names] if out.local is not None else [functools.partial(fetch, out, n)
                                                                          for n in names]
    within, across = _run_pairs(table.column("prompt").to_pylist(), options.max_pairs)
    real_cache = _cache_path(options, evaluator, real_files, options.real) if real_files else None
    cached = _read_cache(real_cache) if real_cache else None
    total = len(files) + (len(real_files) if real_files and cached is None else 0)
    bar = tqdm(total=total, unit="img", desc="cxrgen evaluate", disable=options.quiet, file=sys.stderr,
               dynamic_ncols=True)
    real_pairs = em.random_pairs(len(real_files), options.max_pairs, np.random.default_rng(em.PAIR_SEED)) \
        if real_files and cached is None else []  # own generator: cached pairs must not depend on the run
    real_images = None
    try:
        synthetic = _image_pass(evaluator, files, {i for pair in within + across for i in pair}, options, bar)
        # 3. the real set: from the cache when its files are unchanged, else one pass like the synthetic one
        if real_files is not None and cached is None:
            real_images = _image_pass(evaluator, real_files, {i for pair in real_pairs for i in pair}, options, bar)
    finally:
        bar.close()
    timings["image_pass_s"] = time.monotonic() - started - timings["load_s"]
    real = cached
    if real_images is not None:
        readable_real = real_images.readable
        if not readable_real.any():
            raise InputError(f"--real {options.real}: none of its {len(real_files)} image files could be read; "
                             "give a folder or table of readable PNG/JPEG images")
        mark = time.monotonic()
        real = {"features": real_images.features[readable_real], "scores": real_images.scores[readable_real],
                "rows": np.flatnonzero(readable_real), "ms_ssim": em.ms_ssim_values(real_images.small, real_pairs)}
        timings["ms_ssim_real_s"] = time.monotonic() - mark
        _write_cache(real_cache, real)

    # 4. figures: fidelity (with --real), diversity, label adherence, then each image's verdict
    readable = synthetic.readable
    n_real = None if real is None else int(real["features"].shape[0])
    mark = time.monotonic()
    fidelity = em.fid_kid(synthetic.features[readable], real["features"]) if real is not None else {}
    # a figure its definition rules out for these features is withheld, with the reason, never printed as a result
    absurd = em.not_meaningful(synthetic.features[readable], real["features"], fidelity) if real is not None else {}
    timings["fid_kid_s"] = time.monotonic() - mark
    mark = time.monotonic()
    ms_ssim = {"within_prompt": em.ms_ssim_values(synthetic.small, within),
               "random": em.ms_ssim_values(synthetic.small, across),
               "real": None if real is None else real["ms_ssim"]}
    timings["ms_ssim_s"] = time.monotonic() - mark + timings.pop("ms_ssim_real_s", 0.0)
    columns = {name: i for i, name in enumerate(evaluator.pathologies)}
    states = {c: [em.label_state(v) for v in table.column(c).to_pylist()] for c in mapped}
    findings = {c: {"pathology": p, **em.adherence(states[c], synthetic.scores[:, columns[p]], options.min_score)}
                for c, p in mapped.items()}
    flags = _verdicts(synthetic, states, mapped, columns, options.min_score)
    summary = {
        "out": str(out), "n_images": int(table.num_rows), "n_real": n_real,
        "n_real_files": None if real is None else len(real_files),
        "n_real_unreadable": None if real is None else len(real_files) - n_real,
        "real_features_cached": None if real is None else cached is not None,
        "fid": None if "fid" in absurd else fidelity.get("fid"),
        "kid_mean": None if "kid" in absurd else fidelity.get("kid_mean"),
        "kid_std": None if "kid" in absurd else fidelity.get("kid_std"),
        "not_meaningful": {name: {"computed": fidelity.get("fid" if name == "fid" else "kid_mean"), "reason": why}
                           for name, why in absurd.items()},
        "kid_subset_size": fidelity.get("kid_subset_size"), "kid_subsets": fidelity.get("kid_subsets"),
        # FID's estimate is biased upwards for small sets; the report says so below this size
        "fid_biased": real is not None and min(int(readable.sum()), n_real) < em.FID_UNBIASED_AT,
        **{f"ms_ssim_{k}": None if v is None or not len(v) else float(v.mean()) for k, v in ms_ssim.items()},
        **{f"ms_ssim_{k}_pairs": None if v is None else int(len(v)) for k, v in ms_ssim.items()},
        "findings": findings, "label_map": mapped, "not_evaluated": not_evaluated,
        "findings_real": _real_findings(real, real_table, pathologies, user_map, columns, options.min_score),
        "n_flagged": {flag: sum(flag in f for f in flags) for flag in FLAGS},
        "n_accepted": sum(not f for f in flags), "min_score": options.min_score, "max_pairs": options.max_pairs,
        "planned_images": planned,
        "verifier": verifier_of(out, evaluator.sha256),
        "evaluator": {"release": RELEASE, "release_url": info["url"], "weights": str(evaluator.weights),
                      **weights_identity(evaluator.weights, evaluator.sha256), "device": str(evaluator.device),
                      "pathologies": evaluator.pathologies},
        "demo_model": (read_run_json(out) or {}).get("resolved", {}).get("demo") is True,
        "versions": library_versions(("torch", "torchvision", "torchxrayvision", "torchmetrics", "scikit-learn",
                                      "numpy", "matplotlib"), cxrgen=__version__),
        "seconds": round(time.monotonic() - started, 3),
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }

    # 5. OUT/quality/ built aside and swapped in whole: a failure (a full disk, a plot that cannot be drawn)
    # leaves the previous evaluation as it was; metadata.parquet and the images are never touched
    if out.local is not None:
        folder = out.local / EVAL_DIR
        try:
            with built_aside(folder) as staging:
                report_name = _write_quality(staging, table, evaluator, synthetic, flags, summary, states, columns,
                                             ms_ssim).name
        except RunError as exc:
            raise RunError(f"{str(exc).split(';')[0]}; fix the problem, then run cxrgen evaluate again") from None
        scores_path, summary_path, report_path = (folder / "scores.parquet", folder / "summary.json",
                                                  folder / report_name)
    else:
        with tempfile.TemporaryDirectory(prefix="cxrgen-eval-") as staging:
            # a bucket's quality/ is built on local disk, then each file is uploaded whole (summary.json last)
            report = _write_quality(Path(staging), table, evaluator, synthetic, flags, summary, states, columns,
                                    ms_ssim)
            scores_path, report_path, summary_path = upload(
                out, Path(staging), [Path(staging) / "scores.parquet", report, Path(staging) / "summary.json"])
    return EvalResult(out=out.local or out.url, summary=summary, scores_path=scores_path, summary_path=summary_path,
                      report_path=report_path, synthetic_features=synthetic.features[readable],
                      real_features=None if real is None else real["features"],
                      real_from_cache=cached is not None)


# ---------------------------------------------------------------------------------------------- inputs

def _real_files(real: str) -> tuple[list[Path], pa.Table | None]:
    """The real image files (folder searched recursively, or a table's `path` column) and the table, if any."""
    path = Path(real).expanduser().resolve()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise InputError(f"--real {real}: no PNG or JPEG file in that folder or below; give a folder of real "
                             "chest X-rays")
        return files, None
    if not path.is_file() or path.suffix.lower() not in (".csv", ".parquet"):
        raise InputError(f"--real {real}: give a folder of PNG/JPEG images or a .csv/.parquet table with a path column")
    try:
        if path.suffix.lower() == ".parquet":
            table = pq.read_table(path)
        else:
            import pyarrow.csv as pacsv

            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    except Exception as exc:  # noqa: BLE001 - any parse error: one line naming the file
        raise InputError(f"--real {real}: cannot read the table ({str(exc).splitlines()[0][:160]})") from None
    if "path" not in table.column_names:
        raise InputError(f"--real {real}: the table has no `path` column; add one with each image's path relative "
                         "to the table's folder")
    paths = table.column("path").to_pylist()
    if not any(paths):
        raise InputError(f"--real {real}: the table lists no image; add rows with a path")
    # one file per row, so file i is table row i; a blank path names no file and counts as unreadable
    files = [(path.parent / str(p)).resolve() if p else path.parent / f".row-{i + 1}-has-no-path"
             for i, p in enumerate(paths)]
    return files, table


def _device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available here; use --device cpu")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
    return device


# ---------------------------------------------------------------------------------------------- image pass

def _run_pairs(prompts: list[str], max_pairs: int) -> tuple[list, list]:
    """MS-SSIM pairs of the run: within each prompt's images, and random pairs across the run (fixed seed)."""
    rng = np.random.default_rng(em.PAIR_SEED)
    groups: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(index)
    return em.group_pairs(list(groups.values()), max_pairs, rng), em.random_pairs(len(prompts), max_pairs, rng)


def decode_threads(threads: int, device: str, cores: int) -> int:
    """--threads, or for 0: 2 on the CPU, where the network needs the cores, and on a GPU every core but one:
    there the network waits for decoding (a 512 x 512 file decoded, cropped and resized is ~20 ms of CPU, so two
    threads capped the evaluation near 100 images/s whatever the GPU)."""
    if threads:
        return threads
    return max(2, min(32, cores - 1)) if device.startswith("cuda") else 2


def _image_pass(evaluator: Evaluator, files: list[Path], keep: set[int], options: EvalOptions, bar) -> ImageSet:
    """Decode and preprocess on background threads while the network runs; one forward pass per batch."""
    n, width = len(files), len(evaluator.pathologies)
    result = ImageSet(features=np.full((n, FEATURES), np.nan, dtype=np.float32),
                      scores=np.full((n, width), np.nan, dtype=np.float64), flags=[[] for _ in range(n)])
    batch_rows: list[int] = []
    batch: list[torch.Tensor] = []

    def run_batch() -> None:
        features, scores = evaluator.forward(torch.stack(batch))
        result.features[batch_rows] = features
        result.scores[batch_rows] = scores  # float64 from here on: the stored values are the ones every figure uses
        bar.update(len(batch_rows))
        batch_rows.clear()
        batch.clear()

    window = 2 * options.batch_size + options.threads  # how far decoding may run ahead (bounds memory)
    with ThreadPoolExecutor(max_workers=options.threads, thread_name_prefix="cxrgen-decode") as pool:
        pending: deque = deque()
        upcoming = iter(range(n))
        for index in upcoming:
            pending.append((index, pool.submit(_prepare, files[index], index in keep)))
            if len(pending) >= window:
                break
        while pending:
            # 1. take the oldest finished decode and queue one more, so the threads never wait for the network
            index, future = pending.popleft()
            following = next(upcoming, None)
            if following is not None:
                pending.append((following, pool.submit(_prepare, files[following], following in keep)))
            prepared = future.result()
            # 2. record its flags; unreadable files have no tensor and count as done at once
            result.flags[index] = prepared.flags
            if prepared.small is not None:
                result.small[index] = prepared.small
            if prepared.tensor is None:
                bar.update(1)
                continue
            # 3. a full batch goes through the network while the threads decode the next ones
            batch_rows.append(index)
            batch.append(prepared.tensor)
            if len(batch) == options.batch_size:
                run_batch()
        if batch:
            run_batch()
    return result


# ---------------------------------------------------------------------------------------------- real-set cache

def _cache_path(options: EvalOptions, evaluator: Evaluator, files: list[Path], real: str) -> Path:
    """$CXRGEN_HOME/eval-cache/real-<key>.npz, the key made of every real file's name, size and mtime."""
    digest = hashlib.sha256()
    listing = [Path(real).expanduser().resolve(), *files]  # the table itself too: its labels may change
    header = {"version": CACHE_VERSION, "weights": evaluator.sha256, "max_pairs": options.max_pairs,
              "pathologies": evaluator.pathologies}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for path in listing:
        try:
            stat = path.stat()
            digest.update(f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\tmissing\n".encode())
    return Path(options.cache_dir).expanduser() / "eval-cache" / f"real-{digest.hexdigest()[:40]}.npz"


def _read_cache(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in ("features", "scores", "rows", "ms_ssim")}
    except Exception:  # noqa: BLE001 - a damaged cache file is recomputed, never fatal
        return None


def _write_cache(path: Path, real: dict) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **real)
    try:
        atomic_write(path, buffer.getvalue())
    except RunError:
        pass  # a read-only cache folder only costs the next evaluation a recomputation


# ---------------------------------------------------------------------------------------------- verdicts, outputs

def _verdicts(images: ImageSet, states: dict, mapped: dict, columns: dict, min_score: float) -> list[list[str]]:
    """Flags per image: the pass's (unreadable, blank, saturated), plus label_missing for a positive label scored low."""
    flags = [list(f) for f in images.flags]
    for row, row_flags in enumerate(flags):
        if "unreadable" in row_flags:
            continue
        if any(states[c][row] is True and images.scores[row, columns[p]] < min_score for c, p in mapped.items()):
            row_flags.append("label_missing")
    return flags


def _real_findings(real, table, pathologies, user_map, columns, min_score) -> dict | None:
    """The same adherence figures on real images whose table has label columns: the classifier's reference."""
    if real is None or table is None:
        return None
    mapped, _ = em.map_columns([c for c in table.column_names if c != "path"], pathologies, user_map)
    rows = [int(r) for r in real["rows"]]
    result = {}
    for column, pathology in mapped.items():
        values = table.column(column).to_pylist()
        states = [em.label_state(values[r]) for r in rows]
        result[column] = {"pathology": pathology,
                          **em.adherence(states, real["scores"][:, columns[pathology]], min_score)}
    return result


def _scores_table(table: pa.Table, pathologies: list[str], scores: np.ndarray, flags: list[list[str]]) -> bytes:
    arrays = {"image_id": table.column("image_id")}
    for i, name in enumerate(pathologies):
        arrays[f"xrv_{name.replace(' ', '_')}"] = pa.array(scores[:, i], type=pa.float64(), from_pandas=True)
    arrays["flags"] = pa.array([",".join(f) for f in flags], type=pa.string())
    arrays["accepted"] = pa.array([not f for f in flags], type=pa.bool_())
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table(arrays), buffer)
    return buffer.getvalue().to_pybytes()


def _prepare(source, keep_small: bool):
    """prepare() of a file path, or of a bucket image fetched here, on the decode thread."""
    return prepare(source() if callable(source) else source, keep_small)


def _write_quality(folder: Path, table, evaluator, synthetic, flags, summary, states, columns, ms_ssim) -> Path:
    """scores.parquet, the report with its plots, and summary.json (last) into folder; the report's path."""
    from cxrgen.evaluation.report import write_report

    _safe_write(folder / "scores.parquet", _scores_table(table, evaluator.pathologies, synthetic.scores, flags))
    report = write_report(folder, summary, synthetic.scores, states, columns, ms_ssim, _safe_write)
    _safe_write(folder / "summary.json", (json.dumps(summary, indent=2) + "\n").encode("utf-8"))
    return report


def _safe_write(path: Path, data: bytes) -> None:
    """atomic_write, with advice that fits evaluate (store's own message suggests a resume)."""
    try:
        atomic_write(path, data)
    except RunError as exc:
        raise RunError(f"{str(exc).split(';')[0]}; fix the problem, then run cxrgen evaluate again") from None
