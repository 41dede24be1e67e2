"""Several workers for one run: local processes pulling batches from a queue, or launcher ranks."""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cxrgen.errors import InputError, Interrupted, RunError
from cxrgen.files import resume_command
from cxrgen.manifests.workitems import WorkItem

_POLL_S = 0.2
# Images per queued chunk when each local GPU worker sizes its own batches (--batch-size 0): small enough
# that a worker's batch is a whole number of chunks give or take one, big enough to keep the queue short.
CHUNK = 8


@dataclass(frozen=True)
class Rank:
    """This process's part of the plan: a torchrun/Slurm rank, an array-job shard, or a rank within a shard.

    It makes the images whose plan index modulo world_size is rank.
    """

    rank: int
    world_size: int
    local_rank: int
    shard: tuple[int, int] | None = None  # (index, count) when this process belongs to a shard of an array job
    label: str = ""  # worker and journal name; rank<r> by default
    split: dict | None = None  # how task numbers map to shards, recorded in run.json by a run's first task

    @property
    def name(self) -> str:
        """The worker name in the journal and metadata (unique among the processes writing one folder)."""
        return self.label or f"rank{self.rank}"

    @property
    def scope(self) -> str:
        """What the launch this process belongs to is responsible for: one shard, or the whole plan."""
        return f"{self.shard[0]}/{self.shard[1]}" if self.shard else "all"

    def in_scope(self, index: int) -> bool:
        """Whether the image at this plan index belongs to this process's launch (its shard)."""
        return self.shard is None or index % self.shard[1] == self.shard[0]


@dataclass(frozen=True)
class ShardRequest:
    """What --shard or an array job's variables say about this task: its task number and the task count.

    Shard index = (task - first) // step, so Slurm arrays numbered from 1, or with a step, map onto 0..N-1.
    """

    task: int
    count: int | None  # None: the variables give no count (then the run's recorded count is used)
    source: str  # "--shard" or the variable holding the task number
    first: int = 0  # the task number of shard 0
    step: int = 1

    def split(self, count: int) -> dict:
        """The record run.json keeps: how this launch's task numbers map to `count` shards."""
        return {"count": count, "variable": self.source, "first": self.first, "step": self.step}


def share_of(shard: tuple[int, int] | None, rank: Rank | None, split: dict | None = None) -> Rank | None:
    """Compose an array-job shard I/N with the ranks of a launch inside it (W ranks): I + N*r of N*W.

    index % (N*W) == I + N*r  <=>  index % N == I and (index // N) % W == r, so the shards split the plan
    exactly as N ranks would, and the ranks of one shard split that shard.
    """
    if shard is None:
        return rank
    index, count = shard
    split = split or {"count": count, "variable": "--shard", "first": 0, "step": 1}
    if rank is None:
        return Rank(index, count, 0, shard=shard, label=f"shard{index}", split=split)
    return Rank(index + count * rank.rank, count * rank.world_size, rank.local_rank, shard=shard,
                label=f"shard{index}-rank{rank.rank}", split=split)


def parse_shard(text: str) -> ShardRequest:
    """--shard I/N, 0 <= I < N."""
    parts = text.split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise InputError(f"--shard {text!r}: write I/N, e.g. --shard 3/64 for the 4th of 64 shards (I from 0)")
    index, count = (int(p) for p in parts)
    if not 0 <= index < count:
        raise InputError(f"--shard {text!r}: I must be from 0 to N-1 ({count - 1 if count else 0}); "
                         "shards are numbered from 0")
    return ShardRequest(index, count, "--shard")


