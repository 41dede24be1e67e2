"""--engine ray: the run's not-yet-done batches go to a Ray Data pool of actors that each hold the models once.

The driver (the `cxrgen generate` process) plans, holds the folder lock, shows progress and merges, as for a
local run. Ray places the actors (one per GPU by default), restarts one that dies and retries its batch on it,
and balances the batches: a fast actor simply takes more. cxrgen keeps what Ray does not give: each batch is
one row, so its composition (and the float rounding it sets) is the local run's; every actor incarnation
journals into a part of its own; a restarted incarnation never rewrites an image its predecessor recorded;
an actor whose driver is gone writes nothing more. Ray is imported here only, and only when this engine runs.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import pickle
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from cxrgen.config import RunConfig, ray_worker_bounds
from cxrgen.errors import CxrgenError, InputError, Interrupted, RunError, first_line
from cxrgen.files import STATE_DIR, io_error, resume_command
from cxrgen.model.engine import default_batch_size, dtype_supported, resolve_dtype
from cxrgen.runs.journal import RECORDS_DIR
from cxrgen.storage.locks import folder_held_by
from cxrgen.runs.state import file_ok
from cxrgen.runs.workers import WorkerResult

RAY_HINT = 'pip install "cxrgen[ray]"'
_CONNECT_TIMEOUT_S = 5.0
# A batch queued behind the running one keeps a GPU busy between batches; more would only pile up work
# that waits for a dead actor's restart (Ray retries a task on the actor it was sent to).
_TASKS_IN_FLIGHT_PER_ACTOR = 2
_ROW_KEYS = ("worker", "done", "written", "started", "ended", "error", "exit_code")


def import_ray():
    """The ray module (with Ray Data), or one line saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - the engine is Ray Data's actor pool
    except ImportError as exc:
        raise InputError(f"--engine ray needs Ray, which is not installed ({exc}); install the extra with "
                         f"`{RAY_HINT}`, or use --engine local") from None
    return ray


