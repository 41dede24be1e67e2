"""The batch loop of a `--verify` worker: attempts sampled in batches, each scored from its encoded file while the
next batch samples, every verdict journaled before the next attempt of that image joins a later batch."""
from __future__ import annotations

import contextlib
import io
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from cxrgen.errors import InputError, RunError
from cxrgen.files import file_check
from cxrgen.provenance import encode_image, provenance_of
from cxrgen.runs.journal import Journal
from cxrgen.runs.loop import BatchLoop, SignalGuard, make_record
from cxrgen.runs.verify import (
    ATTEMPTS_DIR,
    Unit,
    Verification,
    better,
    holds,
    judge,
    kept_record,
    rejected_name,
)
from cxrgen.storage.base import Store

_SCORE_BATCH = 16  # images per classifier call: its activations stay small beside the UNet's on a shared GPU


class Verifier:
    """The verifier network on the generating device, and the run's verify settings."""

    def __init__(self, verification: Verification, device: torch.device):
        from cxrgen.model.classifier import load_evaluator

        self.verification = verification
        self.evaluator = load_evaluator(Path(verification.weights), str(device), release=verification.release)
        if self.evaluator.sha256 != verification.sha256:
            raise InputError(f"the verifier's weights {verification.weights} changed while the run started (sha256 "
                             f"{self.evaluator.sha256}, expected {verification.sha256}); restore the file")
        # its own stream, so its kernels can run beside the next batch's UNet steps on the same GPU
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def score(self, files: list[bytes]) -> list[dict[str, float]]:
        """Calibrated scores of each encoded image file, decoded as any reader of the file decodes it."""
        from cxrgen.model.classifier import decode_gray, preprocess

        if not files:
            return []
        tensors = [torch.from_numpy(preprocess(decode_gray(io.BytesIO(data)))) for data in files]
        rows = []
        for start in range(0, len(tensors), _SCORE_BATCH):
            batch = torch.stack(tensors[start:start + _SCORE_BATCH])
            with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
                _, scores = self.evaluator.forward(batch)
            rows.extend(scores)
        names = self.evaluator.pathologies
        return [{name: float(row[k]) for k, name in enumerate(names)} for row in rows]


