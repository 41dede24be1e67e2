"""Engine hooks for tests (test-only seams); the tiny random-weight models come from cxrgen.model.demo.

Each hook is `hook(engine, worker_name) -> engine`, module-level so worker processes can unpickle it.
"""
from __future__ import annotations

from pathlib import Path


def first_worker_waits_for_the_other(engine, name: str, out: str = "", records: int = 0):
    """engine_hook for tests: w0 holds its first batch until w1 has journaled `records` images.

    Deterministic, unlike a sleep racing real work: w1 must take more of the queue whatever the load.
    Bind `out` and `records` with functools.partial (picklable: module-level).
    """
    import time

    if name == "w0":
        original = engine.run_batch
        journal = Path(out) / ".cxrgen" / "records" / "part-w1.jsonl"

        def wait_then_run(items, on_step=None):
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                if journal.is_file() and len(journal.read_text().splitlines()) >= records:
                    break
                time.sleep(0.05)
            return original(items, on_step)

        engine.run_batch = wait_then_run
    return engine


def fail_in_w1(engine, name: str, after: int = 1, marker: str = ""):
    """engine_hook for tests: worker w1 raises a plain RuntimeError (not a cxrgen error) after `after` batches,
    first creating the file `marker` (when given) so a test knows when it failed."""
    if name == "w1":
        original = engine.run_batch
        calls = [0]

        def failing(items, on_step=None):
            calls[0] += 1
            if calls[0] > after:
                if marker:
                    Path(marker).touch()
                raise RuntimeError("simulated worker bug")
            return original(items, on_step)

        engine.run_batch = failing
    return engine


def fail_at_start_in_w1(engine, name: str):
    """engine_hook for tests: worker w1 raises a plain RuntimeError as it starts (whatever the timing)."""
    if name == "w1":
        raise RuntimeError("simulated worker bug")
    return engine


def sigterm_in_w1_before_sampling(engine, name: str):
    """engine_hook for tests: worker w1 gets SIGTERM after loading its models, before the batch loop."""
    import os
    import signal
    import time

    if name == "w1":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # the signal is delivered here, outside the loop's own handler
    return engine


def w1_never_ends_and_the_other_fails(engine, name: str):
    """engine_hook for tests: w1 ignores SIGTERM and never ends (as if stuck on a dead process's queue lock);
    the other worker fails, so the parent stops both."""
    import signal
    import time

    if name == "w1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(3600)
    time.sleep(1.0)  # w1 is in its sleep by now
    raise RuntimeError("simulated worker bug")


def log_library_lines(engine, name: str):
    """engine_hook for tests: a worker's MONAI and transformers loggers each log a warning."""
    import logging

    from transformers.utils import logging as hf_logging

    logging.getLogger("monai.bundle").warning(f"monai warning from {name}")
    hf_logging.get_logger("transformers.modeling_utils").warning(f"transformers warning from {name}")
    return engine


def record_threads(engine, name: str, folder: str = ""):
    """engine_hook for tests: each worker writes its torch intra-op thread count to folder/<name>."""
    import torch

    (Path(folder) / name).write_text(str(torch.get_num_threads()))
    return engine


def oom_above_two_images(engine, name: str):
    """engine_hook for tests: the UNet 'runs out of memory' for more than 2 images (4 guidance rows)."""
    import torch

    original = engine.denoise

    def denoise(x, timesteps, context):
        if x.shape[0] > 4:
            raise torch.cuda.OutOfMemoryError("simulated: CUDA out of memory")
        return original(x, timesteps, context)

    engine.denoise = denoise
    return engine


def decoder_oom_above_one_latent(engine, name: str):
    """engine_hook for tests: the decoder 'runs out of memory' for more than one latent; counts UNet calls."""
    import torch

    original_decode, original_denoise = engine.decode, engine.denoise
    engine.unet_calls = 0

    def decode(z):
        if z.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("simulated: CUDA out of memory")
        return original_decode(z)

    def denoise(x, timesteps, context):
        engine.unet_calls += 1
        return original_denoise(x, timesteps, context)

    engine.decode, engine.denoise = decode, denoise
    return engine


def record_device(engine, name: str, folder: str = ""):
    """engine_hook for tests: each worker writes its engine's device, the device of its weights and its current
    CUDA device to folder/<name>."""
    import json

    import torch

    device = engine.options.device
    (Path(folder) / name).write_text(json.dumps({
        "device": str(device), "weights": str(next(engine.unet.parameters()).device),
        "current": torch.cuda.current_device() if device.type == "cuda" else None}))
    return engine


def one_gray_level_brighter(engine, name: str):
    """engine_hook for tests: every image comes out one gray level brighter, as float rounding in another batch
    can make a remade image differ from the first (other bytes, same size or not)."""
    original = engine.run_batch

    def brighter(items, on_step=None):
        images = original(items, on_step)
        return images.clamp(max=254) + 1

    engine.run_batch = brighter
    return engine


def sigkill_once_after(engine, name: str, marker: str = "", batches: int = 1):
    """engine_hook for tests (Ray actors): the first worker to start its batch number `batches` + 1 SIGKILLs its
    own process, once per marker file (created exclusively, so exactly one incarnation of one actor dies)."""
    import os
    import signal

    original = engine.run_batch
    calls = [0]

    def run_batch(items, on_step=None):
        calls[0] += 1
        if calls[0] > batches:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return original(items, on_step)

    engine.run_batch = run_batch
    return engine


def fail_with_run_error(engine, name: str):
    """engine_hook for tests: every batch fails with a cxrgen RunError (as a full disk would)."""
    from cxrgen.errors import RunError

    def run_batch(items, on_step=None):
        raise RunError(f"simulated full disk in {name}")

    engine.run_batch = run_batch
    return engine


def slow_batches(engine, name: str, seconds: float = 0.5):
    """engine_hook for tests: every batch takes at least `seconds` longer (a run that is surely mid-way when killed)."""
    import time

    original = engine.run_batch

    def run_batch(items, on_step=None):
        time.sleep(seconds)
        return original(items, on_step)

    engine.run_batch = run_batch
    return engine
