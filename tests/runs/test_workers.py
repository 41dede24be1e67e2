"""Several workers or launcher ranks make the same dataset as one process, and merge exactly once."""
from __future__ import annotations

import functools
import os
import queue
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tiny
import torch
from helpers import VOLATILE, five_prompt_manifest
from helpers import five_prompt_config as config
from PIL import Image

import cxrgen.runs.generate
from cxrgen.config import RunConfig
from cxrgen.manifests.workitems import load_plan
from cxrgen.runs.generate import generate, resume
from cxrgen.runs.workers import (
    CHUNK,
    Rank,
    cpu_threads_per_worker,
    local_devices,
    next_batch,
    rank_device,
    rank_from_env,
    rank_share,
)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return five_prompt_manifest(tmp_path_factory.mktemp("m"))


@pytest.fixture(scope="module")
def single(manifest, bundle_dir, text_encoder_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "out"
    generate(config(manifest, out, bundle_dir, text_encoder_dir))
    return out


def assert_same_dataset(a: Path, b: Path) -> None:
    meta_a, meta_b = (pd.read_parquet(p / "metadata.parquet") for p in (a, b))
    pd.testing.assert_frame_equal(meta_a.drop(columns=VOLATILE), meta_b.drop(columns=VOLATILE))
    for name in meta_a.file_name:
        with Image.open(a / name) as x, Image.open(b / name) as y:
            diff = np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int))
        assert (diff <= 1).mean() >= 0.999, name
    files = sorted(str(p.relative_to(b)) for p in (b / "images").rglob("*") if p.is_file())
    assert files == sorted(meta_b.file_name)  # one file per row, nothing else (no temporaries)


def merges(out: Path) -> int:
    return len((out / ".cxrgen" / "merges.log").read_text().splitlines())


def test_two_workers_match_one(manifest, single, bundle_dir, text_encoder_dir, tmp_path):
    out = tmp_path / "w2"
    result = generate(config(manifest, out, bundle_dir, text_encoder_dir, workers=2))
    assert result.written == 10
    assert_same_dataset(single, out)
    assert merges(out) == 1


def test_slow_worker_does_not_hold_the_run_back(manifest, bundle_dir, text_encoder_dir, tmp_path):
    out = tmp_path / "slow"
    # w0 holds its first batch until w1 has journaled 6 of the 10 images: the queue must let w1 take them
    hook = functools.partial(tiny.first_worker_waits_for_the_other, out=str(out), records=6)
    generate(config(manifest, out, bundle_dir, text_encoder_dir, workers=2, batch_size=1), engine_hook=hook)
    meta = pd.read_parquet(out / "metadata.parquet")
    counts = meta.worker.value_counts()
    assert counts.sum() == 10 and meta.image_id.is_unique
    assert counts.get("w1", 0) > counts.get("w0", 0), counts.to_dict()


def _launch(manifest, out, bundle_dir, text_encoder_dir, env_for_rank, world: int) -> list[subprocess.Popen]:
    cmd = [sys.executable, "-m", "cxrgen", "generate", str(manifest), "-o", str(out), "--model", str(bundle_dir),
           "--text-encoder", str(text_encoder_dir), "--steps", "2", "--num-images", "2", "--batch-size", "2",
           "--image-format", "png", "--quiet"]
    return [subprocess.Popen(cmd, env={**os.environ, **env_for_rank(r)}, stderr=subprocess.PIPE, text=True)
            for r in range(world)]


