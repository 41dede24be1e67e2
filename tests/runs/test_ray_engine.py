"""--engine ray (issue 22): a local Ray started here, CPU actors and the tiny bundle make the same dataset as one
process, survive a killed actor and a killed driver, and refuse a missing extra or a dead address in one line.

Checked through the files, the journal and metadata.parquet; output text only for the one-line errors.
"""
from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
import tiny
from helpers import VOLATILE, assert_input_error, five_prompt_manifest
from helpers import five_prompt_config as config
from typer.testing import CliRunner

import cxrgen.runs.generate
from cxrgen.cli import app
from cxrgen.config import RunConfig, ray_worker_bounds
from cxrgen.errors import InputError, RunError
from cxrgen.files import STATE_DIR
from cxrgen.manifests.workitems import load_plan
from cxrgen.runs.generate import generate, load_engine, resume, sample_batches
from cxrgen.runs.journal import Journal, RECORDS_DIR, read_records
from cxrgen.storage.locks import FolderLock, holder_name
from cxrgen.runs.loop import batches_of
from cxrgen.runs.ray_engine import BatchWorker, RayCluster, placement
from cxrgen.runs.workers import Rank

TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return five_prompt_manifest(tmp_path_factory.mktemp("m"))


@pytest.fixture(scope="module")
def single(manifest, bundle_dir, text_encoder_dir, tmp_path_factory, one_torch_thread) -> Path:
    """The reference: one local process, batches of 2 (5 batches of 10 images)."""
    out = tmp_path_factory.mktemp("single") / "out"
    generate(config(manifest, out, bundle_dir, text_encoder_dir))
    return out


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray of 2 CPUs for this module; its workers can import the tests' engine hooks (tests/tiny.py)."""
    before = os.environ.get("PYTHONPATH")
    # Ray's processes inherit this process's environment when it starts them
    os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), *([before] if before else [])])
    try:
        context = ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
                           logging_level="ERROR")
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before
    yield context.address_info["gcs_address"]
    ray.shutdown()


def same_files_and_metadata(a: Path, b: Path) -> pd.DataFrame:
    """Byte-equal images (same batch composition on the CPU) and equal metadata but for when and who."""
    meta_a, meta_b = (pd.read_parquet(p / "metadata.parquet") for p in (a, b))
    pd.testing.assert_frame_equal(meta_a.drop(columns=VOLATILE), meta_b.drop(columns=VOLATILE))
    for name in meta_a.file_name:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    files = sorted(str(p.relative_to(b)) for p in (b / "images").rglob("*") if p.is_file())
    assert files == sorted(meta_b.file_name)  # one file per row, nothing else (no temporaries)
    return meta_b


def merges(out: Path) -> int:
    return len((out / STATE_DIR / "merges.log").read_text().splitlines())


def test_ray_run_equals_one_process(manifest, single, bundle_dir, text_encoder_dir, tmp_path, ray_address):
    out = tmp_path / "ray"
    result = generate(config(manifest, out, bundle_dir, text_encoder_dir, engine="ray", ray_workers="2"))
    assert result.complete and result.written == 10
    meta = same_files_and_metadata(single, out)
    assert merges(out) == 1
    assert all(w.startswith("ray-") for w in meta.worker), set(meta.worker)
    # every writer journals into its own part, named after the worker column
    parts = {p.name for p in (out / RECORDS_DIR).glob("part-*.jsonl")}
    assert {f"part-{w}.jsonl" for w in meta.worker} <= parts


def test_killed_actor_is_restarted_and_the_dataset_stays_exact(manifest, single, bundle_dir, text_encoder_dir,
                                                                tmp_path, ray_address):
    out, marker = tmp_path / "killed", tmp_path / "killed.marker"
    # the first actor to start its 2nd batch SIGKILLs itself; Ray restarts it and retries that batch on it
    hook = functools.partial(tiny.sigkill_once_after, marker=str(marker), batches=1)
    result = generate(config(manifest, out, bundle_dir, text_encoder_dir, engine="ray", ray_workers="2"),
                      engine_hook=hook)
    assert marker.exists() and result.complete
    meta = same_files_and_metadata(single, out)
    assert merges(out) == 1
    # the retried batch was written by the restarted incarnation of the killed actor, into a part of its own
    restarted = [w for w in set(meta.worker) if not w.endswith("-0")]
    assert restarted, set(meta.worker)
    lineage = restarted[0].rpartition("-")[0]
    assert (out / RECORDS_DIR / f"part-{lineage}-0.jsonl").is_file()