class _Inline:
    """An executor that runs each job at once in the calling thread (the CPU's: see VerifyingLoop)."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - delivered by result(), as a thread pool's future does
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True) -> None:
        pass


@dataclass
class _Outcome:
    """What judging and writing one batch produced, journaled by the sampling thread in this order."""

    attempts: list[dict] = field(default_factory=list)  # verdicts: before the images they decide
    images: list[dict] = field(default_factory=list)  # kept images' records
    retries: list[Unit] = field(default_factory=list)  # next attempts, queued once the verdicts are journaled
    error: RunError | None = None
    seconds: float = 0.0  # spent judging (decode, preprocess, classifier)


class VerifyingLoop(BatchLoop):
    """BatchLoop over Units: retries join later batches with other work, so no GPU batch shrinks to one image
    while fresh work is left (the run's last attempts may form smaller batches)."""

    def __init__(self, engine, out: Store, journal: Journal, common: dict, image_format: str, jpeg_quality: int,
                 token_info: Callable[[str], dict], on_done: Callable[[int], None], verifier: Verifier,
                 batch_size: int, writer: str):
        super().__init__(engine, out, journal, common, image_format, jpeg_quality, token_info, on_done)
        self.verifier, self.size = verifier, max(1, batch_size)
        self.attempt_journal = Journal(out, writer, folder=ATTEMPTS_DIR)
        self.retries: deque[Unit] = deque()
        self.attempts = 0  # attempts judged by this worker
        self.made = 0  # images sampled by this worker (attempts, plain images and remakes)
        self.judge_seconds = 0.0
        # On a GPU the judging (decode, preprocess, classifier on its own stream) overlaps the next batch's UNet
        # steps; on a CPU both would fight over the same cores (two OpenMP teams), so it runs in turn, inline.
        self._judge_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxrgen-verify") \
            if verifier.stream is not None else _Inline()
        self._exhausted = False

    def _next_units(self, source, carry: deque, waiting: bool) -> list[Unit] | None:
        """Retries first, then fresh units, up to a batch; None: drain the pending batch first (the fresh work is
        used up and its verdicts may add retries to this batch)."""
        while len(carry) + len(self.retries) < self.size and not self._exhausted:
            batch = next(source, None)
            if batch is None:
                self._exhausted = True
            else:
                carry.extend(batch)
        if self._exhausted and waiting and len(carry) + len(self.retries) < self.size:
            return None
        units = []
        while len(units) < self.size and (self.retries or carry):
            units.append(self.retries.popleft() if self.retries else carry.popleft())
        return units

    def _batches(self, batches: Iterable[list[Unit]], guard: SignalGuard) -> None:
        """Process units until none is left (BatchLoop.run journals pending verdicts and images on a stop)."""
        source, carry = iter(batches), deque()
        while True:
            guard.check()
            units = self._next_units(source, carry, bool(self._pending))
            if units is None:
                last, self._pending = self._pending, []
                self._drain(last)
                continue
            if not units:
                break
            images = self.engine.run_batch([u.engine_item for u in units], on_step=guard.check)
            self.made += len(units)
            previous, self._pending = self._pending, self._submit(units, images)
            self._drain(previous)

    def _close(self) -> None:
        self._judge_pool.shutdown(wait=True)
        self._pool.shutdown(wait=True)
        self.attempt_journal.close()

    def _submit(self, units: list[Unit], images) -> list[Future]:
        # Tokenize here, on the sampling thread: the tokenizer is not thread-safe (padding state).
        tokens = [self.token_info(u.item.prompt) for u in units]
        pixels = [images[i].numpy() for i in range(len(units))]
        return [self._judge_pool.submit(self._judge_and_write, units, pixels, tokens)]

    def _drain(self, futures: list[Future]) -> None:
        """Journal the verdicts, then the kept images, then queue the retries; re-raise a write error after that."""
        error = None
        for future in futures:
            outcome = future.result()
            self.attempt_journal.append(outcome.attempts)
            self.journal.append(outcome.images)
            self.written += len(outcome.images)
            self.attempts += len(outcome.attempts)
            self.judge_seconds += outcome.seconds
            self.on_done(len(outcome.images))
            self.retries.extend(outcome.retries)
            error = error or outcome.error
        if error is not None:
            raise error

    # ------------------------------------------------------------------------------ the judging thread

    def _judge_and_write(self, units: list[Unit], pixels: list, tokens: list[dict]) -> _Outcome:
        outcome = _Outcome()
        records, files = [], []
        for unit, image, token in zip(units, pixels, tokens):
            record = make_record(unit.engine_item, self.common, token)
            record["attempt"] = unit.attempt
            if not unit.judge:
                record.update(unit.keep or {})
            records.append(record)
            files.append(encode_image(image, self.image_format, self.jpeg_quality, provenance_of(record)))
        started = time.perf_counter()
        judged = [i for i, u in enumerate(units) if u.judge]
        scores = dict(zip(judged, self.verifier.score([files[i] for i in judged])))
        outcome.seconds = time.perf_counter() - started
        for i, unit in enumerate(units):
            try:
                if unit.judge:
                    self._decide(unit, records[i], files[i], scores[i], outcome)
                else:
                    self._write(unit.item.file_name, files[i])
                    outcome.images.append({**records[i], **file_check(files[i])})
            except RunError as exc:  # full disk, say: the others' records still go into the journal
                outcome.error = outcome.error or exc
        return outcome

    def _write(self, name: str, data: bytes) -> None:
        self.out.write_bytes(name, data)

    def _decide(self, unit: Unit, record: dict, data: bytes, scores: dict, outcome: _Outcome) -> None:
        settings = self.verifier.verification
        verdict = judge(scores, unit.targets, settings.min_score)
        attempt = {**record, **file_check(data), "accepted": verdict.accepted, "verify_score": verdict.verify_score,
                   "margin": verdict.margin if abs(verdict.margin) != float("inf") else None,
                   "scores": {p: scores.get(p) for p, _ in unit.targets},
                   "positives": [p for p, positive in unit.targets if positive], "passed": list(verdict.passed),
                   "failed_negatives": list(verdict.failed_negatives), "at_path": False}
        if not verdict.accepted and settings.keep_rejected:
            attempt["rejected_file"] = rejected_name(unit.item.file_name, unit.attempt)
            self._write(attempt["rejected_file"], data)
        best = unit.best
        if verdict.accepted or better(attempt, best):
            # the image's path always holds its best attempt so far: the one kept when the attempts run out
            self._write(unit.item.file_name, data)
            attempt["at_path"] = True
            best = attempt
        outcome.attempts.append(attempt)
        if verdict.accepted:
            outcome.images.append(kept_record(attempt, True))
        elif unit.attempt + 1 < settings.max_attempts:
            outcome.retries.append(Unit(unit.item, unit.attempt + 1, targets=unit.targets, best=best))
        elif best is attempt or holds(self.out.local / unit.item.file_name, best):
            outcome.images.append(kept_record(best, False))
        else:  # the best attempt's file is gone: make that attempt again, its verdict is known
            outcome.retries.append(Unit(unit.item, int(best["attempt"]), judge=False, targets=unit.targets,
                                        keep={"verified": False, "verify_score": best.get("verify_score")}))


def verifying_loop(engine, out: Store, journal: Journal, common: dict, config, token_info, on_done, name: str,
                   verification: Verification | None = None) -> VerifyingLoop:
    """The loop of one --verify worker; a worker process rebuilds `verification` from its config and run.json."""
    from cxrgen.model.engine import default_batch_size
    from cxrgen.runs.state import read_run_json
    from cxrgen.runs.verify import from_run

    verifier = Verifier(verification or from_run(config, read_run_json(out)), engine.options.device)
    return VerifyingLoop(engine, out, journal, common, config.image_format, config.jpeg_quality, token_info,
                         on_done, verifier, config.batch_size or default_batch_size(engine.options.device), name)