def check_reachable(address: str, timeout: float = _CONNECT_TIMEOUT_S) -> None:
    """Refuse at once an address where nothing listens: ray.init would wait a minute or more before failing."""
    if address in ("", "auto", "local"):
        return  # "" and "local" start a Ray here; "auto" looks for one this machine started (Ray fails fast)
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--ray-address {address!r}: write HOST:PORT (the head node's GCS address, e.g. "
                         "10.0.0.5:6379), ray://HOST:PORT for Ray Client, or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        reason = "timed out" if isinstance(exc, socket.timeout) else (exc.strerror or type(exc).__name__)
        raise InputError(f"--ray-address {address}: nothing answers at {host}:{port} ({reason}); start the cluster "
                         "(`ray start --head`), check the address (`ray status` on the head node), or use "
                         "--engine local") from None


@dataclass(frozen=True)
class Placement:
    """How many actors, and what each reserves."""

    workers: tuple[int, int]  # (min, max) actors; equal for a fixed pool
    gpus: float  # per actor; 0 = CPU actors
    cpus: float  # per actor; a CPU actor's torch threads too

    @property
    def device(self) -> str:
        """The device inside an actor: Ray shows an actor only its own GPU, as cuda:0."""
        return "cuda" if self.gpus > 0 else "cpu"


def placement(config: RunConfig, cluster_gpus: float, node_cpus: list[float]) -> Placement:
    """Actors and their resources from --ray-workers, --ray-gpus-per-worker and what the cluster has now.

    auto: one actor per GPU of the cluster; on a cluster without GPUs, one actor per node, each reserving
    as many cores as the smallest node has (so one fits on every node) and using them as torch threads.
    """
    if config.device not in ("auto", "cpu"):
        raise InputError(f"--device {config.device} picks devices of this machine; with --engine ray, Ray places "
                         "the workers: use --device auto (GPUs when the cluster has them) or cpu, and "
                         "--ray-gpus-per-worker / --ray-workers")
    gpus = config.ray_gpus_per_worker
    if gpus is None:
        gpus = 1.0 if config.device == "auto" and cluster_gpus >= 1 else 0.0
    elif gpus > 0 and config.device == "cpu":
        raise InputError(f"--device cpu with --ray-gpus-per-worker {gpus}: choose one (--ray-gpus-per-worker 0 "
                         "makes CPU workers)")
    bounds = ray_worker_bounds(config.ray_workers)
    cpus_alive = [c for c in node_cpus if c >= 1] or [1.0]
    if gpus > 0:
        # An autoscaling cluster may start with no GPU node: one actor then, until Ray adds a GPU node.
        workers = bounds or (max(1, int(cluster_gpus // gpus)),) * 2
        return Placement(workers, float(gpus), 1.0)
    if bounds is None:
        return Placement((len(cpus_alive),) * 2, 0.0, float(int(min(cpus_alive))))
    share = max(1, int(min(min(cpus_alive), sum(cpus_alive) // bounds[1])))
    return Placement(bounds, 0.0, float(share))


def probe_gpu() -> dict:
    """Facts of the GPU a Ray task was given: bfloat16 support and the batch size cxrgen picks for it."""
    device = torch.device("cuda")
    return {"bf16": bool(torch.cuda.is_bf16_supported()), "batch_size": default_batch_size(device),
            "name": torch.cuda.get_device_name(device)}


class RayCluster:
    """This driver's connection to a Ray cluster, and the actor pool it runs a run's batches on."""

    def __init__(self, config: RunConfig, log: Callable[[str], None], *, rank=None):
        if rank is not None:
            raise InputError("--engine ray runs the whole plan from one driver process: start it once, not under "
                             "torchrun/srun or as an array-job task (there, use --engine local)")
        self.config, self.log = config, log
        self.ray = import_ray()
        if config.workers > 1 and not config.quiet:
            log(f"cxrgen: note: --workers {config.workers} is for --engine local; the Ray engine's workers are "
                "set by --ray-workers")
        self._connected_here = False
        if not self.ray.is_initialized():  # a caller that already joined a cluster (a notebook, a test) keeps it
            check_reachable(config.ray_address)
            try:
                with _ray_logs(config.verbose):
                    self.ray.init(address=config.ray_address or None,
                                  logging_level=logging.INFO if config.verbose else logging.ERROR,
                                  log_to_driver=config.verbose, configure_logging=True)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise InputError(f"cannot join the Ray cluster at {config.ray_address or '$RAY_ADDRESS'}: "
                                 f"{first_line(exc)}; check --ray-address, or use --engine local") from None
            self._connected_here = True
        if not config.verbose:
            _quiet_console("ray.data")  # its INFO/WARNING lines would break the progress bar; its log file stays
        resources = self.ray.cluster_resources()
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        self.placement = placement(config, resources.get("GPU", 0.0),
                                   [n.get("Resources", {}).get("CPU", 0.0) for n in nodes])
        self.summary = (f"{len(nodes)} node(s), {resources.get('CPU', 0):g} CPU(s), "
                        f"{resources.get('GPU', 0):g} GPU(s)")
        self._gpu: dict | None = None
        if not config.quiet:
            low, high = self.placement.workers
            each = f"{self.placement.gpus:g} GPU" if self.placement.gpus else f"{self.placement.cpus:g} CPU(s)"
            log(f"cxrgen: Ray engine: {low if low == high else f'{low} to {high}'} worker(s) of {each} each, on a "
                f"cluster of {self.summary} now")

    def __enter__(self) -> "RayCluster":
        return self

    def __exit__(self, *exc) -> None:
        if self._connected_here:
            self.ray.shutdown()  # ends this driver's job: Ray stops its actors (and a Ray it started here)

    @property
    def devices(self) -> list[str]:
        """What run.json records as the devices: the actors' device."""
        return [f"ray:{self.placement.device}"]

    def _gpu_facts(self) -> dict:
        if self._gpu is None:
            if not self.config.quiet:
                self.log(f"cxrgen: asking a Ray GPU worker for its bfloat16 support and batch size "
                         f"(the cluster has {self.summary}; this waits until Ray can place one)")
            task = self.ray.remote(num_gpus=self.placement.gpus, num_cpus=1)(probe_gpu)
            self._gpu = self.ray.get(task.remote())
        return self._gpu

    def dtype(self, requested: str, recorded: str | None) -> str:
        """The run's one dtype for every actor (a dataset made in two dtypes would not be one dataset)."""
        if self.placement.gpus == 0:
            return resolve_dtype(requested, torch.device("cpu"), recorded)
        if requested != "auto":
            return requested  # each actor checks that its GPU can run it
        bf16 = self._gpu_facts()["bf16"]
        if recorded in ("float32", "float16") or (recorded == "bfloat16" and bf16):
            return recorded
        return "bfloat16" if bf16 else "float16"

    def batch_size(self) -> int:
        """--batch-size 0: the size a local worker would pick for the actors' device (a probed GPU's)."""
        return default_batch_size(torch.device("cpu")) if self.placement.gpus == 0 else \
            int(self._gpu_facts()["batch_size"])

    def run(self, batches: list, on_done: Callable[[int], None], *, worker_args: dict) -> list[WorkerResult]:
        """Every batch through the actor pool; one WorkerResult per actor incarnation that made images."""
        if not batches:
            return []
        data = self.ray.data
        context = data.DataContext.get_current()
        context.enable_progress_bars = False  # the driver draws cxrgen's own bar
        if hasattr(context, "print_on_execution_start"):
            context.print_on_execution_start = False
        low, high = self.placement.workers
        # One row per batch, one block per row: Ray hands whole batches to the actors, never re-cut ones.
        rows = [{"batch": pickle.dumps(batch)} for batch in batches]
        dataset = data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            BatchWorker, batch_size=1, zero_copy_batch=True, num_cpus=self.placement.cpus,
            num_gpus=self.placement.gpus or None,
            # Ray Data's actor pool restarts a dead actor without limit and retries the batches sent to it on the
            # new incarnation (its default: tests/runs/test_ray_engine.py kills an actor to hold Ray to it)
            compute=data.ActorPoolStrategy(min_size=low, max_size=high,
                                           max_tasks_in_flight_per_actor=_TASKS_IN_FLIGHT_PER_ACTOR),
            fn_constructor_kwargs={**worker_args, "device": self.placement.device,
                                   "threads": int(self.placement.cpus)})
        spans: dict[str, list] = {}
        stop = _StopOnSignal()
        try:
            with stop:
                rows_out = iter(dataset.iter_rows())
                try:
                    for row in rows_out:
                        if row["error"]:
                            raise _error(row["error"], int(row["exit_code"]))
                        span = spans.setdefault(row["worker"], [0, row["started"], row["ended"]])
                        span[0] += int(row["written"])
                        span[1], span[2] = min(span[1], row["started"]), max(span[2], row["ended"])
                        on_done(int(row["done"]))
                except (_Stop, CxrgenError):
                    raise
                except Exception as exc:  # noqa: BLE001 - whatever Ray raised: one line, and the run is resumable
                    raise RunError(f"the Ray workers failed: {_root_cause(exc)}; what was written is kept: finish "
                                   f"with `{resume_command(self.config.out)}`") from None
                finally:
                    if hasattr(rows_out, "close"):
                        rows_out.close()  # stops the pool: Ray ends the actors
        except _Stop:
            pass
        if stop.signum is not None:
            raise Interrupted(f"stopped by {signal.Signals(stop.signum).name}; what was written is kept: finish "
                              f"with `{resume_command(self.config.out)}`",
                              130 if stop.signum == signal.SIGINT else 143)
        return [WorkerResult(name, images, max(0.0, ended - started))
                for name, (images, started, ended) in sorted(spans.items()) if images]


@contextlib.contextmanager
def _ray_logs(verbose: bool):
    """While the driver joins Ray: Ray's C++ core prints lines meant for Ray's developers on stderr (e.g. that
    Ray Data's actors keep their constructor arguments in the object store, harmless here): only fatal ones,
    unless --verbose or the user set the level. The core announces that level on stderr as it starts, so
    stderr is closed for the moment ray.init runs; its failures still arrive as exceptions."""
    if verbose or "RAY_BACKEND_LOG_LEVEL" in os.environ:
        yield
        return
    os.environ["RAY_BACKEND_LOG_LEVEL"] = "fatal"
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
        os.environ.pop("RAY_BACKEND_LOG_LEVEL", None)


def _quiet_console(name: str) -> None:
    for handler in logging.getLogger(name).handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)


class _Stop(Exception):
    pass


class _StopOnSignal:
    """SIGINT/SIGTERM end the driver's wait for the next batch (main thread only); the caller stops the pool."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, _frame) -> None:
        if self.signum is None:
            self.signum = signum
            raise _Stop()

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _error(message: str, exit_code: int) -> CxrgenError:
    if exit_code == InputError.exit_code:
        return InputError(message)
    return RunError(message) if exit_code == RunError.exit_code else Interrupted(message, exit_code)


def _root_cause(exc: BaseException) -> str:
    """The first line of the innermost error Ray wrapped (a task's error, an actor's death)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return first_line(exc, with_type=True).rstrip(".")


def claim_part_name(out: Path, lineage: str) -> str:
    """`<lineage>-<n>`, the first n whose journal part did not exist: created here, so it is this incarnation's.

    A restarted actor never appends to a part its predecessor may have torn, and never shares one with a
    predecessor that Ray took for dead but that still runs (a node cut off from the cluster).
    """
    folder = out / RECORDS_DIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for n in itertools.count():
            name = f"{lineage}-{n}"
            try:
                os.close(os.open(folder / f"part-{name}.jsonl", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                continue
            return name
    except OSError as exc:
        raise io_error(folder, exc) from None
    raise AssertionError("unreachable")


def recorded_by_lineage(out: Path, lineage: str, own: str) -> set[str]:
    """Image ids that earlier incarnations of this actor journaled and whose files are in place.

    Ray retries a dead actor's batch on its restarted incarnation; when the predecessor had already
    journaled (some of) it, those images stay as they are (the retry may run on another GPU model, whose
    rounding would make other bytes than the ones recorded). Reads this actor's parts only.
    """
    recorded = set()
    for part in sorted((out / RECORDS_DIR).glob(f"part-{lineage}-*.jsonl")):
        if part.name == f"part-{own}.jsonl":
            continue
        with open(part, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                try:
                    record = json.loads(line) if line.endswith("\n") else None  # a torn last line is not a record
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and file_ok(out / str(record.get("file_name")), record):
                    recorded.add(record.get("image_id"))
    return recorded


class _WholeBatch:
    """An engine that samples a whole batch and returns only the images asked for.

    For a retried batch some of whose images a predecessor recorded: the batch's composition sets the float
    rounding, so the missing images come out exactly as they would have in the whole batch.
    """

    def __init__(self, engine, batch: list):
        self.engine, self.batch = engine, batch

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def run_batch(self, items, on_step=None):
        images = self.engine.run_batch(self.batch, on_step)
        wanted = {item.image_id for item in items}
        return images[[k for k, item in enumerate(self.batch) if item.image_id in wanted]]


class BatchWorker:
    """One actor of the pool (Ray Data's callable class): loads the models once, then makes whole batches.

    A cxrgen error while starting (output folder not shared, models missing on this node, a GPU without the
    run's dtype) or while sampling (full disk) comes back as a row with its message and exit code, so the
    driver prints one line and exits as a local run would; a death (preemption, OOM kill) is Ray's to restart.
    """

    def __init__(self, *, config: RunConfig, bundle_root: str, dtype: str, settings: dict, holder: str,
                 load: Callable, sample: Callable, engine_hook: Callable | None, device: str, threads: int,
                 lineage: str | None = None):
        self.config, self.out, self.holder, self.sample = config, Path(config.out), holder, sample
        self.error: tuple[str, int] | None = None
        self.name = ""
        try:
            self._start(bundle_root, dtype, settings, load, engine_hook, device, threads, lineage)
        except CxrgenError as exc:  # say where: the driver may run elsewhere, with other folders and models
            self.error = (f"Ray worker on {socket.gethostname()}: {exc}", exc.exit_code)

    def _start(self, bundle_root, dtype, settings, load, engine_hook, device, threads, lineage) -> None:
        from cxrgen.hub.download import quiet_library_logs
        from cxrgen.model.bundle import resolve_model

        config, out = self.config, self.out
        quiet_library_logs(config.verbose)
        if not (out / "run.json").is_file():
            raise InputError(f"{out} is not visible here (no run.json): the output folder must be on a file system "
                             "every node mounts at the same path (NFS, a shared volume)")
        if device == "cpu":
            torch.set_num_threads(max(1, threads))  # the cores Ray reserved for this actor, no more
        elif not dtype_supported(dtype, torch.device("cuda")):
            raise InputError(f"this GPU ({torch.cuda.get_device_name()}) cannot sample in {dtype}, the run's dtype; "
                             "give the run GPUs that can, or start it with --dtype float16")
        md5 = settings["checkpoint_md5"]
        root = bundle_root if Path(bundle_root, "configs").is_dir() else \
            resolve_model(config.model, config.cache_dir or str(Path.home() / ".cache" / "cxrgen"),
                          expected_md5=md5, offline=config.offline, progress=False)
        engine = load(config, root, device, dtype)
        if engine.bundle.md5 != md5 or engine.text.fingerprint != settings.get("text_encoder_fingerprint"):
            raise InputError(f"the models here ({root}, {config.text_encoder}) differ from the driver's; stage the "
                             "same files on every node (`cxrgen download`) or share the cache folder")
        self.lineage = lineage or _lineage()
        self.name = claim_part_name(out, self.lineage)
        self.recorded = recorded_by_lineage(out, self.lineage, self.name)
        self.engine = engine_hook(engine, self.name) if engine_hook else engine

    def __call__(self, rows: dict) -> dict:
        results = [self._one(pickle.loads(blob)) for blob in rows["batch"]]
        return {key: [r[key] for r in results] for key in _ROW_KEYS}

    def _one(self, batch: list) -> dict:
        started = time.time()
        if self.error is not None:
            return self._row(0, 0, started, *self.error)
        try:
            if not folder_held_by(self.out / STATE_DIR, self.holder):
                raise RunError(f"the driver of the run in {self.out} is gone (or another run took the folder); "
                               "this Ray worker writes nothing more")
            missing = [item for item in batch if item.image_id not in self.recorded]
            written = 0
            if missing:
                engine = self.engine if len(missing) == len(batch) else _WholeBatch(self.engine, batch)
                written = self.sample(engine, self.out, iter([missing]), self.config, self.name, lambda n: None).images
        except CxrgenError as exc:
            return self._row(0, 0, started, str(exc), exc.exit_code)
        return self._row(len(batch), written, started)

    def _row(self, done: int, written: int, started: float, error: str = "", exit_code: int = 0) -> dict:
        return {"worker": self.name, "done": done, "written": written, "started": started, "ended": time.time(),
                "error": error, "exit_code": exit_code}


def _lineage() -> str:
    """ray-<first 8 hex digits of the actor id>: the same for every incarnation of one actor."""
    actor_id = None
    try:
        import ray

        actor_id = ray.get_runtime_context().get_actor_id()
    except Exception:  # noqa: BLE001 - outside an actor (a test calling the class directly)
        pass
    return f"ray-{actor_id[:8]}" if actor_id else f"ray-p{os.getpid()}"
