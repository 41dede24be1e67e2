"""Bookkeeping at scale (issue 13): a start-up that stats instead of decoding, --verify, old journals, shares."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import PLANNED
from PIL import Image
from typer.testing import CliRunner

import cxrgen.runs.state
from cxrgen.cli import app
from cxrgen.config import RunConfig
from cxrgen.manifests.workitems import load_plan
from cxrgen.model import demo
from cxrgen.runs.generate import generate
from cxrgen.runs.journal import RECORDS_DIR, read_records
from cxrgen.runs.state import done_items, inspect_run
from cxrgen.runs.workers import Rank

runner = CliRunner()

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def config(manifest, bundle_dir, text_encoder_dir, tmp_path):
    def make(**kw) -> RunConfig:
        options = dict(steps=1, num_images=2, batch_size=2, image_format="png", quiet=True, rank_wait=0)
        return RunConfig(manifest=str(manifest), out=str(tmp_path / "out"), model=str(bundle_dir),
                         text_encoder=str(text_encoder_dir), **{**options, **kw})
    return make


def journal(out: Path) -> list[dict]:
    return [json.loads(line) for part in sorted((out / RECORDS_DIR).glob("part-*.jsonl"))
            for line in part.read_text().splitlines()]


def test_records_hold_the_size_and_checksum_of_the_bytes_written(config):
    import zlib

    out = generate(config()).out
    for record in journal(out):
        data = (out / record["file_name"]).read_bytes()
        assert record["file_bytes"] == len(data) and record["file_crc32"] == zlib.crc32(data)
    names = pq.read_schema(out / "metadata.parquet").names
    assert "file_bytes" not in names and "file_crc32" not in names  # internal: not metadata columns


def test_start_up_redoes_missing_truncated_and_resized_files(config, monkeypatch):
    out = generate(config()).out
    plan = load_plan(config())[1]
    lost, truncated, padded = (out / plan[i].file_name for i in (0, 2, 4))
    lost.unlink()
    truncated.write_bytes(truncated.read_bytes()[:100])
    padded.write_bytes(padded.read_bytes() + b"\0\0")
    (out / "metadata.parquet").unlink()
    # quick check: no image is decoded at start-up, one stat each
    monkeypatch.setattr(cxrgen.runs.state, "image_ok", lambda *_a: pytest.fail("decoded at start-up"))
    done = done_items(out, plan)
    assert done == {i.image_id for i in plan} - {plan[0].image_id, plan[2].image_id, plan[4].image_id}
    monkeypatch.undo()
    result = generate(config())
    assert result.written == 3 and result.complete
    assert inspect_run(out).complete


def test_verify_finds_flipped_bytes_of_the_same_size_and_resume_remakes_them(config):
    out = generate(config()).out
    plan = load_plan(config())[1]
    damaged = out / plan[3].file_name
    data = bytearray(damaged.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    damaged.write_bytes(bytes(data))
    assert inspect_run(out).complete  # one stat each cannot see it
    report = inspect_run(out, verify=True)
    assert report.missing_files == [plan[3].file_name] and report.done == PLANNED - 1
    assert runner.invoke(app, ["status", str(out), "--verify"]).exit_code == 1
    assert runner.invoke(app, ["status", str(out)]).exit_code == 0
    (out / "metadata.parquet").unlink()  # as if the damage was found before the merge
    resumed = runner.invoke(app, ["resume", str(out), "--verify", "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    assert inspect_run(out, verify=True).complete and damaged.read_bytes() != bytes(data)


def test_journals_without_sizes_still_resume_by_decoding(config):
    out = generate(config()).out
    plan = load_plan(config())[1]
    for part in (out / RECORDS_DIR).glob("part-*.jsonl"):  # as cxrgen 0.1 wrote them
        lines = [json.loads(line) for line in part.read_text().splitlines()]
        part.write_text("".join(json.dumps({k: v for k, v in r.items() if not k.startswith("file_") or
                                            k == "file_name"}) + "\n" for r in lines))
    broken = out / plan[1].file_name
    broken.write_bytes(broken.read_bytes()[:-50])
    (out / "metadata.parquet").unlink()
    assert plan[1].image_id not in done_items(out, plan)  # decoded: the truncated file fails
    assert len(done_items(out, plan)) == PLANNED - 1
    result = generate(config())
    assert result.written == 1 and result.complete


def test_a_rank_checks_only_its_own_share(config, monkeypatch):
    out = generate(config()).out
    (out / "metadata.parquet").unlink()
    checked = []
    real = cxrgen.runs.state.file_ok

    def counting(path, record, verify=False):
        checked.append(record["image_id"])
        return real(path, record, verify)
    monkeypatch.setattr(cxrgen.runs.state, "file_ok", counting)
    generate(config(), rank=Rank(1, 3, 0))
    plan = load_plan(config())[1]
    assert sorted(checked) == sorted(i.image_id for i in plan if i.index % 3 == 1)
    assert set(read_records(out)) == {i.image_id for i in plan}


# ------------------------------------------------------------------ fast model start


def test_networks_are_built_without_random_initialisation_and_equal_normally_built_ones(bundle_dir, monkeypatch):
    import torch

    from cxrgen.model.bundle import load_bundle, read_spec

    # random initialisation of real tensors during loading is wasted work (seconds per full-size network);
    # on the meta device the same calls cost nothing
    def only_on_meta(real, name):
        def init(tensor, *a, **k):
            assert tensor.is_meta, f"init.{name} initialised a real tensor"
            return real(tensor, *a, **k)
        return init
    for name in ("kaiming_uniform_", "uniform_", "normal_", "xavier_uniform_", "trunc_normal_", "zeros_", "ones_"):
        monkeypatch.setattr(torch.nn.init, name, only_on_meta(getattr(torch.nn.init, name), name))
    loaded = load_bundle(read_spec(bundle_dir))
    monkeypatch.undo()
    ae, unet = demo.build_networks(seed=0)  # what the tiny bundle's checkpoints were saved from
    assert not any(t.is_meta for t in (*loaded.unet.parameters(), *loaded.autoencoder.parameters()))
    x, t, context = torch.randn(2, 3, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, demo.WIDTH)
    with torch.no_grad():
        assert torch.equal(loaded.unet(x, timesteps=t, context=context), unet(x, timesteps=t, context=context))
        z = torch.randn(1, 3, 8, 8)
        assert torch.equal(loaded.autoencoder.decode_stage_2_outputs(z), ae.decode_stage_2_outputs(z))


# ------------------------------------------------------------------ array jobs: shards


def _cli_args(manifest, out, bundle_dir, text_encoder_dir, *extra):
    return ["generate", str(manifest), "--out", str(out), "--model", str(bundle_dir), "--text-encoder",
            str(text_encoder_dir), "--steps", "1", "--num-images", "2", "--batch-size", "2", "--image-format", "png",
            "--quiet", "--rank-wait", "0", *extra]


@pytest.fixture(scope="module")
def single(manifest, bundle_dir, text_encoder_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "out"
    assert runner.invoke(app, _cli_args(manifest, out, bundle_dir, text_encoder_dir)).exit_code == 0
    return out


def same_dataset(a: Path, b: Path) -> None:
    ta, tb = (pq.read_table(p / "metadata.parquet").drop(["created_at", "worker"]) for p in (a, b))
    assert ta.equals(tb)
    for name in ta.column("file_name").to_pylist():
        # other batches around an image may round its last float bits differently (docs/generating.md)
        with Image.open(a / name) as x, Image.open(b / name) as y:
            diff = np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int))
        assert diff.max() <= 1 and (diff == 0).mean() >= 0.999, name


ARRAYS = {
    "option": lambda i, n: ({}, ["--shard", f"{i}/{n}"]),
    "slurm": lambda i, n: ({"SLURM_ARRAY_TASK_ID": str(10 + 2 * i), "SLURM_ARRAY_TASK_MIN": "10",
                            "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_MAX": str(10 + 2 * (n - 1)),
                            # the batch step of an array task: no srun step, so no ranks
                            "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "5"}, []),
    "kubernetes": lambda i, n: ({"JOB_COMPLETION_INDEX": str(i), "CXRGEN_SHARDS": str(n)}, []),
    "aws": lambda i, n: ({"AWS_BATCH_JOB_ARRAY_INDEX": str(i), "AWS_BATCH_JOB_ARRAY_SIZE": str(n)}, []),
}


@pytest.mark.parametrize("kind", list(ARRAYS))
def test_shards_one_after_another_make_the_single_process_dataset(kind, manifest, bundle_dir, text_encoder_dir,
                                                                  single, tmp_path):
    out, n = tmp_path / "out", 4
    plan = None
    for i in range(n):
        env, extra = ARRAYS[kind](i, n)
        result = runner.invoke(app, _cli_args(manifest, out, bundle_dir, text_encoder_dir, *extra), env=env)
        assert result.exit_code == 0, result.output  # a shard whose images are done succeeded
        plan = plan or load_plan(RunConfig.from_dict(json.loads((out / "run.json").read_text())["config"]))[1]
        mine = [json.loads(line)["image_id"] for line in
                (out / RECORDS_DIR / f"part-shard{i}.jsonl").read_text().splitlines()]
        assert mine == [item.image_id for item in plan if item.index % n == i]
        assert (out / "metadata.parquet").exists() == (i == n - 1)  # the last shard merges
    same_dataset(single, out)
    assert len((out / ".cxrgen" / "merges.log").read_text().splitlines()) == 1


def test_shards_with_ranks_inside_compose(manifest, bundle_dir, text_encoder_dir, single, tmp_path):
    out = tmp_path / "out"
    # 2 shards x 2 srun tasks each: shard i, rank r makes index % 4 == i + 2r
    for i in range(2):
        for r in range(2):
            env = {"SLURM_PROCID": str(r), "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_ID": "0"}
            result = runner.invoke(app, _cli_args(manifest, out, bundle_dir, text_encoder_dir, "--shard", f"{i}/2"),
                                   env=env)
            # rank 0 of a shard alone: its sibling has not started, so after --rank-wait 0 it leaves
            # the shard incomplete (3); the second rank completes the shard (0)
            assert result.exit_code == (3 if r == 0 else 0), result.output
            ids = [json.loads(x)["image_id"] for x in
                   (out / RECORDS_DIR / f"part-shard{i}-rank{r}.jsonl").read_text().splitlines()]
            plan = load_plan(RunConfig.from_dict(json.loads((out / "run.json").read_text())["config"]))[1]
            assert ids == [item.image_id for item in plan if item.index % 4 == i + 2 * r]
    same_dataset(single, out)


def test_a_shard_with_other_settings_is_refused(manifest, bundle_dir, text_encoder_dir, tmp_path):
    out = tmp_path / "out"
    assert runner.invoke(app, _cli_args(manifest, out, bundle_dir, text_encoder_dir, "--shard", "0/3")).exit_code == 0
    other = runner.invoke(app, _cli_args(manifest, out, bundle_dir, text_encoder_dir, "--shard", "1/3", "--seed", "9"))
    assert other.exit_code == 2 and "other settings" in other.output
    assert not (out / RECORDS_DIR / "part-shard1.jsonl").exists()


@pytest.mark.parametrize("env, says", [
    ({"JOB_COMPLETION_INDEX": "2"}, "--shards N"),
    ({"AWS_BATCH_JOB_ARRAY_INDEX": "7", "AWS_BATCH_JOB_ARRAY_SIZE": "4"}, "outside 0..3"),
    ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "4"}, "SLURM_ARRAY_TASK_ID='x'"),
])
def test_bad_array_variables_are_one_line_errors(env, says, manifest, bundle_dir, text_encoder_dir, tmp_path):
    result = runner.invoke(app, _cli_args(manifest, tmp_path / "out", bundle_dir, text_encoder_dir), env=env)
    assert result.exit_code == 2 and says in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("value", ["3", "4/4", "a/b", "-1/2"])
def test_bad_shard_option(value, manifest, bundle_dir, text_encoder_dir, tmp_path):
    result = runner.invoke(app, _cli_args(manifest, tmp_path / "out", bundle_dir, text_encoder_dir, "--shard", value))
    assert result.exit_code == 2 and "--shard" in result.output and not (tmp_path / "out").exists()


def test_shards_finishing_together_merge_exactly_once(manifest, bundle_dir, text_encoder_dir, single, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "cxrgen", *_cli_args(manifest, out, bundle_dir, text_encoder_dir,
                                                                         "--shard", f"{i}/3")],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True)
             for i in range(3)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    same_dataset(single, out)
    assert len((out / ".cxrgen" / "merges.log").read_text().splitlines()) == 1


def test_the_fast_journal_reader_agrees_with_the_line_reader_on_damaged_journals(tmp_path):
    folder = tmp_path / RECORDS_DIR
    folder.mkdir(parents=True)
    good = [{"image_id": f"i{k}", "file_name": f"images/00000/i{k}.png", "file_bytes": 100 + k, "file_crc32": k,
             "prompt": "p"} for k in range(5)]
    lines = [json.dumps(r) + "\n" for r in good]
    (folder / "part-a.jsonl").write_text("".join(lines))
    # a kill tore a line, the next writer ended it and went on; then a torn last line
    (folder / "part-b.jsonl").write_text(lines[0][:30] + "\n" + json.dumps({**good[1], "file_bytes": 7}) + "\n"
                                         + '{"image_id": "x9", "file_na')
    # an old journal without sizes, and a later record of an image recorded earlier (the latest record wins)
    (folder / "part-c.jsonl").write_text(json.dumps({"image_id": "old", "file_name": "images/00000/old.png"}) + "\n"
                                         + json.dumps({**good[2], "file_bytes": 1}) + "\n")
    fields = ("file_name", "file_bytes", "file_crc32")
    fast = read_records(tmp_path, fields)
    slow = {k: {f: r.get(f) for f in ("image_id", *fields)} for k, r in read_records(tmp_path).items()}
    assert fast == slow
    assert fast["i1"]["file_bytes"] == 7 and fast["i2"]["file_bytes"] == 1 and "x9" not in fast
    assert fast["old"]["file_bytes"] is None


def test_one_folder_fsync_per_batch_and_always_before_the_records(config, monkeypatch):
    """Each image is fsynced and renamed into place; the folder fsync that makes the renames durable runs once
    per folder per batch (not once per image on the loop's critical path), before the batch is recorded."""
    import cxrgen.files
    import cxrgen.storage.local
    from cxrgen.runs.journal import Journal

    events = []
    real_fsync_dir, real_append = cxrgen.files.fsync_dir, Journal.append

    def fsync_dir(folder):
        events.append(("folder", Path(folder), {p.name for p in Path(folder).iterdir() if ".tmp-" not in p.name}))
        real_fsync_dir(folder)

    def append(self, records):
        events.append(("records", None, {Path(r["file_name"]).name for r in records}))
        real_append(self, records)

    monkeypatch.setattr(cxrgen.files, "fsync_dir", fsync_dir)
    monkeypatch.setattr(cxrgen.storage.local, "fsync_dir", fsync_dir)
    monkeypatch.setattr(Journal, "append", append)
    out = generate(config(batch_size=3)).out  # 6 images: 2 batches of 3, all in images/00000
    images = out / "images" / "00000"
    batches = [names for kind, _, names in events if kind == "records" and names]
    assert [len(b) for b in batches] == [3, 3]
    folder_syncs = [(i, names) for i, (kind, folder, names) in enumerate(events) if folder == images]
    assert len(folder_syncs) == 2  # one per batch
    for batch in batches:
        recorded_at = next(i for i, e in enumerate(events) if e[0] == "records" and e[2] == batch)
        # a folder fsync that saw every file of the batch in place came before its records
        assert any(i < recorded_at and batch <= names for i, names in folder_syncs)


# ------------------------------------------------------------------ issue 19, item 4: the latest record wins

def test_a_file_remade_with_other_bytes_verifies_clean_and_the_merge_describes_it(config):
    import tiny

    out = generate(config()).out
    plan = load_plan(config())[1]
    damaged = out / plan[2].file_name
    original = damaged.read_bytes()
    damaged.write_bytes(original[:100])  # truncated: the quick start-up check finds it
    # a resume remakes it with other bytes, as float rounding in another batch may
    result = generate(config(workers=1, batch_size=1), engine_hook=tiny.one_gray_level_brighter)
    assert result.written == 1 and result.complete
    remade = damaged.read_bytes()
    assert remade != original
    records = [r for r in journal(out) if r["image_id"] == plan[2].image_id]
    assert len(records) == 2 and records[-1]["file_bytes"] == len(remade)
    # verify, resume and the merge all read the latest record
    report = inspect_run(out, verify=True)
    assert report.complete and report.missing_files == [] and report.done == PLANNED
    assert read_records(out, ("file_bytes",))[plan[2].image_id]["file_bytes"] == len(remade)
    status = runner.invoke(app, ["status", str(out), "--verify"])
    assert status.exit_code == 0, status.output
    again = generate(config(verify=True))
    assert again.written == 0 and again.complete and damaged.read_bytes() == remade
    row = pq.read_table(out / "metadata.parquet").to_pandas().set_index("image_id").loc[plan[2].image_id]
    assert row["created_at"] == records[-1]["created_at"]  # merged again from the new record


def test_the_latest_record_wins_within_a_journal_and_between_journals(tmp_path):
    folder = tmp_path / RECORDS_DIR
    folder.mkdir(parents=True)
    rec = lambda image_id, size, stamp: json.dumps({"image_id": image_id, "file_name": f"images/{image_id}.png",  # noqa: E731
                                                    "file_bytes": size, "file_crc32": size,
                                                    "created_at": stamp}) + "\n"
    # part-a holds an image twice (a later line of one writer is later even if its clock stepped back);
    # part-b remade "b" after part-a wrote it, and wrote "c" before part-a's second record of it
    (folder / "part-a.jsonl").write_text(rec("a", 1, "2025-01-01T10:00:00.000+00:00")
                                         + rec("a", 2, "2025-01-01T09:00:00.000+00:00")
                                         + rec("b", 3, "2025-01-01T10:00:00.000+00:00")
                                         + rec("c", 4, "2025-01-01T12:00:00.000+00:00"))
    (folder / "part-b.jsonl").write_text(rec("b", 5, "2025-01-01T11:00:00.000+00:00")
                                         + rec("c", 6, "2025-01-01T11:30:00.000+00:00"))
    expected = {"a": 2, "b": 5, "c": 4}
    for fields in (("file_bytes",), None):  # the Arrow reader and the line reader
        found = read_records(tmp_path, fields)
        assert {k: r["file_bytes"] for k, r in found.items()} == expected
    whole = read_records(tmp_path)  # every field of the chosen records (the merge ranks them the same way)
    assert [whole[i]["file_name"] for i in ("c", "a", "b")] == ["images/c.png", "images/a.png", "images/b.png"]
    assert [whole[i]["created_at"] for i in ("c", "a", "b")] == ["2025-01-01T12:00:00.000+00:00",
                                                                 "2025-01-01T09:00:00.000+00:00",
                                                                 "2025-01-01T11:00:00.000+00:00"]


# ------------------------------------------------------------------ issue 19, item 5: array reruns keep their shard

def _slurm_task(task: int, **more) -> dict:
    """The variables Slurm gives one array task (the batch step: no srun step, so no ranks)."""
    return {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_JOB_ID": "5", "SLURM_PROCID": "0", "SLURM_NTASKS": "1",
            **{f"SLURM_ARRAY_TASK_{key}": str(value) for key, value in more.items()}}


def test_rerunning_some_array_tasks_keeps_their_shards(manifest, bundle_dir, text_encoder_dir, single, tmp_path):
    from helpers import assert_input_error

    out = tmp_path / "out"
    args = lambda *extra: _cli_args(manifest, out, bundle_dir, text_encoder_dir, *extra)  # noqa: E731
    shard_ids = lambda i: [json.loads(x)["image_id"] for x in  # noqa: E731
                           (out / RECORDS_DIR / f"part-shard{i}.jsonl").read_text().splitlines()]
    # the first launch, sbatch --array=10-16:2 (4 tasks), ran tasks 10 and 14 only
    for task in (10, 14):
        result = runner.invoke(app, args(), env=_slurm_task(task, MIN=10, MAX=16, STEP=2, COUNT=4))
        assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["shards"] == {"count": 4, "variable": "SLURM_ARRAY_TASK_ID",
                                                                    "first": 10, "step": 2}
    plan = load_plan(RunConfig.from_dict(json.loads((out / "run.json").read_text())["config"]))[1]
    # sbatch --array=12,16: Slurm numbers these two tasks as an array of 2 from 12; the split must not change
    before = sorted(p.name for p in (out / RECORDS_DIR).iterdir())
    refused = runner.invoke(app, args(), env=_slurm_task(16, MIN=12, MAX=16, COUNT=2))
    assert_input_error(refused, "--shard 3/4", "4 shards")
    assert sorted(p.name for p in (out / RECORDS_DIR).iterdir()) == before
    # a task alone, given only its task number: it takes the recorded count and its own shard (12 -> 1 of 4)
    alone = runner.invoke(app, args(), env=_slurm_task(12))
    assert alone.exit_code == 0, alone.output
    assert shard_ids(1) == [item.image_id for item in plan if item.index % 4 == 1]
    # a one-task array (sbatch --array=16) neither runs the whole plan nor another split
    single_task = runner.invoke(app, args(), env=_slurm_task(16, MIN=16, MAX=16, COUNT=1))
    assert_input_error(single_task, "--shard 3/4")
    assert not (out / RECORDS_DIR / "part-main.jsonl").exists() and not (out / "metadata.parquet").exists()
    # --shard with another count is refused; with the recorded count it finishes the run
    assert_input_error(runner.invoke(app, args("--shard", "1/2")), "4 shards", "--shard 1/4")
    last = runner.invoke(app, args("--shard", "3/4"))
    assert last.exit_code == 0, last.output
    assert shard_ids(3) == [item.image_id for item in plan if item.index % 4 == 3]
    same_dataset(single, out)
    assert len((out / ".cxrgen" / "merges.log").read_text().splitlines()) == 1


def test_a_kubernetes_or_aws_task_without_its_count_reads_the_recorded_one(manifest, bundle_dir, text_encoder_dir,
                                                                           tmp_path):
    out = tmp_path / "out"
    args = _cli_args(manifest, out, bundle_dir, text_encoder_dir)
    first = runner.invoke(app, args, env={"JOB_COMPLETION_INDEX": "0", "CXRGEN_SHARDS": "3"})
    assert first.exit_code == 0, first.output
    for env in ({"JOB_COMPLETION_INDEX": "2"}, {"AWS_BATCH_JOB_ARRAY_INDEX": "1"}):
        result = runner.invoke(app, args, env=env)
        assert result.exit_code == 0, result.output
    assert inspect_run(out).complete
    assert len((out / ".cxrgen" / "merges.log").read_text().splitlines()) == 1


def test_resolve_shard_maps_task_numbers_through_the_recorded_split():
    from cxrgen.errors import InputError
    from cxrgen.runs.workers import ShardRequest, resolve_shard

    recorded = {"count": 8, "variable": "SLURM_ARRAY_TASK_ID", "first": 1, "step": 1}
    slurm = lambda task, count, first: ShardRequest(task, count, "SLURM_ARRAY_TASK_ID", first)  # noqa: E731
    assert resolve_shard(slurm(1, 8, 1), None) == ((0, 8), recorded)  # the first launch records its split
    assert resolve_shard(slurm(5, 8, 1), recorded) == ((4, 8), recorded)
    assert resolve_shard(slurm(5, None, 0), recorded) == ((4, 8), recorded)  # no count: the recorded one
    assert resolve_shard(ShardRequest(4, 8, "--shard"), recorded)[0] == (4, 8)
    assert resolve_shard(ShardRequest(0, 1, "SLURM_ARRAY_TASK_ID", 0), None) == (None, None)  # no split at all
    for request, says in ((slurm(5, 2, 5), "--shard 4/8"), (slurm(9, None, 0), "--shard I/8"),
                          (ShardRequest(1, 4, "--shard"), "--shard 1/8")):
        with pytest.raises(InputError, match=says.replace("/", "/")):
            resolve_shard(request, recorded)


def test_shards_out_of_order_and_rerun_merge_exactly_once(manifest, bundle_dir, text_encoder_dir, single, tmp_path):
    """Merging is decided by what is done, never by which shard runs last: shards in the order 2, 0, 3, 1, then
    two finished shards again."""
    out = tmp_path / "out"
    args = lambda i: _cli_args(manifest, out, bundle_dir, text_encoder_dir, "--shard", f"{i}/4")  # noqa: E731
    merges = out / ".cxrgen" / "merges.log"
    for position, i in enumerate((2, 0, 3, 1)):
        result = runner.invoke(app, args(i))
        assert result.exit_code == 0, result.output
        assert (out / "metadata.parquet").exists() == (position == 3), (position, i)
    same_dataset(single, out)
    assert len(merges.read_text().splitlines()) == 1
    stamp = (out / "metadata.parquet").stat().st_mtime_ns
    for i in (3, 0):  # a rerun of a finished task (a scheduler retry) makes nothing and merges nothing
        result = runner.invoke(app, args(i))
        assert result.exit_code == 0, result.output
    assert len(merges.read_text().splitlines()) == 1 and (out / "metadata.parquet").stat().st_mtime_ns == stamp
