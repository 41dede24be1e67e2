"""generate / resume: validate everything, then sample into a crash-safe output folder."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from cxrgen import __version__
from cxrgen.config import (
    LEGACY_DEFAULTS,
    PIXEL_FIELDS,
    RunConfig,
    pixel_differences,
    with_absolute_paths,
)
from cxrgen.errors import CxrgenError, InputError
from cxrgen.files import STATE_DIR, TMP_MARK, resume_command, write_json
from cxrgen.manifests.reader import Manifest
from cxrgen.manifests.workitems import load_plan
from cxrgen.model.bundle import BundleSource, load_bundle, read_spec, resolve_model
from cxrgen.model.engine import (
    Engine,
    EngineOptions,
    check_widths,
    default_batch_size,
    resolve_device,
    resolve_dtype,
)
from cxrgen.model.text_encoder import load_text_encoder
from cxrgen.runs.journal import Journal, read_records
from cxrgen.runs.lock import (
    FolderLock,
    InitLock,
    RankLock,
    held_rank_locks,
    holder_name,
    unlocked_warning,
)
from cxrgen.runs.loop import BatchLoop, SignalGuard, batches_of
from cxrgen.runs.ray_engine import RayCluster
from cxrgen.runs.state import done_items, finalize_once, read_run_json
from cxrgen.runs.workers import (
    Rank,
    WorkerResult,
    cpu_threads_per_worker,
    local_devices,
    next_batch,
    rank_share,
    run_local_workers,
)

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
    remaining: int = 0  # planned images not yet done when this call returned (other ranks' work, say)
    share_complete: bool = True  # every image of this process's scope (its shard, else the plan) is done

    @property
    def complete(self) -> bool:
        """Every planned image exists and metadata.parquet covers them."""
        return self.metadata is not None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _pixel_settings(config: RunConfig, manifest: Manifest, plan: list, dtype: str, md5: dict,
                    text_encoder_fingerprint: str | None) -> dict:
    """Everything that decides which images exist and their pixels; compared on resume."""
    settings = {name: getattr(config, name) for name in PIXEL_FIELDS if name != "model"}
    settings.update(manifest_sha256=manifest.sha256, planned_images=len(plan), dtype=dtype, checkpoint_md5=md5,
                    text_encoder_fingerprint=text_encoder_fingerprint)
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


def generate(config: RunConfig, *, bundle_source: BundleSource | None = None, log: Log = _stderr,
             rank: Rank | None = None, engine_hook: Callable | None = None) -> RunResult:
    """Make every planned image of the config in config.out, resuming a matching earlier run there.

    `rank` is this process's place in a torchrun/Slurm run (None: this process drives the run alone,
    with config.workers local processes). `engine_hook(engine, worker_name)` may wrap each worker's
    engine (a seam for tests and profiling; it must be picklable when workers > 1).
    """
    started = time.monotonic()
    # 1. validate input and output before loading anything heavy or writing anything
    config = with_absolute_paths(config)
    out, state = Path(config.out), Path(config.out) / STATE_DIR
    saved = _check_out_folder(out)
    if saved is not None and "file_names" not in saved["config"]:
        config = dataclasses.replace(config, file_names=LEGACY_DEFAULTS["file_names"])  # made by an earlier cxrgen
    manifest, plan = load_plan(config)
    FolderLock(state, shared=rank is not None).check_free()  # refuse a second writer before loading
    with contextlib.ExitStack() as held:
        # --engine ray: join the cluster first, so a missing extra or a wrong address is told in seconds
        cluster = held.enter_context(RayCluster(config, log, rank=rank)) if config.engine == "ray" else None
        devices = cluster.devices if cluster else _devices(config, rank)
        first_device = torch.device("cpu") if cluster else resolve_device(devices[0])
        recorded_dtype = saved["settings"].get("dtype") if saved else None
        dtype = cluster.dtype(config.dtype, recorded_dtype) if cluster else \
            resolve_dtype(config.dtype, first_device, recorded=recorded_dtype)
        if saved is not None:
            _refuse_changed(out, saved, _pixel_settings(config, manifest, plan, dtype,
                                                        saved["settings"]["checkpoint_md5"],
                                                        saved["settings"].get("text_encoder_fingerprint")))
        rank_lock = None
        if rank is not None:  # claimed before loading, so a duplicate rank is refused at once and others see it
            with InitLock(state):
                rank_lock = RankLock(state, rank.rank, rank.world_size, rank.scope).acquire()
            held.callback(rank_lock.release)
        # 2. models: loaded here once to check them (and to sample, when this process is the only worker)
        bundle_root = resolve_model(config.model, config.cache_dir or str(Path.home() / ".cache" / "cxrgen"),
                                    bundle_source, offline=config.offline, progress=not config.quiet, log=log)
        sole = cluster is None and len(devices) == 1
        bundle, text = load_models(config, bundle_root, devices[0] if sole else "cpu")
        settings = _pixel_settings(config, manifest, plan, dtype, bundle.md5, text.fingerprint)
        # 3. claim the folder (ranks share it); record the run, or compare with the recorded one again:
        # another run may have started in this folder while the models loaded
        folder_lock = held.enter_context(FolderLock(state, shared=rank is not None))
        if folder_lock.unsupported:
            log(unlocked_warning(out))
        with InitLock(state):
            if rank is not None:
                folder_lock.clear_holder()
            recorded = read_run_json(out)
            if recorded is None:
                write_json(out / "run.json", _run_json(config, manifest, settings, bundle, devices))
            else:
                _refuse_changed(out, recorded, settings)
        # a rank checks only its own share: 64 ranks must not each read the whole dataset
        mine = rank_share(plan, rank) if rank else plan
        done = done_items(out, mine, verify=config.verify)
        todo = [i for i in mine if i.image_id not in done]
        if (done or (saved is not None and rank is None)) and not config.quiet:
            log(f"{_prefix(rank)}resuming the run in {out}: {len(done)} of {len(mine)} image(s)"
                f"{' of this share' if rank else ''} already done")
        batches = list(batches_of(todo, config.batch_size or (cluster.batch_size() if cluster and todo else
                                                              default_batch_size(first_device))))
        # 4. sample: in this process, or in one worker process per device pulling batches from a queue
        progress = _Progress(len(plan) if rank is None else len(todo), len(plan) - len(todo) if rank is None else 0,
                             config.quiet, rank, log)
        if cluster is not None:
            del bundle, text  # each actor loads its own copy on its device
            results = cluster.run(batches, progress.update, worker_args=dict(
                config=config, bundle_root=str(bundle_root), dtype=dtype, settings=settings, holder=holder_name(),
                load=load_engine, sample=sample_batches, engine_hook=engine_hook))
        elif sole:
            engine = make_engine(config, bundle, text, devices[0], dtype)
            results = [_sample_here(engine, config, batches, _worker_name(rank, 0), engine_hook, progress)]
        else:
            del bundle, text  # each worker loads its own copy on its device
            threads = cpu_threads_per_worker(devices, torch.get_num_threads())
            results = run_local_workers(worker_main, lambda i, d: (config, str(bundle_root), d, dtype, f"w{i}",
                                                                   engine_hook, threads),
                                        devices, batches, progress.update, out)
        progress.close()
        # 5. the metadata table, once every planned image exists (written by exactly one process); a rank
        # whose share is done waits for the others, so a launch ends together and its exit codes mean
        # "complete" (0) or "ranks died, work is left" (3), and torchrun never stops a rank still working
        metadata = finalize_once(out, plan, manifest)
        if metadata is None and rank_lock is not None:
            rank_lock.mark_share_done()
            metadata = wait_for_other_ranks(out, plan, manifest, rank, started + config.rank_wait,
                                            None if config.quiet else log)
    recorded = read_records(out, ("file_name",)) if metadata is None else {}
    missing = set() if metadata is not None else {i.image_id for i in plan} - recorded.keys()
    share_missing = sum(1 for i in plan if i.image_id in missing and (rank is None or rank.in_scope(i.index)))
    written = sum(r.images for r in results)
    seconds = max((r.seconds for r in results), default=0.0)
    if not config.quiet:
        _summary(rank, results, written, seconds, out, plan, metadata, len(missing), share_missing, log)
    return RunResult(out, len(plan), len(done), written, seconds, saved is not None, metadata, len(missing),
                     share_missing == 0)


_RANK_POLL_S = 2.0


def wait_for_other_ranks(out: Path, plan: list, manifest: Manifest, rank: Rank, not_before: float,
                         log: Log | None) -> Path | None:
    """Wait until the run is complete (merging it if this rank is last), or until this rank's launch is done.

    A launch is the ranks of one torchrun/srun start, or of one array-job shard (shards do not wait for
    each other: an array may run them one after another). Ranks still starting hold no lock yet, so
    "none running" is trusted only after `not_before` (monotonic seconds). Returns metadata.parquet's
    path, or None when the rest of the run is left to other shards or to a resume.
    """
    state = out / STATE_DIR
    scope_ids = {item.image_id for item in plan if rank.in_scope(item.index)}
    told, poll = False, _RANK_POLL_S
    while True:
        checked = time.monotonic()
        metadata = finalize_once(out, plan, manifest)
        if metadata is not None:
            return metadata
        if rank.shard is not None and scope_ids <= read_records(out, ("file_name",)).keys():
            return None  # this shard is complete; the other shards finish the run
        with InitLock(state):
            running = {r for r, fields in held_rank_locks(state).items()
                       if r != rank.rank and fields.get("share") != "done" and fields.get("scope") == rank.scope}
        if not running and time.monotonic() >= not_before:
            return None
        if log is not None and not told:
            log(f"{_prefix(rank)}this rank's share is done; waiting for the other ranks to finish theirs")
            told = True
        # a check reads every record and stats every file: on a huge run, poll less often than it takes
        time.sleep(max(poll, 2 * (time.monotonic() - checked)))


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
    if rank is not None:
        if config.workers > 1:
            raise InputError(f"--workers {config.workers} cannot be combined with torchrun/Slurm ranks or array-job "
                             "shards: each is one process on one device; start more ranks instead (e.g. torchrun "
                             "--nproc-per-node, or srun inside the array task)")
        if config.device == "auto" and torch.cuda.is_available():
            return [f"cuda:{rank.local_rank % torch.cuda.device_count()}"]
        # a list names the device of each local rank, in LOCAL_RANK order
        choices = [d.strip() for d in config.device.split(",") if d.strip()]
        device = choices[rank.local_rank % len(choices)]
        resolve_device(device)
        return [device if device != "auto" else "cpu"]
    devices = local_devices(config.device, config.workers, torch.cuda.device_count())
    for device in set(devices):
        resolve_device(device)  # fail early on a bad or missing device
    return devices


def load_models(config: RunConfig, bundle_root: Path | str, device: str):
    """The bundle's networks and the text encoder, checked against each other."""
    bundle = load_bundle(read_spec(bundle_root))
    text = load_text_encoder(config.text_encoder, resolve_device(device), offline=config.offline,
                             cache_dir=config.cache_dir or str(Path.home() / ".cache" / "cxrgen"),
                             progress=not config.quiet, log=_stderr)
    check_widths(bundle, text)
    return bundle, text


