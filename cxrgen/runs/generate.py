"""generate / resume: validate everything, then sample into a crash-safe output folder."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from cxrgen import __version__
from cxrgen.config import (
    LEGACY_DEFAULTS,
    PIXEL_FIELDS,
    VERIFY_FIELDS,
    RunConfig,
    pixel_differences,
    with_absolute_paths,
)
from cxrgen.errors import CxrgenError, InputError
from cxrgen.files import STATE_DIR, TMP_MARK, resume_command
from cxrgen.hub.info import offline_problem
from cxrgen.manifests.reader import Manifest, read_manifest
from cxrgen.manifests.workitems import iter_plan, load_plan
from cxrgen.model.bundle import BundleSource, load_bundle, read_spec, resolve_model
from cxrgen.model.devices import CPU_BATCH, MAX_AUTO_BATCH, resolve_device, use_device
from cxrgen.model.engine import Engine, EngineOptions, check_widths
from cxrgen.model.precision import run_dtypes
from cxrgen.model.text_encoder import load_text_encoder
from cxrgen.runs.journal import Journal, read_records
from cxrgen.runs.loop import BatchLoop, SignalGuard, batches_of, sized_batches
from cxrgen.runs.progress import DEMO_WARNING, Progress, prefix, summary
from cxrgen.runs.ray_engine import RayCluster
from cxrgen.runs.record import run_record
from cxrgen.runs.state import done_items, finalize_once, metadata_rows, read_run_json
from cxrgen.runs.verify import differences, plan_work, prepare
from cxrgen.runs.verify_stats import stats_lines, verification_stats
from cxrgen.runs.workers import (
    CHUNK,
    Rank,
    WorkerResult,
    cpu_threads_per_worker,
    local_devices,
    next_batch,
    rank_device,
    rank_share,
    run_local_workers,
)
from cxrgen.storage.base import RUN_JSON, WHOLE, Store
from cxrgen.storage.locks import holder_name, unlocked_warning
from cxrgen.storage.open import open_store

Log = Callable[[str], None]

@dataclass(frozen=True)
class RunResult:
    """What one generate/resume call did."""

    out: Path | str  # the folder, or the object store's URL
    planned: int
    already_done: int
    written: int
    seconds: float
    resumed: bool
    metadata: Path | str | None  # metadata.parquet once every planned image exists
    remaining: int = 0  # planned images not yet done when this call returned (other ranks' work, say)
    share_complete: bool = True  # every image of this process's scope (its shard, else the plan) is done

    @property
    def complete(self) -> bool:
        """Every planned image exists and metadata.parquet covers them."""
        return self.metadata is not None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _pixel_settings(config: RunConfig, manifest: Manifest, plan: list, dtype: str, md5: dict,
                    text_encoder_fingerprint: str | None, verification=None) -> dict:
    """Everything that decides which images exist and their pixels; compared on resume."""
    settings = {name: getattr(config, name) for name in PIXEL_FIELDS if name != "model"}
    settings.update(manifest_sha256=manifest.sha256, planned_images=len(plan), dtype=dtype, checkpoint_md5=md5,
                    text_encoder_fingerprint=text_encoder_fingerprint)
    if verification is not None:  # a plain run's settings stay as they were before --verify existed
        settings["verify"] = verification.block()
    return settings


def _check_out_folder(out: Store) -> dict | None:
    """The saved run.json of OUT, None for a new or empty folder or prefix; refuse anything else."""
    if not out.exists():
        return None
    if out.local is not None and not out.local.is_dir():
        raise InputError(f"--out {out} is a file; choose a folder")
    saved = read_run_json(out)
    # Another rank of the same launch may have made .cxrgen/ before writing run.json, or a run killed
    # while writing run.json left its temporary file: both are a run that never started. (images/ is
    # only made after run.json exists, so a folder with images/ but no run.json is someone else's.)
    if saved is None and any(name != STATE_DIR and TMP_MARK not in name for name in out.entries()):
        where = "folder" if out.local is not None else "prefix"
        raise InputError(f"--out {out} is not empty and holds no cxrgen run; choose a new or empty {where}")
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
    out = open_store(config.out)
    saved = _check_out_folder(out)
    if saved is not None and "file_names" not in saved["config"]:
        config = dataclasses.replace(config, file_names=LEGACY_DEFAULTS["file_names"])  # made by an earlier cxrgen
    manifest, plan = load_plan(config)
    out.check_free(shared=rank is not None)  # refuse a second writer before loading
    out.check_writable()
    if out.local is None and (config.verify_labels or config.engine == "ray"):
        what = "--verify" if config.verify_labels else "--engine ray"
        raise InputError(f"{what} writes into a local or shared folder only, not into {out} yet: give a folder as "
                         f"--out, then copy the finished run into the bucket (aws s3 sync OUT {out})")
    with contextlib.ExitStack() as held:
        # --engine ray: join the cluster first, so a missing extra or a wrong address is told in seconds
        if config.engine == "ray" and config.verify_labels:
            raise InputError("--verify cannot run on --engine ray yet (its attempts are scheduled by the local "
                             "engine's batch loop); use --engine local (workers, ranks or array jobs) for --verify")
        cluster = held.enter_context(RayCluster(config, log, rank=rank)) if config.engine == "ray" else None
        devices = cluster.devices if cluster else _devices(config, rank)
        resolved = [torch.device("cpu")] if cluster else [resolve_device(d) for d in devices]
        # the run's dtype (compared on resume) and the one this launch samples in: they differ only for a 16-bit
        # GPU run resumed on the CPU (float32 there; precision.run_dtypes says why)
        if cluster is not None:  # each actor samples in the run's dtype, whatever its GPU
            dtype = sample_dtype = cluster.dtype(config.dtype, saved["settings"].get("dtype") if saved else None)
        else:
            dtype, sample_dtype = run_dtypes(config.dtype, resolved, saved["settings"].get("dtype") if saved else None,
                                             saved.get("resolved", {}).get("devices", ()) if saved else ())
        verification = prepare(config, manifest, log=None if config.quiet or saved or (rank and rank.rank) else log) \
            if config.verify_labels else None
        if saved is not None:
            _refuse_changed(out, saved, _pixel_settings(config, manifest, plan, dtype, saved["settings"]["checkpoint_md5"],
                                                        saved["settings"].get("text_encoder_fingerprint"), verification))
            _check_split(saved, rank)
        if config.offline:  # everything missing named at once, before anything is claimed or written
            problem = offline_problem(config.cache_dir or str(Path.home() / ".cache" / "cxrgen"), config.model,
                                      config.text_encoder)
            if problem:
                raise problem
        rank_lock = None
        if rank is not None:  # claimed before loading, so a duplicate rank is refused at once and others see it
            rank_lock = out.claim_share(rank.rank, rank.world_size, rank.scope)
            held.callback(rank_lock.release)
        # 2. models: loaded here once to check them (and to sample, when this process is the only worker)
        bundle_root = resolve_model(config.model, config.cache_dir or str(Path.home() / ".cache" / "cxrgen"),
                                    bundle_source, offline=config.offline, progress=not config.quiet, log=log)
        sole = cluster is None and len(devices) == 1
        if sole:
            use_device(resolved[0])  # this process's GPU before anything lands on one (else GPU 0)
        bundle, text = load_models(config, bundle_root, devices[0] if sole else "cpu")
        if bundle.spec.demo and not config.quiet:
            log(f"{prefix(rank)}{DEMO_WARNING}")
        settings = _pixel_settings(config, manifest, plan, dtype, bundle.md5, text.fingerprint, verification)
        # 3. claim the folder (ranks share it); record the run, or compare with the recorded one again:
        # another run may have started in this folder while the models loaded
        folder_lock = held.enter_context(out.claim_folder(shared=rank is not None))
        if folder_lock.unsupported:
            log(unlocked_warning(out.local))
        with out.init_lock():
            if rank is not None:
                folder_lock.clear_holder()
            recorded = read_run_json(out)
            # created only if absent: of two launches starting together, exactly one records its settings
            if recorded is None and not out.create_json(RUN_JSON, run_record(
                    config, manifest, settings, bundle, devices, rank,
                    verification.describe(plan) if verification else None)):
                recorded = read_run_json(out)
            if recorded is not None:
                _refuse_changed(out, recorded, settings)
                _check_split(recorded, rank)
                if rank is not None and rank.shard is not None and recorded.get("shards") is None:
                    # a run started unsharded; shards racing here write the same split
                    out.write_bytes(RUN_JSON, (json.dumps({**recorded, "shards": rank.split}, indent=2) + "\n")
                                    .encode("utf-8"))
        # a rank checks only its own share: 64 ranks must not each read the whole dataset
        mine = rank_share(plan, rank) if rank else plan
        done = done_items(out, mine, verify=config.verify, share=_share(rank))
        todo = [i for i in mine if i.image_id not in done]
        if verification is not None:  # attempts instead of images; verdicts journaled by a killed run settle now
            todo, settled = plan_work(out.local, todo, verification, _worker_name(rank, 0))
            done |= settled
        # remaking lost or damaged images of a merged run: the merged rows describe their older records
        remakes = bool(todo) and metadata_rows(out) == len(plan)
        if (done or (saved is not None and rank is None)) and not config.quiet:
            log(f"{prefix(rank)}resuming the run in {out}: {len(done)} of {len(mine)} image(s)"
                f"{' of this share' if rank else ''} already done")
        # --batch-size 0 on a GPU is sized by the process that samples there, from its own free memory (which
        # only a CUDA context on that GPU can read), then calibrated by its first batch
        fixed = config.batch_size or (CPU_BATCH if all(d.type == "cpu" for d in resolved) else 0)
        if cluster is not None:  # Ray hands whole batches to actors: sized from the cluster's smallest GPU
            fixed = config.batch_size or (cluster.batch_size() if todo else CPU_BATCH)
        # 4. sample: in this process, or in one worker process per device pulling batches from a queue
        progress = Progress(len(plan) if rank is None else len(todo), len(plan) - len(todo) if rank is None else 0,
                             config.quiet, rank, log)
        # closed however sampling ends: a stop's message then starts on its own line and no bar is redrawn after it
        held.callback(progress.close)
        if cluster is not None:
            del bundle, text  # each actor loads its own copy on its device
            results = cluster.run(list(batches_of(todo, fixed)), progress.update, worker_args=dict(
                config=config, bundle_root=str(bundle_root), dtype=sample_dtype, settings=settings,
                holder=holder_name(), load=load_engine, sample=sample_batches, engine_hook=engine_hook))
        elif sole:
            engine = make_engine(config, bundle, text, devices[0], sample_dtype)
            batches = batches_of(todo, fixed) if fixed else sized_batches(todo, lambda: engine.batch_size)
            results = [_sample_here(engine, out, config, batches, rank, engine_hook, progress, verification)]
        else:
            del bundle, text  # each worker loads its own copy on its device
            threads = cpu_threads_per_worker(devices, torch.get_num_threads())
            # without a fixed size, the queue holds chunks and each worker gathers its own batch, at most its
            # share of the work so that a small run still spreads over every GPU
            gather = 0 if fixed else -(-len(todo) // len(devices))
            # the verifier's file as this process resolved it: a worker must find, never fetch, it
            worker_config = dataclasses.replace(config, verifier_weights=verification.weights) \
                if verification is not None else config
            results = run_local_workers(worker_main, lambda i, d: (worker_config, str(bundle_root), d, sample_dtype,
                                                                   f"w{i}", engine_hook, threads, gather,
                                                                   _share(rank)),
                                        devices, list(batches_of(todo, fixed or CHUNK)), progress.update, out,
                                        ahead=2 if fixed else 2 * MAX_AUTO_BATCH // CHUNK)
        progress.close()
        # 5. the metadata table, once every planned image exists (written by exactly one process); a rank
        # whose share is done waits for the others, so a launch ends together and its exit codes mean
        # "complete" (0) or "ranks died, work is left" (3), and torchrun never stops a rank still working
        metadata = finalize_once(out, plan, manifest, refresh=remakes)
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
        summary(rank, results, written, seconds, out, plan, metadata, len(missing), share_missing, log)
        if verification is not None:
            for line in stats_lines(verification_stats(out.local, read_run_json(out))):
                log(f"{prefix(rank)}{line}")
    return RunResult(out.local if out.local is not None else out.url, len(plan), len(done), written, seconds,
                     saved is not None, metadata, len(missing), share_missing == 0)


_RANK_POLL_S = 2.0


def wait_for_other_ranks(out: Store, plan: list, manifest: Manifest, rank: Rank, not_before: float,
                         log: Log | None) -> Path | str | None:
    """Wait until the run is complete (merging it if this rank is last), or until this rank's launch is done.

    A launch is the ranks of one torchrun/srun start, or of one array-job shard (shards do not wait for
    each other: an array may run them one after another). Ranks still starting hold no lock yet, so
    "none running" is trusted only after `not_before` (monotonic seconds). Returns metadata.parquet's
    path, or None when the rest of the run is left to other shards or to a resume.
    """
    scope_ids = {item.image_id for item in plan if rank.in_scope(item.index)}
    told, poll = False, _RANK_POLL_S
    while True:
        checked = time.monotonic()
        metadata = finalize_once(out, plan, manifest)
        if metadata is not None:
            return metadata
        if rank.shard is not None and scope_ids <= read_records(out, ("file_name",)).keys():
            return None  # this shard is complete; the other shards finish the run
        running = out.running_ranks(rank.scope, rank.rank)
        if not running and time.monotonic() >= not_before:
            return None
        if log is not None and not told:
            log(f"{prefix(rank)}this rank's share is done; waiting for the other ranks to finish theirs")
            told = True
        # a check reads every record and stats every file: on a huge run, poll less often than it takes
        time.sleep(max(poll, 2 * (time.monotonic() - checked)))


def _sample_here(engine: Engine, out: Store, config: RunConfig, batches: list, rank: Rank | None, engine_hook,
                 progress, verification=None) -> WorkerResult:
    """Sample every batch in this process (one device, or one rank of a launcher) into `out`, the store whose
    claim this process holds (an object store's record writes stop once another process took the claim over)."""
    name = _worker_name(rank, 0)
    engine = engine_hook(engine, name) if engine_hook else engine
    result = sample_batches(engine, out, iter(batches), config, name, progress.update, verification=verification,
                            share=_share(rank))
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
        # this node's GPU LOCAL_RANK for auto or a bare cuda; a list names the device of each local rank
        device = rank_device(config.device, rank.local_rank, torch.cuda.device_count())
        resolve_device(device)
        return [device]
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
                            channels_last=config.channels_last, compile=config.compile,
                            batch_size=config.batch_size)
    return Engine(bundle, text, options)