def test_an_actor_error_stops_the_run_in_one_line_and_resume_with_ray_finishes(manifest, single, bundle_dir,
                                                                                text_encoder_dir, tmp_path,
                                                                                ray_address):
    out = tmp_path / "error"
    with pytest.raises(RunError, match="simulated full disk in ray-"):
        generate(config(manifest, out, bundle_dir, text_encoder_dir, engine="ray", ray_workers="2"),
                 engine_hook=tiny.fail_with_run_error)
    assert not (out / "metadata.parquet").exists()
    result = resume(out, engine="ray", ray_workers="1", quiet=True)
    assert result.complete and result.written == 10
    same_files_and_metadata(single, out)
    assert merges(out) == 1


def _start_driver(script: Path, call: str) -> subprocess.Popen:
    """A driver process running `call` (generate or resume with the Ray engine, every batch 1 s slower so it is
    surely mid-run when a signal comes); a cxrgen error exits with its code, as the CLI's does."""
    script.write_text(
        "import functools, sys\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "import tiny\n"
        "from cxrgen.config import RunConfig\n"
        "from cxrgen.errors import CxrgenError\n"
        "from cxrgen.runs.generate import generate, resume\n"
        "hook = functools.partial(tiny.slow_batches, seconds=1.0)\n"
        "try:\n"
        f"    {call}\n"
        "except CxrgenError as exc:\n"
        "    print(f'cxrgen: error: {exc}', file=sys.stderr)\n"
        "    sys.exit(exc.exit_code)\n")
    return subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True)


def _wait_for_records(out: Path, count: int, driver: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while len(read_records(out, ("file_name",))) < count and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)


def test_stopped_and_killed_drivers_leave_a_folder_resume_completes(manifest, single, bundle_dir, text_encoder_dir,
                                                                    tmp_path, ray_address):
    out = tmp_path / "driver"
    cfg = config(manifest, out, bundle_dir, text_encoder_dir, engine="ray", ray_workers="2", ray_address=ray_address)
    # 1. SIGTERM: the driver stops the pool and exits 143 with one line; what was journaled is kept
    driver = _start_driver(tmp_path / "generate.py",
                           f"generate(RunConfig.from_dict({cfg.to_dict()!r}), engine_hook=hook)")
    _wait_for_records(out, 2, driver)
    driver.send_signal(signal.SIGTERM)
    stderr = driver.communicate(timeout=300)[1]
    assert driver.returncode == 143, stderr
    assert [line for line in stderr.splitlines() if line.startswith("cxrgen: error: stopped by SIGTERM")], stderr
    first = len(read_records(out, ("file_name",)))
    assert 2 <= first < 10, first
    # 2. SIGKILL of a driver resuming with the Ray engine: Ray ends its actors with it
    driver = _start_driver(tmp_path / "resume.py", f"resume({str(out)!r}, engine='ray', engine_hook=hook, quiet=True)")
    _wait_for_records(out, first + 2, driver)
    driver.send_signal(signal.SIGKILL)
    assert driver.wait() == -signal.SIGKILL, driver.stderr.read()
    done = len(read_records(out, ("file_name",)))
    assert first + 2 <= done < 10, (first, done)  # killed mid-run
    assert not (out / "metadata.parquet").exists()
    # 3. `cxrgen resume OUT --engine local` finishes the same dataset as one process, merged once
    result = resume(out, engine="local", quiet=True)
    assert result.complete and result.already_done >= done and result.written == 10 - result.already_done
    same_files_and_metadata(single, out)
    assert merges(out) == 1


def test_missing_extra_is_one_line_before_any_model_loads(manifest, bundle_dir, text_encoder_dir, tmp_path,
                                                          monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as without the extra

    def no_models(*args, **kwargs):
        raise AssertionError("the models were loaded before the engine was checked")

    monkeypatch.setattr(cxrgen.runs.generate, "load_models", no_models)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["generate", str(manifest), "--out", str(out), "--model", str(bundle_dir),
                                      "--text-encoder", str(text_encoder_dir), "--quiet", "--engine", "ray"])
    assert_input_error(result, "--engine ray", 'pip install "cxrgen[ray]"')
    assert not (out / "run.json").exists()


def test_verify_on_ray_is_refused_in_one_line_before_any_model_loads(manifest, bundle_dir, text_encoder_dir,
                                                                      tmp_path, monkeypatch):
    def no_models(*args, **kwargs):
        raise AssertionError("the models were loaded before --verify on ray was refused")

    monkeypatch.setattr(cxrgen.runs.generate, "load_models", no_models)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["generate", str(manifest), "--out", str(out), "--model", str(bundle_dir),
                                      "--text-encoder", str(text_encoder_dir), "--quiet", "--engine", "ray",
                                      "--verify"])
    assert_input_error(result, "--verify cannot run on --engine ray", "--engine local")
    assert not out.exists() or not any(out.iterdir())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("given", ["option", "RAY_ADDRESS"])