@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_ranks_together_make_the_same_dataset(launcher, manifest, single, bundle_dir, text_encoder_dir, tmp_path):
    out = tmp_path / launcher
    if launcher == "torchrun":
        env = lambda r: {"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)}  # noqa: E731
    else:
        # what srun sets in a job step (the batch script itself has SLURM_PROCID/SLURM_NTASKS but no step)
        env = lambda r: {"SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r),  # noqa: E731
                         "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_ID": "77"}
    procs = _launch(manifest, out, bundle_dir, text_encoder_dir, env, 2)
    errors = [p.communicate(timeout=300)[1] for p in procs]
    # a rank whose share is done waits for the other, so both end with the complete run: 0
    assert [p.returncode for p in procs] == [0, 0], errors
    assert_same_dataset(single, out)
    assert merges(out) == 1
    meta = pd.read_parquet(out / "metadata.parquet")
    assert set(meta.worker) == {"rank0", "rank1"}


def test_dead_rank_is_finished_by_resume_with_one_process(manifest, single, bundle_dir, text_encoder_dir, tmp_path):
    out = tmp_path / "dead"
    # Rank 1 of 2 is killed mid-run by SIGKILL after its first batch is journaled.
    driver = tmp_path / "rank1.py"
    driver.write_text(
        "import os, signal, sys\n"
        f"sys.path.insert(0, {str(Path(tiny.__file__).parent)!r})\n"
        "import cxrgen.runs.journal as store\n"
        "original = store.Journal.append\n"
        "def append(self, records):\n"
        "    original(self, records)\n"
        "    if records: os.kill(os.getpid(), signal.SIGKILL)\n"
        "store.Journal.append = append\n"
        "from cxrgen.cli import main\n"
        "sys.argv = ['cxrgen'] + sys.argv[1:]\n"
        "main()\n")
    base = ["generate", str(manifest), "-o", str(out), "--model", str(bundle_dir), "--text-encoder",
            str(text_encoder_dir), "--steps", "2", "--num-images", "2", "--batch-size", "2", "--image-format",
            "png", "--quiet", "--rank-wait", "0"]
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2"}
    killed = subprocess.run([sys.executable, str(driver), *base], env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    env0 = {**os.environ, "RANK": "0", "WORLD_SIZE": "2"}
    first = subprocess.run([sys.executable, "-m", "cxrgen", *base], env=env0, capture_output=True, text=True)
    # its share is done, rank 1 is dead with work left: nobody merges, and the exit code says "incomplete"
    assert first.returncode == 3, first.stderr
    assert not (out / "metadata.parquet").exists()
    result = resume(out, quiet=True)
    assert result.already_done > 0 and result.written > 0
    assert_same_dataset(single, out)
    assert merges(out) == 1


def test_rank_env_parsing_and_shares():
    assert rank_from_env({}) is None
    assert rank_from_env({"RANK": "0", "WORLD_SIZE": "1"}) is None
    assert rank_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Rank(3, 4, 1)
    step = {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8"}
    assert rank_from_env({"SLURM_PROCID": "2", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", **step}) == Rank(2, 8, 2)
    # the batch script of an allocation is rank 0 of N by its variables, but it is no launch
    assert rank_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "9"}) is None
    assert rank_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "batch",
                          "SLURM_STEP_NUM_TASKS": "4"}) is None
    # an srun step of 2 tasks inside a 4-task allocation: the step's count is the world size
    assert rank_from_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "3",
                          "SLURM_STEP_NUM_TASKS": "2"}) == Rank(1, 2, 0)
    from cxrgen.errors import InputError
    with pytest.raises(InputError, match="RANK=5 is outside"):
        rank_from_env({"RANK": "5", "WORLD_SIZE": "2"})
    with pytest.raises(InputError, match="whole numbers"):
        rank_from_env({"RANK": "x", "WORLD_SIZE": "2"})
    from cxrgen.manifests.reader import Row
    from cxrgen.manifests.workitems import make_plan
    plan = make_plan(tuple(Row(number=i + 1, prompt="p") for i in range(7)), seed=0, num_images=1,
                     guidance_scale=7.0, negative_prompt="", image_format="png")
    shares = [rank_share(plan, Rank(r, 3, 0)) for r in range(3)]
    assert sorted(i.index for s in shares for i in s) == list(range(7))  # every item exactly once


def test_local_devices():
    assert local_devices("auto", 1, 4) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert local_devices("cuda:0,cuda:2", 1, 4) == ["cuda:0", "cuda:2"]
    assert local_devices("auto", 3, 0) == ["cpu", "cpu", "cpu"]
    assert local_devices("cpu", 1, 2) == ["cpu"]


# ------------------------------------------------------------------ issue 18: devices of ranks and workers

def test_a_bare_cuda_means_every_visible_gpu_for_local_workers():
    assert local_devices("cuda", 1, 4) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert local_devices("cuda", 3, 2) == ["cuda:0", "cuda:1", "cuda:0"]
    assert local_devices("cuda", 1, 0) == ["cuda"]  # no GPU: resolve_device then refuses it in one line
    assert local_devices("cuda:1", 2, 4) == ["cuda:1", "cuda:1"]


@pytest.mark.parametrize("env, gpus, device, expected", [
    # torchrun on an 8-GPU node: LOCAL_RANK picks the GPU (the README's example passes --device cuda)
    ({"RANK": "13", "WORLD_SIZE": "16", "LOCAL_RANK": "5"}, 8, "cuda", "cuda:5"),
    ({"RANK": "13", "WORLD_SIZE": "16", "LOCAL_RANK": "5"}, 8, "auto", "cuda:5"),
    # an srun step with 4 tasks per node seeing every GPU of the node
    ({"SLURM_PROCID": "6", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "2", "SLURM_STEP_ID": "0"}, 4, "cuda",
     "cuda:2"),
    # srun --gpus-per-task=1: each task sees one GPU, its own, as GPU 0
    ({"SLURM_PROCID": "6", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "2", "SLURM_STEP_ID": "0"}, 1, "cuda",
     "cuda:0"),
    # more local ranks than GPUs: round robin
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}, 2, "cuda", "cuda:1"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, 4, "cuda:0,cuda:3", "cuda:3"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, 0, "auto", "cpu"),
])
def test_each_rank_gets_its_own_gpu(env, gpus, device, expected, monkeypatch):
    rank = rank_from_env(env)
    assert rank_device(device, rank.local_rank, gpus) == expected
    # and through generate's device choice, with that many (fake) GPUs visible
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    config = RunConfig(manifest="m.csv", out="out", device=device)
    assert cxrgen.runs.generate._devices(config, rank) == [expected]