def _refuse_changed(out: Path, saved: dict, settings: dict) -> None:
    without = lambda d: {k: v for k, v in d.items() if k != "verify"}  # noqa: E731 - compared by its own rule
    changed = pixel_differences(without(saved["settings"]), without(settings)) + \
        differences(saved["settings"].get("verify"), settings.get("verify"))
    if changed:
        hint = ""
        if saved["settings"].get("dtype") not in (None, settings.get("dtype")):
            hint = (f"; the run was made in {saved['settings']['dtype']}: use --dtype auto or "
                    f"--dtype {saved['settings']['dtype']} on a device that supports it")
        raise InputError(f"{out} holds a run with other settings ({'; '.join(changed)}){hint}; "
                         "choose a new --out, or restore the settings to resume it")


def _check_split(saved: dict, rank: Rank | None) -> None:
    """Refuse a shard of another count than the run's first task recorded: the plan is split one way only."""
    recorded = saved.get("shards")
    if rank is None or rank.shard is None or recorded is None or int(recorded["count"]) == rank.shard[1]:
        return
    raise InputError(f"shard {rank.shard[0]} of {rank.shard[1]}: the run in this folder was split into "
                     f"{recorded['count']} shards by its first task; pass --shard I/{recorded['count']} "
                     f"(I from 0 to {int(recorded['count']) - 1}) so the split stays the same")


