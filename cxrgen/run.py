"""generate / resume: validate everything, then sample into a crash-safe output folder."""
from __future__ import annotations

import dataclasses
import json
import platform
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from cxrgen import __version__
from cxrgen.bundle import BundleSource, load_bundle, monai_source, read_spec, resolve_model
from cxrgen.config import PIXEL_FIELDS, RunConfig, pixel_differences
from cxrgen.engine import Engine, EngineOptions, default_batch_size, resolve_device, resolve_dtype
from cxrgen.errors import InputError
from cxrgen.lock import FolderLock
from cxrgen.loop import BatchLoop, SignalGuard, Throughput, batches_of
from cxrgen.manifest import Manifest, read_manifest
from cxrgen.plan import WorkItem, make_plan
from cxrgen.state import done_items, finalize, read_run_json
from cxrgen.store import STATE_DIR, Journal, write_json
from cxrgen.text import load_text_encoder

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
    if saved is None and any(out.iterdir()):
        raise InputError(f"--out {out} is not empty and holds no cxrgen run; choose a new or empty folder")
    return saved


def generate(config: RunConfig, *, bundle_source: BundleSource = monai_source, log: Log = _stderr) -> RunResult:
    """Make every planned image of the config in config.out, resuming a matching earlier run there."""
    # 1. validate input and output before loading anything heavy or writing anything
    manifest, plan = load_plan(config)
    out = Path(config.out)
    saved = _check_out_folder(out)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if saved is not None:
        _refuse_changed(out, saved, _pixel_settings(config, manifest, plan, dtype, saved["settings"]["checkpoint_md5"]))
    # 2. models, loaded once
    cache_dir = config.cache_dir or str(Path.home() / ".cache" / "cxrgen")
    spec = read_spec(resolve_model(config.model, cache_dir, bundle_source))
    bundle = load_bundle(spec)
    text = load_text_encoder(config.text_encoder, device)
    options = EngineOptions(device=device, dtype=dtype, scheduler=config.scheduler, steps=config.steps,
                            decode_batch_size=config.decode_batch_size, channels_last=config.channels_last,
                            compile=config.compile)
    engine = Engine(bundle, text, options)
    settings = _pixel_settings(config, manifest, plan, dtype, bundle.md5)
    if saved is not None:
        _refuse_changed(out, saved, settings)
    # 3. claim the folder, record the run, work out what is left
    with FolderLock(out / STATE_DIR):
        if saved is None:
            write_json(out / "run.json", _run_json(config, manifest, settings, bundle, device))
        done = done_items(out, plan)
        todo = [item for item in plan if item.image_id not in done]
        if saved is not None and not config.quiet:
            log(f"cxrgen: resuming the run in {out}: {len(done)} of {len(plan)} image(s) already done")
        batch_size = config.batch_size or default_batch_size(device)
        written, seconds = _sample(engine, out, todo, plan, config, batch_size, spec, text, log)
        metadata = finalize(out, plan, manifest)
    if not config.quiet:
        rate = written / seconds if seconds > 0 else 0.0
        log(f"cxrgen: wrote {written} image(s) in {seconds:.1f} s ({rate:.2f} images/s); "
            f"{len(plan)} planned, all done. Images: {out / 'images'}  Metadata: {metadata}")
    return RunResult(out, len(plan), len(done), written, seconds, saved is not None, metadata)


def _refuse_changed(out: Path, saved: dict, settings: dict) -> None:
    changed = pixel_differences(saved["settings"], settings)
    if changed:
        raise InputError(f"{out} holds a run with other settings ({'; '.join(changed)}); "
                         "choose a new --out, or restore the settings to resume it")


def _sample(engine: Engine, out: Path, todo: list[WorkItem], plan: list[WorkItem], config: RunConfig,
            batch_size: int, spec, text, log: Log) -> tuple[int, float]:
    """Run the batch loop over `todo` with a progress bar over all planned images."""
    common = {
        "steps": config.steps, "scheduler": config.scheduler, "height": spec.image_size[0],
        "width": spec.image_size[1], "model_name": spec.name, "model_version": spec.version,
        "autoencoder_md5": engine.bundle.md5.get(spec.checkpoints["autoencoder"].name),
        "diffusion_model_md5": engine.bundle.md5.get(spec.checkpoints["diffusion_model"].name),
        "text_encoder": config.text_encoder, "dtype": engine.options.dtype,
        "device_type": engine.options.device.type, "cxrgen_version": __version__, "worker": "main",
    }
    token_info = lambda prompt: dataclasses.asdict(text.token_info(prompt))  # noqa: E731
    bar = tqdm(total=len(plan), initial=len(plan) - len(todo), unit="img", disable=config.quiet,
               dynamic_ncols=True, desc="cxrgen")
    meter = Throughput()
    journal = Journal(out, "main")
    loop = BatchLoop(engine, out, journal, common, config.image_format, config.jpeg_quality, token_info,
                     on_done=lambda n: (bar.update(n), meter.add(n)))
    try:
        with SignalGuard() as guard:
            loop.run(batches_of(todo, batch_size), guard)
    finally:
        bar.close()
        journal.close()
    return loop.written, meter.seconds


def _run_json(config: RunConfig, manifest: Manifest, settings: dict, bundle, device) -> dict:
    return {
        "cxrgen_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config.to_dict(),
        "settings": settings,
        "resolved": {
            "device": str(device), "bundle_root": str(bundle.spec.root), "model_name": bundle.spec.name,
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
           **overrides) -> RunResult:
    """Finish the run saved in OUT; overrides may change only settings that do not change pixels."""
    out = Path(out)
    saved = read_run_json(out)
    if saved is None:
        raise InputError(f"{out} holds no cxrgen run (no run.json); check the folder")
    bad = sorted(set(overrides) & set(PIXEL_FIELDS) | {k for k in overrides if k in ("manifest", "out")})
    if bad:
        raise InputError(f"resume cannot change {', '.join(bad)}: they change the images; start a new run instead")
    data = dict(saved["config"], **{k: v for k, v in overrides.items() if v is not None}, out=str(out.resolve()))
    return generate(RunConfig.from_dict(data), bundle_source=bundle_source, log=log)