def test_gpu_workers_share_the_cpu_cores_too():
    assert cpu_threads_per_worker(["cuda:0"] * 8, 16) == 2  # 8 GPU workers must not each keep 16 threads
    assert cpu_threads_per_worker(["cpu", "cpu"], 16) == 8
    assert cpu_threads_per_worker(["cuda:0", "cuda:1"], 1) == 1


@pytest.fixture()
def keep_signal_handlers():
    """worker_main installs its own SIGINT/SIGTERM handlers; a test that calls it in-process restores them."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_a_worker_makes_its_gpu_current_before_loading_anything(manifest, bundle_dir, text_encoder_dir, tmp_path,
                                                                 monkeypatch, keep_signal_handlers):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", str(device))))

    def load_models(config, bundle_root, device):
        calls.append(("load_models", device))
        raise RuntimeError("stop here")
    monkeypatch.setattr(cxrgen.runs.generate, "load_models", load_models)
    events = queue.Queue()
    with pytest.raises(RuntimeError, match="stop here"):
        cxrgen.runs.generate.worker_main(config(manifest, tmp_path / "out", bundle_dir, text_encoder_dir), "root",
                                         "cuda:1", "bfloat16", "w1", None, torch.get_num_threads(), 0, (0, 1),
                                         queue.Queue(), events)
    assert calls == [("set_device", "cuda:1"), ("load_models", "cuda:1")]
    assert events.get_nowait()[0] == "error"


def test_next_batch_gathers_chunks_up_to_the_workers_size():
    tasks = queue.Queue()
    for start in range(0, 10, 2):
        tasks.put(list(range(start, start + 2)))  # chunks of 2
    tasks.put(None)
    size = [3]
    batches = []
    for batch in next_batch(tasks, lambda: False, lambda: size[0]):
        batches.append(batch)
        size[0] = 4 if len(batches) == 2 else size[0]  # a worker may change its size (calibration)
    assert batches == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    # without a size, each queued batch as it is (fixed --batch-size)
    tasks.put([1, 2, 3])
    tasks.put(None)
    assert list(next_batch(tasks, lambda: False)) == [[1, 2, 3]]


def test_the_parent_of_gpu_workers_never_reads_gpu_memory(manifest, bundle_dir, text_encoder_dir, tmp_path,
                                                          monkeypatch):
    """--batch-size 0 with two GPU workers: the parent queues chunks and leaves sizing to each worker (reading
    free memory would open a CUDA context on the GPU, held for the whole run)."""
    def no_context(*args, **kwargs):
        raise AssertionError("the parent process touched GPU memory")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    for name in ("mem_get_info", "memory_allocated", "set_device", "empty_cache", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, no_context)
    seen = {}

    def run_local_workers(target, args_of, devices, batches, on_done, out, ahead=2):
        seen.update(devices=devices, batches=batches, args=args_of(0, devices[0]), ahead=ahead)
        return []
    monkeypatch.setattr(cxrgen.runs.generate, "run_local_workers", run_local_workers)
    generate(config(manifest, tmp_path / "out", bundle_dir, text_encoder_dir, device="cuda", batch_size=0))
    assert seen["devices"] == ["cuda:0", "cuda:1"]
    assert [len(b) for b in seen["batches"]] == [CHUNK, 10 - CHUNK]  # chunks, not batches
    *_, dtype, name, hook, threads, gather, share = seen["args"]
    assert dtype == "bfloat16" and gather == 5 and share == (0, 1)  # each worker gathers at most its share of the 10 images
    assert seen["ahead"] * len(seen["devices"]) * CHUNK >= 2 * 128  # enough queued for the largest batches


def test_a_worker_gathers_its_own_batches_and_makes_the_same_images(manifest, single, bundle_dir, text_encoder_dir,
                                                                    tmp_path, keep_signal_handlers):
    cfg = config(manifest, tmp_path / "out", bundle_dir, text_encoder_dir, batch_size=0)
    plan = load_plan(cfg)[1]
    tasks, events = queue.Queue(), queue.Queue()
    for start in range(0, len(plan), 2):
        tasks.put(plan[start:start + 2])
    tasks.put(None)
    sizes = []

    def sized_like_a_gpu(engine, name):
        engine.batch_size = 3  # what its free memory allowed, on its own device
        original = engine.run_batch

        def run_batch(items, on_step=None):
            sizes.append(len(items))
            return original(items, on_step)
        engine.run_batch = run_batch
        return engine

    cxrgen.runs.generate.worker_main(cfg, str(bundle_dir), "cpu", "float32", "w0", sized_like_a_gpu,
                                     torch.get_num_threads(), len(plan), (0, 1), tasks, events)
    assert sizes == [3, 3, 3, 1]
    finished = [e for e in list(events.queue) if e[0] == "finished"]
    assert finished == [("finished", "w0", 10, finished[0][3])]
    for item in plan:
        with Image.open(single / item.file_name) as a, Image.open(tmp_path / "out" / item.file_name) as b:
            assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