def _share(rank: Rank | None) -> tuple[int, int]:
    return (rank.rank, rank.world_size) if rank else WHOLE


def _worker_name(rank: Rank | None, index: int) -> str:
    return rank.name if rank else ("main" if index == 0 else f"w{index}")


def sample_batches(engine: Engine, out: Store | Path | str, batches, config: RunConfig, name: str,
                   on_done: Callable[[int], None], stop_check: Callable[[], bool] | None = None,
                   verification=None, share: tuple[int, int] = WHOLE) -> WorkerResult:
    """Run the batch loop of one worker, journaling into its own part file.

    verification: the run's checked --verify settings (a worker process rebuilds them from the config and
    run.json when None); the batches then hold cxrgen.runs.verify.Unit attempts instead of work items.
    """
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
    out = open_store(out)
    journal = Journal(out, name, share)
    if config.verify_labels:
        from cxrgen.runs.verify_loop import verifying_loop

        loop = verifying_loop(engine, out, journal, common, config, token_info, on_done, name, verification)
    else:
        loop = BatchLoop(engine, out, journal, common, config.image_format, config.jpeg_quality, token_info, on_done)
    try:
        with SignalGuard(stop_check) as guard:
            loop.run(batches, guard)
    finally:
        journal.close()
    return WorkerResult(name, loop.written, time.perf_counter() - started)