def test_unreachable_address_is_one_line_within_seconds(given, manifest, bundle_dir, text_encoder_dir, tmp_path):
    address = f"127.0.0.1:{_free_port()}"  # nothing listens there
    out = tmp_path / "out"
    args = [sys.executable, "-m", "cxrgen", "generate", str(manifest), "--out", str(out), "--model", str(bundle_dir),
            "--text-encoder", str(text_encoder_dir), "--quiet", "--engine", "ray"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if given == "option":
        args += ["--ray-address", address]
    else:
        env["RAY_ADDRESS"] = address
    started = time.monotonic()
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    # ray.init on a dead address waits a minute or more; the port check answers at once (bound: imports only)
    assert time.monotonic() - started < 60
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cxrgen: error: --ray-address ") and address in lines[0], lines
    assert not (out / "run.json").exists()


def test_a_restarted_worker_never_rewrites_what_its_predecessor_recorded(manifest, single, bundle_dir,
                                                                         text_encoder_dir, tmp_path,
                                                                         one_torch_thread):
    """Ray retries a dead actor's batch on its restarted incarnation: images the dead one already journaled stay
    untouched, and the missing ones of the batch come out as in the whole batch (the class runs in-process here)."""
    out = tmp_path / "out"
    cfg = config(manifest, out, bundle_dir, text_encoder_dir, engine="ray")
    out.mkdir()
    (out / "run.json").write_bytes((single / "run.json").read_bytes())
    batch = next(iter(batches_of(load_plan(cfg)[1], 2)))
    settings = __import__("json").loads((single / "run.json").read_text())["settings"]
    lock = FolderLock(out / STATE_DIR).acquire()  # the driver's
    sampled: list[int] = []  # the size of every batch the engines sample

    def count_sizes(engine, name):
        original = engine.run_batch
        engine.run_batch = lambda items, on_step=None: sampled.append(len(items)) or original(items, on_step)
        return engine

    worker = functools.partial(BatchWorker, config=cfg, bundle_root=str(bundle_dir), dtype="float32",
                               settings=settings, holder=holder_name(), load=load_engine, sample=sample_batches,
                               engine_hook=count_sizes, device="cpu", threads=1, lineage="ray-test")
    blob = {"batch": [__import__("pickle").dumps(batch)]}
    first = worker()
    assert first.name == "ray-test-0" and first({**blob})["written"] == [2]
    paths = [out / item.file_name for item in batch]
    stats = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in paths]
    # 1. the predecessor journaled the whole batch, then died before Ray saw the result
    second = worker()
    assert second.name == "ray-test-1"
    assert Journal(out, second.name).path == out / RECORDS_DIR / "part-ray-test-1.jsonl"  # the part it claimed
    row = second(blob)
    assert row["done"] == [2] and row["written"] == [0] and row["error"] == [""]
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in paths] == stats and sampled == [2]  # nothing sampled
    # 2. it journaled only the first image (a torn append): only the second is made, from the whole batch
    for part in (out / RECORDS_DIR).glob("part-ray-test-*.jsonl"):
        lines = part.read_text().splitlines(keepends=True)
        part.write_text("".join(lines[:1]) + (lines[1][:20] if len(lines) > 1 else ""))
    paths[1].unlink()
    third = worker()
    assert third.name == "ray-test-2" and third(blob)["written"] == [1]
    assert sampled == [2, 2]  # the one missing image was sampled within its whole batch (same float rounding)
    assert (paths[0].stat().st_ino, paths[0].stat().st_mtime_ns) == stats[0]
    assert paths[1].read_bytes() == (single / batch[1].file_name).read_bytes()
    assert set(read_records(out, ("file_name",))) == {item.image_id for item in batch}
    # 3. once the driver is gone, a worker writes nothing more and says why
    lock.release()
    row = third(blob)
    assert row["done"] == [0] and row["exit_code"] == [1] and "driver" in row["error"][0]