def load_engine(config: RunConfig, bundle_root: Path | str, device: str, dtype: str) -> Engine:
    """An Engine with its own copy of the models on one device (a worker's, a Ray actor's)."""
    bundle, text = load_models(config, bundle_root, device)
    return make_engine(config, bundle, text, device, dtype)


def make_engine(config: RunConfig, bundle, text, device: str, dtype: str) -> Engine:
    """An Engine with the config's speed options on one device."""
    options = EngineOptions(device=resolve_device(device), dtype=dtype, scheduler=config.scheduler,
                            steps=config.steps, decode_batch_size=config.decode_batch_size,
                            channels_last=config.channels_last, compile=config.compile)
    return Engine(bundle, text, options)


def _refuse_changed(out: Path, saved: dict, settings: dict) -> None:
    changed = pixel_differences(saved["settings"], settings)
    if changed:
        hint = ""
        if saved["settings"].get("dtype") not in (None, settings.get("dtype")):
            hint = (f"; the run was made in {saved['settings']['dtype']}: use --dtype auto or "
                    f"--dtype {saved['settings']['dtype']} on a device that supports it")
        raise InputError(f"{out} holds a run with other settings ({'; '.join(changed)}){hint}; "
                         "choose a new --out, or restore the settings to resume it")


def _worker_name(rank: Rank | None, index: int) -> str:
    return rank.name if rank else ("main" if index == 0 else f"w{index}")


