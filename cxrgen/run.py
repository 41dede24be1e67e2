"""generate / resume: validate everything, then sample into a crash-safe output folder."""
from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from cxrgen import __version__
from cxrgen.bundle import BundleSource, load_bundle, monai_source, read_spec, resolve_model
from cxrgen.config import PIXEL_FIELDS, RunConfig, pixel_differences
from cxrgen.engine import Engine, EngineOptions, check_widths, default_batch_size, resolve_device, resolve_dtype
from cxrgen.errors import CxrgenError, InputError
from cxrgen.lock import FolderLock
from cxrgen.loop import BatchLoop, SignalGuard, batches_of
from cxrgen.manifest import Manifest, read_manifest
from cxrgen.plan import WorkItem, make_plan
from cxrgen.state import done_items, finalize_once, read_run_json
from cxrgen.store import STATE_DIR, TMP_MARK, Journal, write_json
from cxrgen.text import load_text_encoder
from cxrgen.workers import Rank, WorkerResult, local_devices, rank_share, run_local_workers

Log = Callable[[str], None]


@dataclass(frozen=True)
class RunResult:
    """What one generate/resume call did."""

    out: Path
    planned: int
    already_done: int
    written: int
    seconds: float
    resumed: bool
    metadata: Path | None  # metadata.parquet once every planned image exists


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_plan(config: RunConfig) -> tuple[Manifest, list[WorkItem]]:
    """Manifest and plan of a config (pure: reads the manifest, writes nothing)."""
    manifest = read_manifest(config.manifest, config.manifest_format, config.prompt_column,
                             config.allow_empty_prompt)
    plan = make_plan(manifest.rows, seed=config.seed, num_images=config.num_images,
                     guidance_scale=config.guidance_scale, negative_prompt=config.negative_prompt,
                     image_format=config.image_format)
    if not plan:
        what = "has no data rows" if not manifest.rows else "plans no images (num_images is 0 on every row)"
        raise InputError(f"manifest {manifest.path} {what}; add rows or set --num-images to 1 or more")
    return manifest, plan


def _pixel_settings(config: RunConfig, manifest: Manifest, plan: list, dtype: str, md5: dict) -> dict:
    """Everything that decides which images exist and their pixels; compared on resume."""
    settings = {name: getattr(config, name) for name in PIXEL_FIELDS if name != "model"}
    settings.update(manifest_sha256=manifest.sha256, planned_images=len(plan), dtype=dtype, checkpoint_md5=md5)
    return settings