def test_a_worker_that_cannot_start_answers_with_one_error_and_writes_nothing(manifest, single, bundle_dir,
                                                                              text_encoder_dir, tmp_path):
    """Ray would restart a crashing actor forever; a cxrgen refusal comes back once, as the row of a batch."""
    import json
    import pickle

    settings = json.loads((single / "run.json").read_text())["settings"]
    blob = {"batch": [pickle.dumps(next(iter(batches_of(load_plan(config(manifest, single, bundle_dir,
                                                                           text_encoder_dir))[1], 2))))]}

    def start(out: Path, **changes) -> dict:
        worker = BatchWorker(config=config(manifest, out, bundle_dir, text_encoder_dir, engine="ray"),
                             bundle_root=str(bundle_dir), dtype="float32", settings={**settings, **changes},
                             holder=holder_name(), load=load_engine, sample=sample_batches, engine_hook=None,
                             device="cpu", threads=1, lineage="ray-test")
        return worker(blob)

    # the output folder is not shared with this node
    row = start(tmp_path / "elsewhere")
    assert row["exit_code"] == [2] and row["done"] == [0] and "not visible here" in row["error"][0]
    assert not (tmp_path / "elsewhere").exists()
    # this node's models are not the driver's
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_bytes((single / "run.json").read_bytes())
    row = start(out, text_encoder_fingerprint="another")
    assert row["exit_code"] == [2] and "differ from the driver's" in row["error"][0]
    assert row["error"][0].startswith(f"Ray worker on {socket.gethostname()}: ")
    assert not (out / "images").exists() and not (out / RECORDS_DIR).exists()


def test_placement_and_options():
    base = RunConfig(manifest="m.csv", out="o", engine="ray")
    # one actor per GPU by default; a fraction shares a GPU; CPU clusters: one actor per node, its cores as threads
    assert placement(base, 4.0, [16, 16]) == placement(base, 4.0, [8]) and placement(base, 4, [8]).workers == (4, 4)
    assert placement(base, 4, [8]).device == "cuda" and placement(base, 4, [8]).gpus == 1.0
    half = RunConfig(manifest="m.csv", out="o", engine="ray", ray_gpus_per_worker=0.5)
    assert placement(half, 4, [8]).workers == (8, 8)
    cpu = placement(base, 0, [8, 4, 0.5])
    assert (cpu.workers, cpu.cpus, cpu.device) == ((2, 2), 4.0, "cpu")
    assert placement(RunConfig(manifest="m.csv", out="o", device="cpu"), 8, [8]).device == "cpu"
    bounded = placement(RunConfig(manifest="m.csv", out="o", ray_workers="2-4"), 0, [8, 8])
    assert (bounded.workers, bounded.cpus) == ((2, 4), 4.0)
    # an autoscaling cluster that has no GPU node yet: GPU actors when asked for, from one up
    assert placement(RunConfig(manifest="m.csv", out="o", ray_gpus_per_worker=1), 0, [4]).workers == (1, 1)
    assert ray_worker_bounds("auto") is None and ray_worker_bounds("3") == (3, 3) and ray_worker_bounds("1-8") == (1, 8)
    for bad in ("0", "4-2", "x", "-3", "1-"):
        with pytest.raises(InputError, match="--ray-workers"):
            RunConfig(manifest="m.csv", out="o", ray_workers=bad)
    for bad in (-1, 2, True):
        with pytest.raises(InputError, match="--ray-gpus-per-worker"):
            RunConfig(manifest="m.csv", out="o", ray_gpus_per_worker=bad)
    with pytest.raises(InputError, match="--engine"):
        RunConfig(manifest="m.csv", out="o", engine="slurm")
    with pytest.raises(InputError, match="--device cuda:1 picks devices of this machine"):
        placement(RunConfig(manifest="m.csv", out="o", device="cuda:1"), 8, [8])
    with pytest.raises(InputError, match="--device cpu with --ray-gpus-per-worker"):
        placement(RunConfig(manifest="m.csv", out="o", device="cpu", ray_gpus_per_worker=1), 8, [8])
    # under torchrun/srun or in an array task, Ray is refused before it is even imported
    with pytest.raises(InputError, match="one driver process"):
        RayCluster(base, print, rank=Rank(0, 2, 0))
    # the engine options are placement, not pixels: a resume may change them
    from cxrgen.config import PIXEL_FIELDS
    assert not {"engine", "ray_address", "ray_workers", "ray_gpus_per_worker"} & set(PIXEL_FIELDS)


def test_the_kuberay_example_runs_a_valid_ray_command_line():
    """examples/kuberay-job.yaml's entrypoint parses as `cxrgen generate` and asks for the Ray engine."""
    import shlex

    import typer
    import yaml

    job = yaml.safe_load((TESTS.parent / "examples" / "kuberay-job.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["rayClusterSpec"]["rayVersion"]
    args = shlex.split(job["spec"]["entrypoint"])
    assert args[:2] == ["cxrgen", "generate"]
    command = typer.main.get_command(app).commands["generate"]
    params = command.make_context("generate", args[2:], resilient_parsing=False).params  # refuses unknown options
    assert params["engine"] == "ray"
    RunConfig(manifest=params["manifest"], out=str(params["out"]), engine=params["engine"],
              ray_workers=params["ray_workers"], ray_gpus_per_worker=params["ray_gpus_per_worker"])  # valid values
