"""The batch loop of one worker: sample, hand pixels to writer threads, journal finished images."""
from __future__ import annotations

import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Callable, Iterable

from cxrgen.errors import Interrupted, RunError
from cxrgen.files import file_check, resume_command
from cxrgen.manifests.workitems import WorkItem
from cxrgen.provenance import encode_image, provenance_of
from cxrgen.runs.journal import Journal
from cxrgen.storage.base import Store

_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopRequested(Exception):
    """Raised inside sampling when a signal asked the run to stop."""


class SignalGuard:
    """Turns SIGINT/SIGTERM into a flag the loop checks between UNet calls (main thread only)."""

    def __init__(self, stop_check: Callable[[], bool] | None = None):
        self.signum: int | None = None
        self._stop_check = stop_check  # e.g. "my parent process died": stop as if SIGTERM arrived
        self._previous: dict = {}

    def __enter__(self) -> "SignalGuard":
        if threading.current_thread() is threading.main_thread():
            for signum in _EXIT_CODES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def check(self, *_args) -> None:
        """Raise StopRequested once a signal has arrived."""
        if self.signum is None and self._stop_check is not None and self._stop_check():
            self.signum = signal.SIGTERM
        if self.signum is not None:
            raise StopRequested()

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def make_record(item: WorkItem, common: dict, token_info: dict) -> dict:
    """The metadata row of one finished image (label columns are joined at the end)."""
    return {
        "image_id": item.image_id, "file_name": item.file_name, "prompt": item.prompt,
        "negative_prompt": item.negative_prompt, "manifest_row": item.row, "row_id": item.row_id,
        "sample_index": item.sample_index, "seed": item.seed, "guidance_scale": item.guidance_scale,
        **common, **token_info, "created_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
    }


class BatchLoop:
    """Runs batches through an engine; writes overlap with the next batch's sampling."""

    def __init__(self, engine, out: Store, journal: Journal, common: dict, image_format: str,
                 jpeg_quality: int, token_info: Callable[[str], dict], on_done: Callable[[int], None]):
        self.engine, self.out, self.journal, self.common = engine, out, journal, common
        self.image_format, self.jpeg_quality = image_format, jpeg_quality
        self.token_info, self.on_done = token_info, on_done
        self.written = 0
        # at most two batches in flight (this one's writes, the next one's sampling): bounded memory
        self._pool = ThreadPoolExecutor(max_workers=out.write_threads, thread_name_prefix="cxrgen-write")

    def _write_one(self, item: WorkItem, pixels, tokens: dict) -> dict:
        record = make_record(item, self.common, tokens)
        data = encode_image(pixels, self.image_format, self.jpeg_quality, provenance_of(record))
        # A local folder's fsync waits for the batch (_drain): one per folder per batch instead of one per image
        # on the loop's critical path (~tens of ms each on NFS or Lustre).
        self.out.write_batch_file(item.file_name, data)
        # Size and checksum of the bytes already in memory: a start-up then needs one stat per image,
        # and `--verify` can tell a damaged file from a good one without trusting the decoder alone.
        return {**record, **file_check(data)}

    def _submit(self, items: list[WorkItem], images) -> list[Future]:
        # Tokenize here, on the sampling thread: the tokenizer is not thread-safe (padding state).
        return [self._pool.submit(self._write_one, item, images[i].numpy(), self.token_info(item.prompt))
                for i, item in enumerate(items)]

    def _drain(self, futures: list[Future]) -> None:
        """Journal every image whose file landed; re-raise the first write error after that."""
        records, error = [], None
        for future in futures:
            try:
                records.append(future.result())
            except RunError as exc:
                error = error or exc
        # The renames are durable before any record names them: a record exists only after its file.
        self.out.settle([r["file_name"] for r in records])
        self.journal.append(records)
        self.written += len(records)
        self.on_done(len(records))
        if error is not None:
            raise error

    def run(self, batches: Iterable, guard: SignalGuard) -> None:
        """Process batches until done or a signal; always drains pending writes first."""
        self._pending: list[Future] = []
        try:
            self._batches(batches, guard)
        except StopRequested:
            self._drain(self._pending)
            raise Interrupted(f"stopped by {signal.Signals(guard.signum).name} after writing {self.written} "
                              f"image(s); finish with `{resume_command(self.out)}`", _EXIT_CODES[guard.signum])
        except BaseException:
            self._finish_quietly(self._pending)
            raise
        finally:
            self._close()

    def _batches(self, batches: Iterable[list[WorkItem]], guard: SignalGuard) -> None:
        for items in batches:
            # 1. stop between batches once a signal has arrived
            guard.check()
            # 2. sample and decode (the signal flag is checked between UNet calls)
            images = self.engine.run_batch(items, on_step=guard.check)
            # 3. hand pixels to writer threads, then journal the previous batch
            # (hand `pending` over before draining it: a failed drain must not journal it a second time)
            previous, self._pending = self._pending, self._submit(items, images)
            self._drain(previous)
        last, self._pending = self._pending, []
        self._drain(last)

    def _close(self) -> None:
        self._pool.shutdown(wait=True)

    def _finish_quietly(self, pending: list[Future]) -> None:
        try:
            self._drain(pending)
        except RunError:
            pass


def batches_of(items: list[WorkItem], size: int) -> Iterable[list[WorkItem]]:
    """Consecutive slices of at most `size` items."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def sized_batches(items: list[WorkItem], size: Callable[[], int]) -> Iterable[list[WorkItem]]:
    """Consecutive slices, each as long as size() says when it is cut (an engine's batch size, which its
    first batch calibrates and an out-of-memory error lowers)."""
    start = 0
    while start < len(items):
        step = max(1, size())
        yield items[start:start + step]
        start += step