def _check_out_folder(out: Path) -> dict | None:
    """The saved run.json of OUT, None for a new or empty folder; refuse any other folder."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise InputError(f"--out {out} is a file; choose a folder")
    saved = read_run_json(out)
    # Another rank of the same launch may have made .cxrgen/ before writing run.json, or a run killed
    # while writing run.json left its temporary file: both are a run that never started. (images/ is
    # only made after run.json exists, so a folder with images/ but no run.json is someone else's.)
    if saved is None and any(p.name != STATE_DIR and TMP_MARK not in p.name for p in out.iterdir()):
        raise InputError(f"--out {out} is not empty and holds no cxrgen run; choose a new or empty folder")
    return saved


def generate(config: RunConfig, *, bundle_source: BundleSource = monai_source, log: Log = _stderr,
             rank: Rank | None = None, engine_hook: Callable | None = None) -> RunResult:
    """Make every planned image of the config in config.out, resuming a matching earlier run there.

    `rank` is this process's place in a torchrun/Slurm run (None: this process drives the run alone,
    with config.workers local processes). `engine_hook(engine, worker_name)` may wrap each worker's
    engine (a seam for tests and profiling; it must be picklable when workers > 1).
    """
    # 1. validate input and output before loading anything heavy or writing anything
    manifest, plan = load_plan(config)
    out = Path(config.out)
    saved = _check_out_folder(out)
    FolderLock(out / STATE_DIR, shared=rank is not None).check_free()  # refuse a second writer before loading
    devices = _devices(config, rank)
    first_device = resolve_device(devices[0])
    dtype = resolve_dtype(config.dtype, first_device)
    if saved is not None:
        _refuse_changed(out, saved, _pixel_settings(config, manifest, plan, dtype, saved["settings"]["checkpoint_md5"]))
    # 2. models: loaded here once to check them (and to sample, when this process is the only worker)
    cache_dir = config.cache_dir or str(Path.home() / ".cache" / "cxrgen")
    bundle_root = resolve_model(config.model, cache_dir, bundle_source)
    sole = len(devices) == 1
    bundle, text = load_models(config, bundle_root, devices[0] if sole else "cpu")
    settings = _pixel_settings(config, manifest, plan, dtype, bundle.md5)
    if saved is not None:
        _refuse_changed(out, saved, settings)
    # 3. claim the folder (ranks share it), record the run, work out what is left
    with FolderLock(out / STATE_DIR, shared=rank is not None):
        if read_run_json(out) is None:
            write_json(out / "run.json", _run_json(config, manifest, settings, bundle, devices))
        done = done_items(out, plan)
        todo = [i for i in plan if i.image_id not in done]
        todo = rank_share(todo, rank) if rank else todo
        if (done or (saved is not None and rank is None)) and not config.quiet:
            log(f"{_prefix(rank)}resuming the run in {out}: {len(done)} of {len(plan)} image(s) already done")
        batch_size = config.batch_size or default_batch_size(first_device)
        batches = list(batches_of(todo, batch_size))
        # 4. sample: in this process, or in one worker process per device pulling batches from a queue
        progress = _Progress(len(plan) if rank is None else len(todo), len(plan) - len(todo) if rank is None else 0,
                             config.quiet, rank, log)
        if sole:
            engine = make_engine(config, bundle, text, devices[0], dtype)
            results = [_sample_here(engine, config, batches, _worker_name(rank, 0), engine_hook, progress)]
        else:
            del bundle, text  # each worker loads its own copy on its device
            results = run_local_workers(worker_main, lambda i, d: (config, str(bundle_root), d, dtype, f"w{i}",
                                                                   engine_hook),
                                        devices, batches, progress.update, out)
        progress.close()
        # 5. the metadata table, once every planned image exists (written by exactly one process)
        metadata = finalize_once(out, plan, manifest)
    written = sum(r.images for r in results)
    seconds = max((r.seconds for r in results), default=0.0)
    if not config.quiet:
        _summary(rank, results, written, seconds, out, plan, metadata, log)
    return RunResult(out, len(plan), len(done), written, seconds, saved is not None, metadata)


def _sample_here(engine: Engine, config: RunConfig, batches: list, name: str, engine_hook, progress) -> WorkerResult:
    """Sample every batch in this process (one device, or one rank of a launcher)."""
    engine = engine_hook(engine, name) if engine_hook else engine
    result = sample_batches(engine, Path(config.out), iter(batches), config, name, progress.update)
    if config.compile and not config.quiet and engine.first_batch_seconds is not None:
        progress.log(f"{progress.prefix}torch.compile: the first batch took {engine.first_batch_seconds:.1f} s "
                     "including compilation (not counted apart in images/s)")
    return result


def _devices(config: RunConfig, rank: Rank | None) -> list[str]:
    """The device of each local worker: one per visible GPU, --device list, or --workers CPU processes."""
    import torch

    if rank is not None:
        if config.device == "auto" and torch.cuda.is_available():
            return [f"cuda:{rank.local_rank % torch.cuda.device_count()}"]
        return [config.device if config.device != "auto" else "cpu"]
    devices = local_devices(config.device, config.workers, torch.cuda.device_count())
    for device in set(devices):
        resolve_device(device)  # fail early on a bad or missing device
    return devices


def load_models(config: RunConfig, bundle_root: Path | str, device: str):
    """The bundle's networks and the text encoder, checked against each other."""
    bundle = load_bundle(read_spec(bundle_root))
    text = load_text_encoder(config.text_encoder, resolve_device(device))
    check_widths(bundle, text)
    return bundle, text


def make_engine(config: RunConfig, bundle, text, device: str, dtype: str) -> Engine:
    """An Engine with the config's speed options on one device."""
    options = EngineOptions(device=resolve_device(device), dtype=dtype, scheduler=config.scheduler,
                            steps=config.steps, decode_batch_size=config.decode_batch_size,
                            channels_last=config.channels_last, compile=config.compile)
    return Engine(bundle, text, options)


def _refuse_changed(out: Path, saved: dict, settings: dict) -> None:
    changed = pixel_differences(saved["settings"], settings)
    if changed:
        raise InputError(f"{out} holds a run with other settings ({'; '.join(changed)}); "
                         "choose a new --out, or restore the settings to resume it")


def _worker_name(rank: Rank | None, index: int) -> str:
    return rank.name if rank else ("main" if index == 0 else f"w{index}")


def _prefix(rank: Rank | None) -> str:
    return f"[rank {rank.rank}/{rank.world_size}] " if rank else "cxrgen: "