def _prefix(rank: Rank | None) -> str:
    if rank is None:
        return "cxrgen: "
    if rank.shard is None:
        return f"[rank {rank.rank}/{rank.world_size}] "
    within = f", rank {rank.rank // rank.shard[1]}/{rank.world_size // rank.shard[1]}" \
        if rank.world_size > rank.shard[1] else ""
    return f"[shard {rank.shard[0]}/{rank.shard[1]}{within}] "


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


def _summary(rank, results: list, written: int, seconds: float, out: Path, plan: list, metadata, remaining: int,
             share_remaining: int, log: Log) -> None:
    for r in results if len(results) > 1 or rank else []:
        rate = r.images / r.seconds if r.seconds > 0 else 0.0
        log(f"{_prefix(rank)}worker {r.name}: {r.images} image(s) in {r.seconds:.1f} s ({rate:.2f} images/s)")
    rate = written / seconds if seconds > 0 else 0.0
    log(f"{_prefix(rank)}wrote {written} image(s) in {seconds:.1f} s ({rate:.2f} images/s); {len(plan)} planned. "
        f"Images: {out / 'images'}" + (f"  Metadata: {metadata}" if metadata else ""))
    if metadata is not None:
        return
    if rank is not None and rank.shard is not None and share_remaining == 0:
        log(f"{_prefix(rank)}shard {rank.shard[0]} of {rank.shard[1]} is complete; {remaining} of {len(plan)} "
            "image(s) remain for the other shards (the last one to finish writes metadata.parquet)")
    else:
        log(f"{_prefix(rank)}this rank's share is done, but {remaining} of {len(plan)} image(s) remain and no other "
            f"rank is making them (they stopped or never started): finish with `{resume_command(out)}`")


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
        "text_encoder_fingerprint": engine.text.fingerprint,
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
                threads: int, tasks, events) -> None:
    """Entry point of a local worker process: load models once, then take batches until the queue ends."""
    parent, signals = os.getppid(), []
    # The parent stops workers with SIGTERM at any moment, also while this process loads models or exits.
    # Left at its default, the signal kills the process at once, possibly while its queue feeder thread
    # holds the event queue's shared write lock: every other worker then blocks on that lock forever. So
    # a signal is only recorded, here as in the batch loop, and the worker stops at its next check.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda number, _frame: signals.append(number))
    stopping = lambda: bool(signals) or os.getppid() != parent  # noqa: E731 - or the parent died: never race
    try:
        from cxrgen.hub.download import quiet_library_logs

        quiet_library_logs(config.verbose)  # a spawned process starts with the libraries' own logging set-up
        if device == "cpu":
            torch.set_num_threads(threads)  # its share of the cores: workers must not fight over them
        engine = load_engine(config, bundle_root, device, dtype)
        engine = engine_hook(engine, name) if engine_hook else engine
        result = sample_batches(engine, Path(config.out), next_batch(tasks, stopping), config, name,
                                on_done=lambda n: events.put(("done", name, n)), stop_check=stopping)
        events.put(("finished", name, result.images, result.seconds))
    except CxrgenError as exc:
        events.put(("error", name, str(exc), exc.exit_code))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:  # Ctrl-C reached the whole process group while this worker was loading
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - any failure must reach the parent as one line, then stop the run
        events.put(("error", name, f"worker {name} failed: {type(exc).__name__}: {exc}; what was written is "
                                   f"kept: run `{resume_command(config.out)}`", 1))
        raise


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


def resume(out: str | Path, *, bundle_source: BundleSource | None = None, log: Log = _stderr,
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