def shard_from_env(environ: dict, shards: int | None = None) -> ShardRequest | None:
    """An array task's shard request from Slurm, Kubernetes Indexed Jobs or AWS Batch; None outside an array job.

    Slurm: SLURM_ARRAY_TASK_ID with SLURM_ARRAY_TASK_COUNT (or _MIN/_MAX/_STEP). Kubernetes:
    JOB_COMPLETION_INDEX with the count from --shards or CXRGEN_SHARDS (a Job does not export it).
    AWS Batch: AWS_BATCH_JOB_ARRAY_INDEX with AWS_BATCH_JOB_ARRAY_SIZE. A task number without a count
    takes the count the run's first task recorded (`resolve_shard`). Called by the CLI only.
    """
    def number(name: str) -> int:
        try:
            return int(environ[name])
        except ValueError:
            raise InputError(f"{name}={environ[name]!r} is not a whole number; check the job's environment") from None

    if "SLURM_ARRAY_TASK_ID" in environ:
        low = number("SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in environ else 0
        step = number("SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in environ else 1
        count = number("SLURM_ARRAY_TASK_COUNT") if "SLURM_ARRAY_TASK_COUNT" in environ else \
            (number("SLURM_ARRAY_TASK_MAX") - low) // step + 1 if "SLURM_ARRAY_TASK_MAX" in environ else None
        return ShardRequest(number("SLURM_ARRAY_TASK_ID"), count, "SLURM_ARRAY_TASK_ID", low, max(1, step))
    if "JOB_COMPLETION_INDEX" in environ:
        count = shards if shards is not None else (number("CXRGEN_SHARDS") if "CXRGEN_SHARDS" in environ else None)
        return ShardRequest(number("JOB_COMPLETION_INDEX"), count, "JOB_COMPLETION_INDEX")
    if "AWS_BATCH_JOB_ARRAY_INDEX" in environ:
        count = number("AWS_BATCH_JOB_ARRAY_SIZE") if "AWS_BATCH_JOB_ARRAY_SIZE" in environ else None
        return ShardRequest(number("AWS_BATCH_JOB_ARRAY_INDEX"), count, "AWS_BATCH_JOB_ARRAY_INDEX")
    return None


_NO_COUNT = {"SLURM_ARRAY_TASK_ID": "SLURM_ARRAY_TASK_ID is set without SLURM_ARRAY_TASK_COUNT or _MAX",
             "JOB_COMPLETION_INDEX": "JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job) but the number of "
                                     "shards is not: pass --shards N (the Job's completions) or set CXRGEN_SHARDS=N",
             "AWS_BATCH_JOB_ARRAY_INDEX": "AWS_BATCH_JOB_ARRAY_INDEX is set without AWS_BATCH_JOB_ARRAY_SIZE"}


def resolve_shard(request: ShardRequest | None, recorded: dict | None) -> tuple[tuple[int, int] | None, dict | None]:
    """This task's (index, count) and the split to record, given the split the run's first task recorded.

    A rerun task keeps its original shard: with a recorded split, the task number maps through the recorded
    first task and step, and a task that brings no count takes the recorded one. A task whose count (or an
    explicit --shard N) differs from the recorded count is refused, naming the --shard that reruns it: the
    run is never split two ways. Without a recorded split a one-task array is the whole plan, as before.
    """
    if request is None:
        return None, None
    if recorded is None:
        if request.count is None:
            raise InputError(f"{_NO_COUNT[request.source]}; pass --shard I/N")
        index, count = (request.task - request.first) // request.step, request.count
        if not 0 <= index < count:
            raise InputError(f"{request.source} gives shard {index} of {count}, outside 0..{count - 1}; check the "
                             "array size")
        return ((index, count), request.split(count)) if count > 1 else (None, None)
    count = int(recorded["count"])
    same_numbering = request.source == recorded.get("variable")
    first, step = (int(recorded.get("first", 0)), int(recorded.get("step", 1)) or 1) if same_numbering else \
        (request.first, request.step)
    offset = request.task - first
    index = offset // step
    suggestion = f"--shard {index}/{count}" if 0 <= index < count and offset % step == 0 else \
        f"--shard I/{count} (I from 0 to {count - 1})"
    if request.count is not None and request.count != count:
        given = f"--shard {request.task}/{request.count}" if request.source == "--shard" else \
            f"this array task ({request.source}={request.task}) comes from an array of {request.count} task(s)"
        raise InputError(f"{given}, but the run in this folder was split into {count} shards by its first task; "
                         f"rerun this shard with {suggestion}, so the split stays the same")
    if not (0 <= index < count and offset % step == 0):
        raise InputError(f"{request.source}={request.task} is not one of the run's {count} shards (tasks "
                         f"{first}, {first + step}, ... {first + step * (count - 1)}); pass {suggestion}")
    return (index, count), dict(recorded)


# Slurm's step id inside the batch script or the "extern" step; only srun-started steps are launches.
_NOT_A_LAUNCH_STEP = {"batch", "extern", "interactive"}


def rank_from_env(environ: dict) -> Rank | None:
    """torchrun's RANK/WORLD_SIZE/LOCAL_RANK or an srun step's SLURM_PROCID/SLURM_STEP_NUM_TASKS; None when absent.

    Inside a Slurm allocation the batch script itself also sees SLURM_PROCID=0 and SLURM_NTASKS=N; a
    command run there drives the whole plan, so Slurm's variables count only inside a job step started
    by srun, the only place Slurm sets the step's task count SLURM_STEP_NUM_TASKS. Called by the CLI
    only: environment variables are read at the boundary.
    """
    slurm_step = "SLURM_STEP_NUM_TASKS" in environ and \
        environ.get("SLURM_STEP_ID", environ.get("SLURM_STEPID", "")).lower() not in _NOT_A_LAUNCH_STEP
    for rank, world, local, active in (("RANK", "WORLD_SIZE", "LOCAL_RANK", True),
                                       ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", slurm_step)):
        if active and rank in environ and world in environ:
            values = (environ[rank], environ[world], environ.get(local, "0"))
            try:
                r, w, lr = (int(v) for v in values)
            except ValueError:
                raise InputError(f"{rank}={values[0]!r}, {world}={values[1]!r}: launcher variables must be whole "
                                 "numbers") from None
            if not (0 <= r < w):
                raise InputError(f"{rank}={r} is outside 0..{world}-1={w - 1}; check the launcher")
            return Rank(r, w, lr) if w > 1 else None
    return None


def rank_share(todo: list[WorkItem], rank: Rank) -> list[WorkItem]:
    """The items this rank owns: plan index modulo world size (stable for any set of done items)."""
    return [item for item in todo if item.index % rank.world_size == rank.rank]


def local_devices(device: str, workers: int, cuda_count: int) -> list[str]:
    """One device string per local worker: every visible GPU for auto or a bare cuda (round robin when
    --workers asks for more), else the list, or N workers on the one device named."""
    if device in ("auto", "cuda") and cuda_count > 0:
        return [f"cuda:{i}" for i in range(cuda_count)] if workers == 1 else \
            [f"cuda:{i % cuda_count}" for i in range(workers)]
    if "," in device:
        return [d.strip() for d in device.split(",") if d.strip()]
    return [("cpu" if device == "auto" else device)] * workers


def rank_device(device: str, local_rank: int, cuda_count: int) -> str:
    """The device of one torchrun/srun rank: auto or a bare cuda is this node's GPU LOCAL_RANK modulo the
    visible GPUs (with one GPU made visible per task, GPU 0); a list names each local rank's entry."""
    choices = [d.strip() for d in device.split(",") if d.strip()]
    choice = choices[local_rank % len(choices)]
    if choice in ("auto", "cuda") and cuda_count > 0:
        return f"cuda:{local_rank % cuda_count}"
    return "cpu" if choice == "auto" else choice


@dataclass
class WorkerResult:
    """Images written and seconds taken by one worker, for the per-worker summary line."""

    name: str
    images: int = 0
    seconds: float = 0.0


def cpu_threads_per_worker(devices: list[str], cores: int) -> int:
    """Intra-op threads for each local worker: its share of the cores. A GPU worker needs few (its CPU work is
    noise, JPEG encoding and file writes), and eight GPU workers keeping every core each would oversubscribe
    the host."""
    return max(1, cores // max(1, len(devices)))


def run_local_workers(target: Callable, args_of: Callable[[int, str], tuple], devices: list[str],
                      batches: list[list[WorkItem]], on_done: Callable[[int], None], out: Path,
                      ahead: int = 2) -> list[WorkerResult]:
    """Start one process per device; each pulls the next batch from a shared queue until none remain.

    `target(*args_of(index, device), tasks, events)` runs in each child, takes batches with `next_batch`
    and reports through `events`: ("done", name, n), ("finished", name, images, seconds) or
    ("error", name, message, exit_code). `ahead`: batches (or chunks) queued per worker.
    """
    ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
    # Fed lazily, a few batches ahead: with every batch queued up front, the parent's feeder thread blocks
    # on the full pipe once the workers stop early, and the interpreter waits for it at exit forever.
    tasks, events = ctx.Queue(maxsize=ahead * len(devices)), ctx.Queue()
    feed = _Feeder(tasks, batches, len(devices))
    procs = [ctx.Process(target=target, args=(*args_of(i, d), tasks, events)) for i, d in enumerate(devices)]
    for proc in procs:
        proc.start()
    try:
        results, errors, signals = _supervise(procs, events, on_done, feed, out)
    finally:
        _stop(procs, feed, events)
    if signals:
        raise Interrupted(f"stopped by {signal.Signals(signals[0]).name}; what was written is kept: "
                          f"finish with `{resume_command(out)}`", 130 if signals[0] == signal.SIGINT else 143)
    if errors:
        raise RunError(errors[0])
    return sorted(results.values(), key=lambda r: r.name)


def next_batch(tasks, stop: Callable[[], bool], size: Callable[[], int] | None = None):
    """Batches from the task queue until its end marker, or until stop() says so (asked before each batch
    is taken, so a worker told to stop leaves the batch for the others, and every second while it waits).

    size None: each queued batch as it is. Else the queue holds small chunks and each batch gathers chunks
    up to size() images (the worker's own batch size, known only on its device); at the end marker what is
    held goes out without waiting for more.
    """
    held: list[WorkItem] = []
    while not stop():
        want = size() if size is not None else 0
        if want and len(held) >= want:
            yield held[:want]
            del held[:want]
            continue
        try:
            batch = tasks.get(timeout=1.0)
        except queue.Empty:
            continue
        if batch is None:
            while held and not stop():
                want = max(1, size())
                yield held[:want]
                del held[:want]
            return
        if size is None:
            yield batch
        else:
            held.extend(batch)


class _Feeder:
    """Puts batches on the bounded task queue as room frees up, then one end marker per worker."""

    def __init__(self, tasks, batches: list, workers: int):
        self.tasks, self.workers = tasks, workers
        self.items = iter([*batches, *([None] * workers)])
        self.next = next(self.items, _END)
        self.stopped = False

    def top_up(self) -> None:
        """Queue as many batches as fit without blocking."""
        while self.next is not _END:
            try:
                self.tasks.put_nowait(self.next)
            except queue.Full:
                return
            self.next = next(self.items, _END)

    def stop(self) -> None:
        """Queue nothing more: drop what is queued and end each worker's loop after its current batch."""
        if self.stopped:
            return
        self.stopped = True
        self.items, self.next = iter([None] * (self.workers - 1)), None
        try:
            while True:
                self.tasks.get_nowait()
        except (queue.Empty, OSError, ValueError):
            pass
        self.top_up()


_END = object()
_STOP_GRACE_S = 60.0  # a stopping worker finishes its UNet step and writes; after this it is killed


def _supervise(procs: list, events, on_done: Callable[[int], None], feed: _Feeder, out: Path
               ) -> tuple[dict, list[str], list[int]]:
    """Relay progress and feed the queue; forward SIGINT/SIGTERM to the workers; stop all after one fails."""
    results: dict[str, WorkerResult] = {}
    errors: list[str] = []  # what the workers reported
    crashes: list[str] = []  # workers that died without a word
    signals: list[int] = []
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _f: pending.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}

    stop_deadline = [float("inf")]

    def stop_all(signum: int) -> None:
        feed.stop()
        _signal_all(procs, signum)
        stop_deadline[0] = min(stop_deadline[0], time.monotonic() + _STOP_GRACE_S)

    try:
        # after a stop, a worker that has not ended within the grace period is left to _stop (killed): a
        # process that died holding a queue's shared lock would otherwise keep the others, and this loop, forever
        while (any(p.is_alive() for p in procs) or not events.empty()) and time.monotonic() < stop_deadline[0]:
            # 1. a signal is forwarded once; the queue is emptied so every worker ends after its batch
            while pending:
                signals.append(pending.pop())
                stop_all(signals[-1])
            feed.top_up()
            # 2. progress, results, reported errors
            try:
                event = events.get(timeout=_POLL_S)
            except queue.Empty:
                # 3. a worker that died without reporting (killed, or a crash outside cxrgen's errors)
                for proc in procs:
                    if proc.exitcode not in (None, 0, 130, 143) and not (signals or errors or crashes):
                        crashes.append(f"worker process {proc.pid} died with exit code {proc.exitcode}; what it "
                                       f"finished is kept: run `{resume_command(out)}`")
                        stop_all(signal.SIGTERM)
                continue
            result = results.setdefault(event[1], WorkerResult(event[1]))
            if event[0] == "done":
                result.images += event[2]
                on_done(event[2])
            elif event[0] == "finished":
                result.images, result.seconds = event[2], event[3]
            elif event[0] == "error" and event[3] not in (130, 143):
                errors.append(event[2])
                stop_all(signal.SIGTERM)  # the others stop cleanly after their current UNet step
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return results, errors + crashes, signals


def _stop(procs: list, feed: _Feeder, events) -> None:
    """Join every worker (killing any that outlives the grace period) and release the queues' threads."""
    deadline = time.monotonic() + _STOP_GRACE_S
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    for q in (feed.tasks, events):
        q.cancel_join_thread()  # whatever is still queued is not needed: never wait for it at exit
        q.close()


def _signal_all(procs: list, signum: int) -> None:
    for proc in procs:
        if proc.is_alive():
            try:
                os.kill(proc.pid, signum)
            except ProcessLookupError:
                pass