class _Progress:
    """One tqdm bar on a single node; plain prefixed log lines per batch under a launcher."""

    def __init__(self, total: int, initial: int, quiet: bool, rank: Rank | None, log: Log):
        self.total, self.count, self.quiet, self.rank, self.log = total, initial, quiet, rank, log
        self.prefix = _prefix(rank)
        self.bar = None if (quiet or rank) else tqdm(total=total, initial=initial, unit="img", desc="cxrgen",
                                                     dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.rank is not None and not self.quiet:
            self.log(f"{self.prefix}{self.count}/{self.total} image(s) of this rank's share")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _summary(rank, results: list, written: int, seconds: float, out: Path, plan: list, metadata, log: Log) -> None:
    for r in results if len(results) > 1 or rank else []:
        rate = r.images / r.seconds if r.seconds > 0 else 0.0
        log(f"{_prefix(rank)}worker {r.name}: {r.images} image(s) in {r.seconds:.1f} s ({rate:.2f} images/s)")
    rate = written / seconds if seconds > 0 else 0.0
    where = f"Metadata: {metadata}" if metadata else "metadata.parquet is written when every rank is done"
    log(f"{_prefix(rank)}wrote {written} image(s) in {seconds:.1f} s ({rate:.2f} images/s); {len(plan)} planned. "
        f"Images: {out / 'images'}  {where}")


def sample_batches(engine: Engine, out: Path, batches, config: RunConfig, name: str,
                   on_done: Callable[[int], None], stop_check: Callable[[], bool] | None = None) -> WorkerResult:
    """Run the batch loop of one worker, journaling into its own part file."""
    spec = engine.bundle.spec
    common = {
        "steps": config.steps, "scheduler": config.scheduler, "height": spec.image_size[0],
        "width": spec.image_size[1], "model_name": spec.name, "model_version": spec.version,
        "autoencoder_md5": engine.bundle.md5.get(spec.checkpoints["autoencoder"].name),
        "diffusion_model_md5": engine.bundle.md5.get(spec.checkpoints["diffusion_model"].name),
        "text_encoder": config.text_encoder, "dtype": engine.options.dtype,
        "device_type": engine.options.device.type, "cxrgen_version": __version__, "worker": name,
    }
    token_info = lambda prompt: dataclasses.asdict(engine.text.token_info(prompt))  # noqa: E731
    started = time.perf_counter()
    journal = Journal(out, name)
    loop = BatchLoop(engine, out, journal, common, config.image_format, config.jpeg_quality, token_info, on_done)
    try:
        with SignalGuard(stop_check) as guard:
            loop.run(batches, guard)
    finally:
        journal.close()
    return WorkerResult(name, loop.written, time.perf_counter() - started)


def worker_main(config: RunConfig, bundle_root: str, device: str, dtype: str, name: str, engine_hook,
                tasks, events) -> None:
    """Entry point of a local worker process: load models once, then take batches until the queue ends."""
    parent = os.getppid()
    try:
        bundle, text = load_models(config, bundle_root, device)
        engine = make_engine(config, bundle, text, device, dtype)
        engine = engine_hook(engine, name) if engine_hook else engine
        result = sample_batches(engine, Path(config.out), iter(tasks.get, None), config, name,
                                on_done=lambda n: events.put(("done", name, n)),
                                stop_check=lambda: os.getppid() != parent)  # orphaned: stop, never race a resume
        events.put(("finished", name, result.images, result.seconds))
    except CxrgenError as exc:
        events.put(("error", name, str(exc), exc.exit_code))
        sys.exit(exc.exit_code)


def _run_json(config: RunConfig, manifest: Manifest, settings: dict, bundle, devices: list[str]) -> dict:
    return {
        "cxrgen_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config.to_dict(),
        "settings": settings,
        "resolved": {
            "devices": devices, "bundle_root": str(bundle.spec.root), "model_name": bundle.spec.name,
            "model_version": bundle.spec.version, "height": bundle.spec.image_size[0],
            "width": bundle.spec.image_size[1], "latent_shape": list(bundle.spec.latent_shape),
        },
        "manifest": {"path": manifest.path, "sha256": manifest.sha256, "rows": len(manifest.rows)},
        "versions": _versions(),
    }


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("torch", "monai", "transformers", "pyarrow", "pandas", "pillow", "numpy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def resume(out: str | Path, *, bundle_source: BundleSource = monai_source, log: Log = _stderr,
           rank: Rank | None = None, engine_hook: Callable | None = None, **overrides) -> RunResult:
    """Finish the run saved in OUT; overrides may change only settings that do not change pixels."""
    out = Path(out)
    saved = read_run_json(out)
    if saved is None:
        raise InputError(f"{out} holds no cxrgen run (no run.json); check the folder, or if a `cxrgen generate` "
                         "into it was stopped before it started, run that same command again")
    bad = sorted(set(overrides) & set(PIXEL_FIELDS) | {k for k in overrides if k in ("manifest", "out")})
    if bad:
        raise InputError(f"resume cannot change {', '.join(bad)}: they change the images; start a new run instead")
    data = dict(saved["config"], **{k: v for k, v in overrides.items() if v is not None}, out=str(out.resolve()))
    return generate(RunConfig.from_dict(data), bundle_source=bundle_source, log=log, rank=rank,
                    engine_hook=engine_hook)


def finalize_run(out: str | Path) -> Path | None:
    """Merge the records of a run whose images are all done (e.g. after a rank died before merging)."""
    out = Path(out)
    saved = read_run_json(out)
    if saved is None:
        raise InputError(f"{out} is not a cxrgen run (no run.json)")
    manifest, plan = load_plan(RunConfig.from_dict(saved["config"]))
    if manifest.sha256 != saved["settings"]["manifest_sha256"]:
        raise InputError(f"manifest {manifest.path} changed since the run started; restore it to finalize")
    return finalize_once(out, plan, manifest)
