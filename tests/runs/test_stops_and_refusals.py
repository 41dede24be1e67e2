"""Runs that must stop, refuse or finish correctly: workers after a signal or a crash, two runs in one folder,
Slurm batch steps, rank locks, paths, devices, dtypes and the exit code of a partial share (issue 12).

Results are checked through the files, the journal, metadata.parquet and cxrgen.runs.state; output text only where
the message itself is the subject.
"""
from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import tiny
import torch
from typer.testing import CliRunner

import cxrgen.files
import cxrgen.runs.generate
import cxrgen.runs.journal
import cxrgen.storage.local
import cxrgen.storage.locks
from cxrgen.cli import app
from cxrgen.config import RunConfig
from cxrgen.errors import InputError
from cxrgen.files import STATE_DIR, TMP_MARK
from cxrgen.manifests.workitems import load_plan
from cxrgen.model import demo
from cxrgen.model.engine import resolve_dtype
from cxrgen.runs.generate import generate
from cxrgen.runs.journal import RECORDS_DIR, read_records
from cxrgen.storage.locks import FolderLock, InitLock, RankLock
from cxrgen.runs.state import inspect_run

runner = CliRunner()
MANIFEST = "prompt,label\nbig heart,1\nsmall lung,0\nclear chest,1\n"
PLANNED = 6


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("manifest") / "m.csv"
    path.write_text(MANIFEST)
    return path


@pytest.fixture(scope="module")
def args(manifest, bundle_dir, text_encoder_dir):
    """`cxrgen generate` arguments for an output folder (extra options may be appended)."""
    def make(out: Path, *extra: str, text_encoder: Path | str = text_encoder_dir) -> list[str]:
        return ["generate", str(manifest), "--out", str(out), "--model", str(bundle_dir), "--text-encoder",
                str(text_encoder), "--steps", "1", "--num-images", "2", "--batch-size", "2", "--image-format", "png",
                "--quiet", "--rank-wait", "0", *extra]
    return make


def journal_ids(out: Path, writer: str) -> list[str]:
    path = out / RECORDS_DIR / f"part-{writer}.jsonl"
    return [json.loads(line)["image_id"] for line in path.read_text().splitlines()] if path.is_file() else []


def plan_of(out: Path):
    return load_plan(RunConfig.from_dict(json.loads((out / "run.json").read_text())["config"]))[1]


# ------------------------------------------------------------------ 1. workers stop within seconds

DRIVER = """
import functools, sys
sys.path.insert(0, {tests!r})
import tiny
from cxrgen.config import RunConfig
from cxrgen.errors import CxrgenError
from cxrgen.runs.generate import generate
if __name__ == "__main__":  # spawned workers import this module again
    mode, manifest, out, model, text, marker = sys.argv[1:]
    hook = functools.partial(tiny.fail_in_w1, after=2, marker=marker) if mode == "fail" else None
    config = RunConfig(manifest=manifest, out=out, model=model, text_encoder=text, steps=1, num_images=1,
                       batch_size=1, workers=2, device="cpu", image_format="png", quiet=True)
    try:
        generate(config, engine_hook=hook)
    except CxrgenError as exc:
        print("cxrgen: error:", exc, file=sys.stderr)
        sys.exit(exc.exit_code)
"""


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.is_file() else []


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")  # a zombie is gone too
    except (OSError, IndexError):
        return True


