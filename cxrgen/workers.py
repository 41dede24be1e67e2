"""Several workers for one run: local processes pulling batches from a queue, or launcher ranks."""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cxrgen.errors import InputError, Interrupted, RunError
from cxrgen.plan import WorkItem
from cxrgen.store import resume_command

_POLL_S = 0.2


@dataclass(frozen=True)
class Rank:
    """This process's place in a launcher-started run (torchrun or Slurm)."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def name(self) -> str:
        return f"rank{self.rank}"


def rank_from_env(environ: dict) -> Rank | None:
    """torchrun's RANK/WORLD_SIZE/LOCAL_RANK or Slurm's SLURM_PROCID/NTASKS/LOCALID; None when absent.

    Called by the CLI only: environment variables are read at the boundary.
    """
    for rank, world, local in (("RANK", "WORLD_SIZE", "LOCAL_RANK"),
                               ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        if rank in environ and world in environ:
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
    """One device string per local worker: every visible GPU for auto, else the list or N CPU workers."""
    if device == "auto" and cuda_count > 0:
        return [f"cuda:{i}" for i in range(cuda_count)] if workers == 1 else \
            [f"cuda:{i % cuda_count}" for i in range(workers)]
    if "," in device:
        return [d.strip() for d in device.split(",") if d.strip()]
    return [("cpu" if device == "auto" else device)] * workers


@dataclass
class WorkerResult:
    """Images written and seconds taken by one worker, for the per-worker summary line."""

    name: str
    images: int = 0
    seconds: float = 0.0


def run_local_workers(target: Callable, args_of: Callable[[int, str], tuple], devices: list[str],
                      batches: list[list[WorkItem]], on_done: Callable[[int], None], out: Path) -> list[WorkerResult]:
    """Start one process per device; each pulls the next batch from a shared queue until none remain.

    `target(*args_of(index, device), tasks, events)` runs in each child and reports through `events`:
    ("done", name, n), ("finished", name, images, seconds) or ("error", name, message, exit_code).
    """
    ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
    tasks, events = ctx.Queue(), ctx.Queue()
    for batch in batches:
        tasks.put(batch)
    for _ in devices:
        tasks.put(None)
    procs = [ctx.Process(target=target, args=(*args_of(i, d), tasks, events)) for i, d in enumerate(devices)]
    for proc in procs:
        proc.start()
    results, errors, signals = _supervise(procs, events, on_done)
    for proc in procs:
        proc.join()
    if signals:
        raise Interrupted(f"stopped by {signal.Signals(signals[0]).name}; what was written is kept: "
                          f"finish with `{resume_command(out)}`", 130 if signals[0] == signal.SIGINT else 143)
    if errors:
        raise RunError(errors[0])
    dead = [p for p in procs if p.exitcode != 0]
    if dead:
        raise RunError(f"worker process {dead[0].pid} died with exit code {dead[0].exitcode}; what it "
                       f"finished is kept: run `{resume_command(out)}`")
    return sorted(results.values(), key=lambda r: r.name)


def _supervise(procs: list, events, on_done: Callable[[int], None]) -> tuple[dict, list[str], list[int]]:
    """Relay progress; forward SIGINT/SIGTERM to the workers; stop all workers after one fails."""
    results: dict[str, WorkerResult] = {}
    errors: list[str] = []
    signals: list[int] = []
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _f: pending.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while any(p.is_alive() for p in procs) or not events.empty():
            while pending:
                signals.append(pending.pop())
                _signal_all(procs, signals[-1])
            try:
                event = events.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            result = results.setdefault(event[1], WorkerResult(event[1]))
            if event[0] == "done":
                result.images += event[2]
                on_done(event[2])
            elif event[0] == "finished":
                result.images, result.seconds = event[2], event[3]
            elif event[0] == "error" and event[3] not in (130, 143):
                errors.append(event[2])
                _signal_all(procs, signal.SIGTERM)  # the others stop cleanly after their current batch
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return results, errors, signals


def _signal_all(procs: list, signum: int) -> None:
    for proc in procs:
        if proc.is_alive():
            try:
                os.kill(proc.pid, signum)
            except ProcessLookupError:
                pass