def worker_main(config: RunConfig, bundle_root: str, device: str, dtype: str, name: str, engine_hook,
                threads: int, gather: int, share: tuple[int, int], tasks, events) -> None:
    """Entry point of a local worker process: load models once, then take batches until the queue ends.

    gather > 0: the queue holds chunks, and each batch gathers them up to this worker's own batch size
    (at most `gather` images).
    """
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
        torch.set_num_threads(threads)  # its share of the cores: workers must not fight over them
        use_device(resolve_device(device))  # before anything is loaded: this worker's GPU, not GPU 0
        engine = load_engine(config, bundle_root, device, dtype)
        engine = engine_hook(engine, name) if engine_hook else engine
        size = (lambda: max(1, min(engine.batch_size, gather))) if gather else None
        result = sample_batches(engine, config.out, next_batch(tasks, stopping, size), config, name,
                                on_done=lambda n: events.put(("done", name, n)), stop_check=stopping, share=share)
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


def resume(out: str | Path, *, bundle_source: BundleSource | None = None, log: Log = _stderr,
           rank: Rank | None = None, engine_hook: Callable | None = None, **overrides) -> RunResult:
    """Finish the run saved in OUT; overrides may change only settings that do not change pixels."""
    store = open_store(out)
    saved = read_run_json(store)
    if saved is None:
        raise InputError(f"{store} holds no cxrgen run (no run.json); check the location, or if a `cxrgen generate` "
                         "into it was stopped before it started, run that same command again")
    bad = sorted(set(overrides) & (set(PIXEL_FIELDS) | set(VERIFY_FIELDS)) |
                 {k for k in overrides if k in ("manifest", "out")})
    if bad:
        raise InputError(f"resume cannot change {', '.join(bad)}: they change the images; start a new run instead")
    where = store.url if store.local is None else str(store.local.resolve())
    data = dict(saved["config"], **{k: v for k, v in overrides.items() if v is not None}, out=where)
    return generate(RunConfig.from_dict(data), bundle_source=bundle_source, log=log, rank=rank,
                    engine_hook=engine_hook)


def finalize_run(out: str | Path) -> Path | str | None:
    """Merge the records of a run whose images are all done (e.g. after a rank died before merging).

    The plan is walked, never held: merging ten million images needs memory for a row group, not for the run.
    """
    out = open_store(out)
    saved = read_run_json(out)
    if saved is None:
        raise InputError(f"{out} is not a cxrgen run (no run.json)")
    config = RunConfig.from_dict(saved["config"])
    manifest = read_manifest(config.manifest, config.manifest_format, config.prompt_column, config.allow_empty_prompt)
    if manifest.sha256 != saved["settings"]["manifest_sha256"]:
        raise InputError(f"manifest {manifest.path} changed since the run started; restore it to finalize")
    items = functools.partial(iter_plan, manifest.rows, seed=config.seed, num_images=config.num_images,
                              guidance_scale=config.guidance_scale, negative_prompt=config.negative_prompt,
                              image_format=config.image_format, file_names=config.file_names)
    return finalize_once(out, items, manifest, int(saved["settings"]["planned_images"]))