def _wait_until(condition, proc, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"ended early: {proc.returncode} {proc.stderr.read()}"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


@pytest.mark.parametrize("mode, code", [("SIGINT", 130), ("SIGTERM", 143), ("fail", 1)])
def test_many_queued_batches_and_workers_stopping_early_exit_within_seconds(mode, code, bundle_dir,
                                                                           text_encoder_dir, tmp_path):
    # 1,200 one-image batches: far more than the task pipe holds, the case that used to hang forever
    manifest = tmp_path / "many.csv"
    pd.DataFrame({"prompt": [f"finding number {i}" for i in range(1200)]}).to_csv(manifest, index=False)
    driver, out, marker = tmp_path / "driver.py", tmp_path / "out", tmp_path / "failed"
    driver.write_text(DRIVER.format(tests=str(Path(tiny.__file__).parent)))
    proc = subprocess.Popen([sys.executable, str(driver), mode, str(manifest), str(out), str(bundle_dir),
                             str(text_encoder_dir), str(marker)], stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        # both workers are sampling when the signal (or the failure) comes
        _wait_until(lambda: len(journal_ids(out, "w0")) >= 2 and len(journal_ids(out, "w1")) >= 1
                    or marker.exists(), proc)
        workers = _children(proc.pid)
        if mode == "fail":
            _wait_until(marker.exists, proc)
        else:
            os.kill(proc.pid, getattr(signal, mode))
        proc.wait(timeout=10)  # the hang bound of the issue, not a speed claim
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = proc.stderr.read()
    assert proc.returncode == code, stderr
    deadline = time.monotonic() + 10
    while not all(_gone(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert workers and all(_gone(pid) for pid in workers), workers
    if mode == "fail":
        assert "simulated worker bug" in stderr and len(stderr.strip().splitlines()[-1]) > 0
    # resumable: every recorded image is in place, nothing was half-recorded, most work is left
    status = inspect_run(out)
    assert 0 < status.done < 600 and not status.missing_files and not status.orphaned_files


def test_slow_worker_error_and_parent_messages_are_one_line(bundle_dir, text_encoder_dir, tmp_path):
    """A worker's plain exception reaches the user as one RunError line naming it, exit 1 (library)."""
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"prompt": [f"p{i}" for i in range(8)]}).to_csv(manifest, index=False)
    config = RunConfig(manifest=str(manifest), out=str(tmp_path / "out"), model=str(bundle_dir),
                       text_encoder=str(text_encoder_dir), steps=1, batch_size=1, workers=2, image_format="png",
                       quiet=True)
    from cxrgen.errors import RunError
    with pytest.raises(RunError, match="worker w1 failed: RuntimeError: simulated worker bug") as caught:
        generate(config, engine_hook=tiny.fail_at_start_in_w1)
    assert "\n" not in str(caught.value) and "cxrgen resume" in str(caught.value)


def test_a_worker_signalled_outside_its_batch_loop_stops_cleanly(bundle_dir, text_encoder_dir, tmp_path):
    """SIGTERM while a worker loads or exits must not kill it outright: dying at the wrong instant leaves the
    event queue's shared write lock held, and the other worker and the parent then wait forever. Recorded
    instead, it stops that worker at its first check; the other worker makes every image."""
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"prompt": [f"p{i}" for i in range(4)]}).to_csv(manifest, index=False)
    config = RunConfig(manifest=str(manifest), out=str(tmp_path / "out"), model=str(bundle_dir),
                       text_encoder=str(text_encoder_dir), steps=1, batch_size=1, workers=2, image_format="png",
                       quiet=True)
    result = generate(config, engine_hook=tiny.sigterm_in_w1_before_sampling)  # not "died with exit code -15"
    assert result.complete and inspect_run(tmp_path / "out").complete


STUCK_SCRIPT = """
import sys, tiny, cxrgen.runs.workers
from cxrgen.config import RunConfig
from cxrgen.errors import RunError
from cxrgen.runs.generate import generate
cxrgen.runs.workers._STOP_GRACE_S = 2.0
manifest, out, model, text = sys.argv[1:]
config = RunConfig(manifest=manifest, out=out, model=model, text_encoder=text, steps=1, batch_size=1, workers=2,
                   quiet=True)
try:
    generate(config, engine_hook=tiny.w1_never_ends_and_the_other_fails)
except RunError as exc:
    print(exc)
"""


def test_a_worker_that_never_ends_after_a_stop_is_killed_after_the_grace_period(bundle_dir, text_encoder_dir,
                                                                                 tmp_path):
    """The parent waits for stopping workers only for the grace period (2 s here), then kills them: a stuck
    worker must not keep the run, and the user's terminal, forever."""
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"prompt": [f"p{i}" for i in range(4)]}).to_csv(manifest, index=False)
    done = subprocess.run([sys.executable, "-c", STUCK_SCRIPT, str(manifest), str(tmp_path / "out"), str(bundle_dir),
                           str(text_encoder_dir)], capture_output=True, text=True, timeout=240,
                          cwd=Path(__file__).resolve().parents[1], env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert "failed: RuntimeError: simulated worker bug" in done.stdout, done.stdout + done.stderr


# ------------------------------------------------------------------ 2. two runs into one folder


def test_a_run_that_loaded_its_models_while_another_finished_there_is_refused(args, manifest, bundle_dir,
                                                                                text_encoder_dir, tmp_path,
                                                                                monkeypatch):
    out = tmp_path / "out"
    other = tmp_path / "b.csv"
    other.write_text("prompt,finding\nlarge effusion,yes\n")
    real = cxrgen.runs.generate.load_models

    def load_while_a_finishes(*a, **k):
        models = real(*a, **k)
        monkeypatch.setattr(cxrgen.runs.generate, "load_models", real)
        # run A starts after B's checks, takes the folder and finishes while B is still loading
        result = runner.invoke(app, args(out))
        assert result.exit_code == 0, result.output
        return models

    monkeypatch.setattr(cxrgen.runs.generate, "load_models", load_while_a_finishes)
    b = runner.invoke(app, ["generate", str(other), "--out", str(out), "--model", str(bundle_dir),
                            "--text-encoder", str(text_encoder_dir), "--steps", "1", "--seed", "7",
                            "--image-format", "png", "--quiet"])
    assert b.exit_code == 2 and "holds a run with other settings" in b.output, b.output
    # nothing of B: A's settings, A's labels, A's journal only
    meta = pq.read_table(out / "metadata.parquet").to_pandas()
    assert len(meta) == PLANNED and "finding" not in meta.columns and set(meta.prompt) == {
        "big heart", "small lung", "clear chest"}
    assert json.loads((out / "run.json").read_text())["config"]["seed"] == 0
    assert len(journal_ids(out, "main")) == PLANNED and sorted(os.listdir(out / RECORDS_DIR)) == ["part-main.jsonl"]


# ------------------------------------------------------------------ 3. Slurm batch steps, exit code 3, shares


def test_a_command_in_the_slurm_batch_script_drives_the_whole_plan(args, tmp_path):
    out = tmp_path / "out"
    batch_step = {"SLURM_JOB_ID": "42", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0"}
    result = runner.invoke(app, args(out), env=batch_step)
    assert result.exit_code == 0, result.output
    status = inspect_run(out)
    assert status.complete and status.done == PLANNED
    assert len(journal_ids(out, "main")) == PLANNED  # one process, not "rank 0 of 4"


def test_ranks_take_exactly_their_plan_indexes_and_a_partial_share_exits_3(args, tmp_path):
    out = tmp_path / "out"
    world = {"WORLD_SIZE": "3"}
    # rank 2 first; then rank 1 must still take the indexes = 1 mod 3, not positions in what is left
    for rank in (2, 1):
        result = runner.invoke(app, args(out), env={**world, "RANK": str(rank), "LOCAL_RANK": "0"})
        assert result.exit_code == 3, result.output  # share done, run incomplete: never a silent 0
        assert not (out / "metadata.parquet").exists()
        plan = plan_of(out)
        assert journal_ids(out, f"rank{rank}") == [i.image_id for i in plan if i.index % 3 == rank]
    status = inspect_run(out)
    assert status.remaining == 2 and not status.complete
    last = runner.invoke(app, args(out), env={**world, "RANK": "0"})
    assert last.exit_code == 0, last.output
    assert journal_ids(out, "rank0") == [i.image_id for i in plan_of(out) if i.index % 3 == 0]
    assert inspect_run(out).complete


def test_incomplete_share_is_reported_with_what_remains(manifest, bundle_dir, text_encoder_dir, tmp_path):
    from cxrgen.runs.workers import Rank

    lines: list[str] = []
    config = RunConfig(manifest=str(manifest), out=str(tmp_path / "out"), model=str(bundle_dir),
                       text_encoder=str(text_encoder_dir), steps=1, num_images=2, image_format="png", rank_wait=0)
    result = generate(config, rank=Rank(0, 2, 0), log=lines.append)
    assert not result.complete and result.remaining == 3 and result.written == 3
    assert any("3 of 6 image(s) remain" in line and "cxrgen resume" in line for line in lines), lines


def test_a_finished_rank_waits_for_running_ranks_but_not_for_waiting_ones(manifest, bundle_dir, text_encoder_dir,
                                                                          tmp_path):
    import threading

    from cxrgen.runs.workers import Rank

    out = tmp_path / "out"
    state = out / STATE_DIR
    with InitLock(state):
        other = RankLock(state, 1, 2).acquire()  # rank 1 of this launch is busy with its share
    config = RunConfig(manifest=str(manifest), out=str(out), model=str(bundle_dir), rank_wait=0,
                       text_encoder=str(text_encoder_dir), steps=1, num_images=2, image_format="png", quiet=True)
    results = []
    thread = threading.Thread(target=lambda: results.append(generate(config, rank=Rank(0, 2, 0))))
    thread.start()
    try:
        rank0 = state / "rank0.lock"
        deadline = time.monotonic() + 120
        while not (rank0.is_file() and "share=done" in rank0.read_text()):
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.05)
        thread.join(3 * cxrgen.runs.generate._RANK_POLL_S)
        assert thread.is_alive()  # still waiting: rank 1 is running
        other.mark_share_done()  # rank 1 now only waits too: they must not wait for each other forever
        thread.join(60)
        assert not thread.is_alive() and not results[0].complete and results[0].remaining == 3
    finally:
        other.release()
        thread.join(60)


# ------------------------------------------------------------------ 4, 11, 12. locks


def test_a_duplicate_rank_or_a_second_launch_is_refused_and_writes_nothing(args, tmp_path):
    out = tmp_path / "out"
    state = out / STATE_DIR
    held = RankLock(state, 0, 2).acquire()  # another process already runs rank 0 of 2
    try:
        dup = runner.invoke(app, args(out), env={"RANK": "0", "WORLD_SIZE": "2"})
        assert dup.exit_code == 2 and "rank 0 is already running" in dup.output, dup.output
        # a launch of another size would overlap rank 0's share
        other = runner.invoke(app, args(out), env={"RANK": "3", "WORLD_SIZE": "4"})
        assert other.exit_code == 2 and "a launch of 2 ranks is still writing" in other.output, other.output
        assert not (out / RECORDS_DIR).exists() and not (out / "images").exists()
    finally:
        held.release()
    # once that launch is gone, any size may resume
    assert runner.invoke(app, args(out), env={"RANK": "3", "WORLD_SIZE": "4"}).exit_code == 3


def test_rank_locks_exclude_each_other_in_process(tmp_path):
    state = tmp_path / STATE_DIR
    with InitLock(state):
        a = RankLock(state, 0, 2).acquire()
        with pytest.raises(InputError, match=r"rank 0 is already running .*\(pid \d+\)"):
            RankLock(state, 0, 2).acquire()
        b = RankLock(state, 1, 2).acquire()  # another rank of the same launch is welcome
    a.release()
    b.release()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_the_refusal_names_only_a_live_holder(tmp_path):
    state = tmp_path / STATE_DIR
    state.mkdir()
    (state / "lock").write_text(f"{_dead_pid()} {os.uname().nodename}\n")  # left by an earlier plain run
    rank = FolderLock(state, shared=True).acquire()  # ranks share the lock without naming themselves
    try:
        with pytest.raises(InputError) as refused:
            FolderLock(state).acquire()
        assert "pid" not in str(refused.value) and "torchrun/Slurm" in str(refused.value)
    finally:
        rank.release()
    with FolderLock(state):
        with pytest.raises(InputError, match=rf"\(pid {os.getpid()}\)"):
            FolderLock(state).check_free()


def test_a_rank_clears_the_stale_holder_name(args, tmp_path):
    out = tmp_path / "out"
    (out / STATE_DIR).mkdir(parents=True)
    (out / STATE_DIR / "lock").write_text("999999 somewhere-else\n")
    assert runner.invoke(app, args(out), env={"RANK": "0", "WORLD_SIZE": "2"}).exit_code == 3
    assert (out / STATE_DIR / "lock").read_text() == ""


def test_file_systems_without_locks_are_reported_once(manifest, bundle_dir, text_encoder_dir, tmp_path, monkeypatch):
    def no_locks(*_a):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(cxrgen.storage.locks.fcntl, "flock", no_locks)
    lines: list[str] = []
    config = RunConfig(manifest=str(manifest), out=str(tmp_path / "out"), model=str(bundle_dir),
                       text_encoder=str(text_encoder_dir), steps=1, image_format="png")
    assert generate(config, log=lines.append).complete
    assert sum("does not support file locks" in line for line in lines) == 1, lines


def test_temporary_names_are_unique_across_hosts_and_processes(tmp_path, monkeypatch):
    seen = []
    real = os.replace

    def replace(src, dst):
        seen.append(Path(src).name)
        return real(src, dst)
    monkeypatch.setattr(cxrgen.files.os, "replace", replace)
    cxrgen.files.atomic_write(tmp_path / "run.json", b"{}")
    cxrgen.files.atomic_write(tmp_path / "run.json", b"{}")
    assert len(set(seen)) == 2 and all(TMP_MARK in n and cxrgen.files._HOST in n for n in seen), seen


def test_run_json_is_written_by_one_process_under_the_init_lock(args, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = cxrgen.storage.local.write_json
    held = []

    def write_json(path, data):
        import fcntl
        fd = os.open(out / STATE_DIR / "init.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(False)
        except BlockingIOError:
            held.append(True)
        finally:
            os.close(fd)
        real(path, data)
    monkeypatch.setattr(cxrgen.storage.local, "write_json", write_json)
    assert runner.invoke(app, args(out), env={"RANK": "0", "WORLD_SIZE": "2"}).exit_code == 3
    assert runner.invoke(app, args(out), env={"RANK": "1", "WORLD_SIZE": "2"}).exit_code == 0
    assert held == [True]  # written once, by the first rank, while it held the lock


# ------------------------------------------------------------------ 6, 7. paths and the text encoder


def test_relative_paths_are_saved_absolute_and_resume_from_anywhere(manifest, bundle_dir, text_encoder_dir,
                                                                    tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(bundle_dir, work / "bundle")
    shutil.copytree(text_encoder_dir, work / "clip")
    shutil.copy(manifest, work / "m.csv")
    monkeypatch.chdir(work)
    rel = ["generate", "m.csv", "--out", "out", "--model", "bundle", "--text-encoder", "clip", "--cache-dir",
           "cache", "--steps", "1", "--image-format", "png", "--quiet", "--num-images", "2"]
    assert runner.invoke(app, rel).exit_code == 0
    config = json.loads((work / "out" / "run.json").read_text())["config"]
    assert config["model"] == str(work / "bundle") and config["text_encoder"] == str(work / "clip")
    assert config["cache_dir"] == str(work / "cache") and config["manifest"] == str(work / "m.csv")
    # from elsewhere: resume finds the bundle (no download attempt), generate with absolute paths resumes
    monkeypatch.chdir(tmp_path)
    (work / "out" / "metadata.parquet").unlink()
    assert runner.invoke(app, ["resume", str(work / "out"), "--quiet"]).exit_code == 0
    absolute = [str(work / a) if a in ("m.csv", "out", "bundle", "clip", "cache") else a for a in rel]
    again = runner.invoke(app, absolute)
    assert again.exit_code == 0, again.output


def test_a_different_text_encoder_behind_the_same_path_is_refused(args, tmp_path):
    text = demo.build_text_encoder(tmp_path / "clip", seed=0)
    out = tmp_path / "out"
    assert runner.invoke(app, args(out, text_encoder=text)).exit_code == 0
    saved = json.loads((out / "run.json").read_text())["settings"]["text_encoder_fingerprint"]
    assert saved.startswith("sha256:")
    assert set(pq.read_table(out / "metadata.parquet").column("text_encoder_fingerprint").to_pylist()) == {saved}
    shutil.rmtree(text)
    demo.build_text_encoder(text, seed=1)  # the mirror changed under the same name
    (out / "metadata.parquet").unlink()
    for argv in (args(out, text_encoder=text), ["resume", str(out)]):
        refused = runner.invoke(app, argv)
        assert refused.exit_code == 2 and "text_encoder_fingerprint" in refused.output, refused.output


# ------------------------------------------------------------------ 10. devices and workers


@pytest.mark.parametrize("extra, env, says", [
    (["--device", "cuda:x"], {}, "--device 'cuda:x'"),
    (["--device", "auto,cpu"], {}, "--device 'auto,cpu'"),
    (["--device", "gpu"], {}, "--device 'gpu'"),
    (["--workers", "2"], {"RANK": "0", "WORLD_SIZE": "2"}, "--workers 2 cannot be combined"),
])
def test_bad_device_or_workers_is_one_line_exit_2(extra, env, says, args, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, args(out, *extra), env=env)
    assert result.exit_code == 2 and says in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_a_device_list_under_ranks_gives_each_local_rank_its_entry(args, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, args(out, "--device", "cpu,cpu"), env={"RANK": "1", "WORLD_SIZE": "2",
                                                                         "LOCAL_RANK": "1"})
    assert result.exit_code == 3, result.output
    assert json.loads((out / "run.json").read_text())["resolved"]["devices"] == ["cpu"]


# ------------------------------------------------------------------ 13. dtype on resume


def test_auto_dtype_resumes_in_the_recorded_dtype(args, tmp_path):
    assert resolve_dtype("auto", torch.device("cpu"), recorded="bfloat16") == "bfloat16"
    assert resolve_dtype("auto", torch.device("cpu"), recorded="float16") == "float32"  # CPU cannot: not chosen
    assert resolve_dtype("float32", torch.device("cpu"), recorded="bfloat16") == "float32"
    out = tmp_path / "out"
    assert runner.invoke(app, args(out, "--dtype", "bfloat16")).exit_code == 0
    (out / "metadata.parquet").unlink()
    assert runner.invoke(app, ["resume", str(out), "--quiet"]).exit_code == 0  # auto: bfloat16 again
    assert runner.invoke(app, args(out)).exit_code == 0  # generate with --dtype auto too
    refused = runner.invoke(app, args(out, "--dtype", "float32"))
    assert refused.exit_code == 2 and "--dtype bfloat16" in refused.output, refused.output


# ------------------------------------------------------------------ 15. Ctrl-C before the run is recorded


def test_ctrl_c_while_models_load_says_to_rerun_generate(args, tmp_path, monkeypatch):
    def interrupted(*_a, **_k):
        raise KeyboardInterrupt
    monkeypatch.setattr(cxrgen.runs.generate, "load_models", interrupted)
    result = runner.invoke(app, args(tmp_path / "out"))
    assert result.exit_code == 130
    assert "run the same `cxrgen generate` command again" in result.output and "cxrgen resume" not in result.output


# ------------------------------------------------------------------ 20. threads per local worker


def test_each_cpu_worker_gets_its_share_of_the_threads(manifest, bundle_dir, text_encoder_dir, tmp_path):
    expected = max(1, torch.get_num_threads() // 2)
    config = RunConfig(manifest=str(manifest), out=str(tmp_path / "out"), model=str(bundle_dir),
                       text_encoder=str(text_encoder_dir), steps=1, num_images=2, batch_size=1, workers=2,
                       device="cpu", image_format="png", quiet=True)
    generate(config, engine_hook=functools.partial(tiny.record_threads, folder=str(tmp_path)))
    assert [int((tmp_path / w).read_text()) for w in ("w0", "w1")] == [expected, expected]
    assert torch.get_num_threads() * 1 >= expected


# ------------------------------------------------------------------ 21. help texts


def test_help_shows_flags_as_flags_and_resume_keeps_saved_values():
    top = runner.invoke(app, ["--help"])
    assert "Example: cxrgen generate" in top.output
    gen = runner.invoke(app, ["generate", "--help"]).output
    assert "<bool>" not in gen and "num_inference_steps" in gen and "Exit codes" in gen
    assert runner.invoke(app, ["generate", "--help"]).exit_code == 0
    res = runner.invoke(app, ["resume", "--help"]).output
    assert "keeps its saved value" in res and res.count("[default: the saved value]") >= 4


# ------------------------------------------------------------------ 25. merged once, status --finalize


def test_merge_happens_once_and_status_finalize_finishes_or_explains(args, tmp_path):
    out = tmp_path / "out"
    assert runner.invoke(app, args(out)).exit_code == 0
    merges = lambda: len((out / STATE_DIR / "merges.log").read_text().splitlines())  # noqa: E731
    assert merges() == 1
    # already merged: neither another generate nor a resume nor finalize merges again
    assert runner.invoke(app, args(out)).exit_code == 0
    assert runner.invoke(app, ["resume", str(out), "--quiet"]).exit_code == 0
    assert cxrgen.runs.generate.finalize_run(out) == out / "metadata.parquet"
    assert merges() == 1
    before = pq.read_table(out / "metadata.parquet")
    # a rank died after its last image but before merging: status --finalize merges
    (out / "metadata.parquet").unlink()
    assert runner.invoke(app, ["status", str(out)]).exit_code == 1
    done = runner.invoke(app, ["status", str(out), "--finalize"])
    assert done.exit_code == 0 and merges() == 2
    assert pq.read_table(out / "metadata.parquet").drop(["created_at"]).equals(before.drop(["created_at"]))
    # with work left it says why it cannot, and exits 1
    (out / "metadata.parquet").unlink()
    first = plan_of(out)[0]
    (out / first.file_name).unlink()
    left = runner.invoke(app, ["status", str(out), "--finalize"])
    assert left.exit_code == 1 and "cannot finalize: 1 image(s) are not done yet" in left.output
    assert not (out / "metadata.parquet").exists() and merges() == 2
    assert first.image_id in read_records(out)
