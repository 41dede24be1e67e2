"""Runs straight into object storage (issue 21): `-o s3://bucket/prefix` against a real S3-compatible server on the
loopback (moto behind tests/s3_server.py's gate), compared with a local run of the same manifest.

Kills are done as in test_resume.py: a child forked from a fork server wraps one method of the object store
to SIGKILL itself at a chosen instant. Everything is checked through the bucket's objects, metadata.parquet
(read by pandas straight from s3://) and cxrgen.runs.state, never by scraping output beyond the one error line.
"""
from __future__ import annotations

import collections
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from helpers import PLANNED, assert_input_error
from PIL import Image
from s3_server import CREDENTIALS
from typer.testing import CliRunner

from cxrgen.cli import app
from cxrgen.runs.state import inspect_run

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")
SECRETS = (CREDENTIALS["AWS_ACCESS_KEY_ID"], CREDENTIALS["AWS_SECRET_ACCESS_KEY"])


@pytest.fixture(scope="module")
def args(manifest, bundle_dir, text_encoder_dir):
    def make(out, *extra: str, quiet: bool = True) -> list[str]:
        return ["generate", str(manifest), "--out", str(out), "--model", str(bundle_dir), "--text-encoder",
                str(text_encoder_dir), "--steps", "2", "--num-images", "2", "--batch-size", "2", "--device", "cpu",
                *(["--quiet"] if quiet else []), *extra]
    return make


@pytest.fixture(scope="module")
def reference(tmp_path_factory, args) -> Path:
    """The same run in a local folder: what every object-store run must equal."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = runner.invoke(app, args(out))
    assert result.exit_code == 0, result.output
    return out


def cli(*argv):
    return runner.invoke(app, [str(a) for a in argv])


def client(s3):
    return boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1",
                        aws_access_key_id=SECRETS[0], aws_secret_access_key=SECRETS[1])


def objects(s3, bucket: str, prefix: str = "run") -> dict[str, bytes]:
    """Every object under bucket/prefix/, by key relative to the prefix."""
    c, found = client(s3), {}
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for item in page.get("Contents", []):
            found[item["Key"][len(prefix) + 1:]] = c.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return found


def records(found: dict[str, bytes]) -> list[dict]:
    """Every committed record, duplicates kept."""
    return [json.loads(line) for key, data in sorted(found.items())
            if key.startswith(".cxrgen/records/") for line in data.decode().splitlines()]


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("L"), dtype=np.int16)


def metadata_puts(s3, bucket: str) -> int:
    """Successful PUTs of metadata.parquet: merges that reached the bucket (a lost conditional create gets 412)."""
    return sum(1 for method, path, status, _ in s3.gate.requests
               if method == "PUT" and path == f"/{bucket}/run/metadata.parquet" and status == 200)


def assert_same_as_reference(s3, bucket: str, reference: Path, *, same_bytes: bool = False) -> dict[str, bytes]:
    """The prefix holds the reference's dataset: same rows (but for when and by whom each image was made), the same
    pixels, one object per image and nothing else under images/, each image recorded once, merged once."""
    url = f"s3://{bucket}/run"
    table = pd.read_parquet(f"{url}/metadata.parquet")  # what users and HF datasets read: straight from the bucket
    expected = pd.read_parquet(reference / "metadata.parquet")
    pd.testing.assert_frame_equal(table.drop(columns=["created_at", "worker"]),
                                  expected.drop(columns=["created_at", "worker"]))
    found = objects(s3, bucket)
    assert {k for k in found if k.startswith("images/")} == set(table.file_name)
    for name in table.file_name:
        if same_bytes:
            assert found[name] == (reference / name).read_bytes(), name
        assert np.abs(pixels(found[name]) - pixels((reference / name).read_bytes())).max() <= 1, name
    counts = collections.Counter(r["image_id"] for r in records(found))
    assert set(counts) == set(table.image_id) and set(counts.values()) == {1}, counts
    assert {"run.json", "metadata.parquet", "README.md"} <= set(found)
    assert len([k for k in found if k.startswith(".cxrgen/merges/")]) <= 1
    assert metadata_puts(s3, bucket) == 1  # exactly one merge reached the bucket
    status = inspect_run(url)
    assert status.complete and not (status.missing_files or status.orphaned_files or status.temp_files)
    for key, data in found.items():
        assert not any(secret.encode() in data for secret in SECRETS), key
    return found


# ---------------------------------------------------------------- the same dataset as a local run


def test_generate_into_s3_gives_the_local_run_and_status_reads_it(s3, args, reference):
    bucket = s3.bucket()
    url = f"s3://{bucket}/run"
    result = runner.invoke(app, args(url, quiet=False))
    assert result.exit_code == 0, result.output
    assert not any(secret in result.output for secret in SECRETS)
    found = assert_same_as_reference(s3, bucket, reference, same_bytes=True)
    saved, local = json.loads(found["run.json"]), json.loads((reference / "run.json").read_text())
    assert saved["settings"] == local["settings"] and saved["config"]["out"] == url
    assert found["README.md"].decode().split("## Settings")[1] == \
        (reference / "README.md").read_text().split("## Settings")[1]
    assert pq.read_schema(io.BytesIO(found["metadata.parquet"])).names == \
        pq.read_schema(reference / "metadata.parquet").names
    status = cli("status", url)
    assert status.exit_code == 0 and f"run:       {url}" in status.output
    # a second generate with the same settings resumes and finds nothing to do
    again = runner.invoke(app, args(url))
    assert again.exit_code == 0 and metadata_puts(s3, bucket) == 1


# ---------------------------------------------------------------- SIGKILL, then resume


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)


def _kill_in_write(prefix: str, n: int):
    """SIGKILL just before the n-th object whose name starts with prefix is PUT."""
    import threading

    from cxrgen.storage.objects import ObjectStore

    real, count, lock = ObjectStore.write_bytes, [0], threading.Lock()

    def write_bytes(self, name, data):
        if name.startswith(prefix):
            with lock:
                count[0] += 1
                hit = count[0] == n
            if hit:
                _die()
        return real(self, name, data)
    ObjectStore.write_bytes = write_bytes


def _kill_in_commit(after: bool):
    from cxrgen.storage.objects import ObjectStore

    real = ObjectStore.commit

    def commit(self, name, source):
        if not after:
            _die()
        done = real(self, name, source)
        _die()
        return done
    ObjectStore.commit = commit


FAULTS = {
    "between_image_puts": lambda: _kill_in_write("images/", 3),  # batch 2's first image is never PUT
    "images_without_record": lambda: _kill_in_write(".cxrgen/records/", 2),  # batch 2's images are, its record not
    "during_merge": lambda: _kill_in_commit(after=False),
    "between_metadata_and_card": lambda: _kill_in_commit(after=True),
}


def _child(argv: list[str], fault: str, log: str, env: dict) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    import torch

    torch.set_num_threads(1)
    FAULTS[fault]()
    app(args=argv, prog_name="cxrgen")


@pytest.fixture(scope="module")
def spawn():
    if "forkserver" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs a POSIX fork server (and SIGKILL)")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["cxrgen.cli", "cxrgen.runs.generate", "cxrgen.storage.objects", "s3fs", "torch",
                                "monai.networks.nets", "transformers.models.clip.modeling_clip", "PIL.Image"])
    children = []

    def start(argv, fault, log, env):
        child = ctx.Process(target=_child, args=(argv, fault, str(log), env), daemon=True)
        child.start()
        children.append(child)
        child.join(300)
        assert child.exitcode is not None, "child did not finish"
        return child
    yield start
    for child in children:
        if child.is_alive():
            child.kill()
        child.join(10)


LEFT_BEHIND = {
    # fault: (images under images/, records, metadata.parquet there)
    # batch 1's PUTs and its record may still be in flight when batch 2's first PUT starts: any of them may have
    # landed, but a record only after both of its images
    "between_image_puts": lambda images, recs, meta: images <= 2 and len(recs) in (0, 2) and
    (not recs or images == 2) and not meta,
    # batch 3's images are written while batch 2's record is committed
    "images_without_record": lambda images, recs, meta: images >= 4 and len(recs) == 2 and not meta,
    "during_merge": lambda images, recs, meta: images == PLANNED and len(recs) == PLANNED and not meta,
    "between_metadata_and_card": lambda images, recs, meta: images == PLANNED and meta,
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_sigkill_then_resume_gives_the_same_dataset_once(fault, s3, spawn, args, reference, tmp_path):
    bucket = s3.bucket()
    url = f"s3://{bucket}/run"
    child = spawn(args(url), fault, tmp_path / "child.log", s3.env)
    assert child.exitcode == -signal.SIGKILL, (tmp_path / "child.log").read_text()
    found = objects(s3, bucket)
    images = len([k for k in found if k.startswith("images/")])
    assert LEFT_BEHIND[fault](images, records(found), "metadata.parquet" in found), sorted(found)
    if fault != "between_metadata_and_card":
        assert cli("status", url).exit_code == 1
    # the dead writer's claim does not block: its process is gone from this host
    result = cli("resume", url, "--quiet")
    assert result.exit_code == 0, result.output
    assert_same_as_reference(s3, bucket, reference)


# ---------------------------------------------------------------- many writers, one prefix


def _launch(argv: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cxrgen", *argv], env={**os.environ, **env, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_three_shards_and_two_ranks_write_one_prefix_concurrently(s3, args, reference):
    shards = s3.bucket()
    procs = [_launch(args(f"s3://{shards}/run", "--shard", f"{i}/3"), {}) for i in range(3)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert_same_as_reference(s3, shards, reference)
    workers = set(pd.read_parquet(f"s3://{shards}/run/metadata.parquet").worker)
    assert workers == {"shard0", "shard1", "shard2"}
    ranks = s3.bucket()
    procs = [_launch(args(f"s3://{ranks}/run", "--rank-wait", "120"), {"RANK": str(r), "WORLD_SIZE": "2"})
             for r in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs  # the first to finish waited for the other
    assert_same_as_reference(s3, ranks, reference)
    assert set(pd.read_parquet(f"s3://{ranks}/run/metadata.parquet").worker) == {"rank0", "rank1"}


def test_racing_launches_with_other_settings_leave_one_run_and_one_line_for_the_loser(s3, args):
    bucket = s3.bucket()
    url = f"s3://{bucket}/run"
    procs = [_launch(args(url, "--seed", str(seed)), {}) for seed in (0, 1)]
    outputs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outputs
    loser = outputs[[p.returncode for p in procs].index(2)][1]
    lines = [line for line in loser.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cxrgen: error: ") and url in lines[0], loser
    found = objects(s3, bucket)
    winner_seed = json.loads(found["run.json"])["config"]["seed"]
    assert {r["image_id"] for r in records(found)} == set(pd.read_parquet(f"{url}/metadata.parquet").image_id)
    # once the run exists, the other seed is refused before anything is loaded or written
    other = 1 - winner_seed
    refused = runner.invoke(app, args(url, "--seed", str(other)))
    assert_input_error(refused, f"seed: {winner_seed} -> {other}", "choose a new --out")
    assert objects(s3, bucket) == found


def test_merges_racing_on_a_finished_prefix_commit_metadata_once(s3, args, manifest):
    import threading

    from cxrgen.config import RunConfig
    from cxrgen.manifests.workitems import load_plan
    from cxrgen.runs.state import finalize_once

    bucket = s3.bucket()
    url = f"s3://{bucket}/run"
    assert runner.invoke(app, args(url)).exit_code == 0
    c = client(s3)
    for key in ("run/metadata.parquet", "run/README.md"):
        c.delete_object(Bucket=bucket, Key=key)
    for key in [k for k in objects(s3, bucket) if k.startswith(".cxrgen/merges/")]:
        c.delete_object(Bucket=bucket, Key=f"run/{key}")
    s3.gate.requests.clear()
    saved = json.loads(objects(s3, bucket)["run.json"])
    manifest_, plan = load_plan(RunConfig.from_dict(saved["config"]))
    results, start = [], threading.Barrier(4)

    def merge():
        start.wait()
        results.append(finalize_once(url, plan, manifest_))
    threads = [threading.Thread(target=merge) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [f"{url}/metadata.parquet"] * 4
    assert metadata_puts(s3, bucket) == 1
    assert len([k for k in objects(s3, bucket) if k.startswith(".cxrgen/merges/")]) == 1


# ---------------------------------------------------------------- a flaky store


def test_throttling_and_server_errors_are_retried_and_the_run_completes(s3, args, reference):
    bucket = s3.bucket()
    s3.gate.fail("PUT", f"/{bucket}/run/images/", 503, "SlowDown", 4)
    s3.gate.fail("PUT", f"/{bucket}/run/.cxrgen/records/", 500, "InternalError", 1)
    s3.gate.fail("GET", f"/{bucket}/run/", 503, "SlowDown", 2)
    try:
        result = runner.invoke(app, args(f"s3://{bucket}/run"))
    finally:
        s3.gate.clear()
    assert result.exit_code == 0, result.output
    puts = collections.Counter(p for m, p, _, _ in s3.gate.requests if m == "PUT" and f"/{bucket}/run/images/" in p)
    assert sum(puts.values()) == PLANNED + 4 and max(puts.values()) >= 2  # failed PUTs were sent again
    assert_same_as_reference(s3, bucket, reference)


def test_a_store_failing_past_the_retries_stops_with_one_line_and_resumes(s3, args, reference):
    bucket = s3.bucket()
    url = f"s3://{bucket}/run"
    s3.gate.fail("PUT", f"/{bucket}/run/images/00000/00000002", 503, "SlowDown", -1)
    try:
        result = runner.invoke(app, args(url))
    finally:
        s3.gate.clear()
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cxrgen: error: cannot write "), result.output
    assert f"{url}/images/00000/00000002.jpg" in lines[0] and "503 SlowDown" in lines[0]
    assert f"cxrgen resume {url}" in lines[0] and not any(secret in lines[0] for secret in SECRETS)
    assert cli("resume", url, "--quiet").exit_code == 0
    assert_same_as_reference(s3, bucket, reference)


# ---------------------------------------------------------------- bad input: exit 2, one line, nothing written


def _no_credentials(monkeypatch, s3):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")


def _no_permission(monkeypatch, s3):
    s3.gate.fail("PUT", "/run/", 403, "AccessDenied", -1)


def _not_a_run(monkeypatch, s3):
    pass  # the bucket holds notes.txt under the prefix (below)


BAD = {
    # case: (url template, setup, words of the one line)
    "unknown scheme": ("foo://{bucket}/run", None, ["foo://", "no storage for the scheme"]),
    "missing bucket": ("s3://{bucket}-missing/run", None, ["does not exist", "aws s3 mb"]),
    "no credentials": ("s3://{bucket}/run", _no_credentials, ["no valid credentials", "AWS_ACCESS_KEY_ID"]),
    "no permission": ("s3://{bucket}/run", _no_permission, ["no permission to write", "s3:PutObject"]),
    "not a cxrgen run": ("s3://{bucket}/run", _not_a_run, ["holds no cxrgen run", "choose a new or empty prefix"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_output_urls_are_refused_with_one_line_and_nothing_written(case, s3, args, monkeypatch):
    import cxrgen.runs.generate

    bucket = s3.bucket()
    template, setup, words = BAD[case]
    url = template.format(bucket=bucket)
    if case == "not a cxrgen run":
        client(s3).put_object(Bucket=bucket, Key="run/notes.txt", Body=b"someone else's")
    before = objects(s3, bucket)
    if setup is not None:
        setup(monkeypatch, s3)
    monkeypatch.setattr(cxrgen.runs.generate, "load_models", lambda *a, **k: pytest.fail("loaded models"))
    try:
        refused = runner.invoke(app, args(url))
    finally:
        s3.gate.clear()
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", SECRETS[0])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRETS[1])
    line = assert_input_error(refused, url.split("/run")[0].replace("-missing", ""), *words)
    assert not any(secret in line for secret in SECRETS)
    assert objects(s3, bucket) == before


def test_a_missing_s3_package_is_named_with_its_install_command(s3, args, monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)
    refused = runner.invoke(app, args(f"s3://{s3.bucket()}/run"))
    assert_input_error(refused, "s3fs", 'pip install "cxrgen[s3]"')


# ---------------------------------------------------------------- the documented array jobs


def _generate_params(argv: list[str]) -> dict:
    """The parameters `cxrgen generate` parses from argv (unknown options and bad values are refused)."""
    import typer

    assert argv[:2] == ["cxrgen", "generate"]
    command = typer.main.get_command(app).commands["generate"]
    return command.make_context("generate", argv[2:], resilient_parsing=False).params


def test_the_indexed_job_and_the_batch_array_examples_write_one_bucket_with_valid_command_lines(monkeypatch):
    """examples/k8s-indexed-job-s3.yaml and examples/aws-batch-array-s3.json: valid files, a `cxrgen generate` into
    an s3:// prefix that parses, and a shard split that cxrgen reads from each scheduler's variables."""
    import yaml

    from cxrgen.runs.workers import shard_from_env

    examples = Path(__file__).resolve().parents[2] / "examples"
    job = yaml.safe_load((examples / "k8s-indexed-job-s3.yaml").read_text())
    spec = job["spec"]
    assert job["kind"] == "Job" and spec["completionMode"] == "Indexed"
    container = spec["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert int(env["CXRGEN_SHARDS"]) == spec["completions"]  # a Job does not export its size
    params = _generate_params(container["command"] + container.get("args", []))
    assert str(params["out"]).startswith("s3://")
    request = shard_from_env({"JOB_COMPLETION_INDEX": "7", "CXRGEN_SHARDS": env["CXRGEN_SHARDS"]}, None)
    assert (request.task, request.count) == (7, spec["completions"])
    batch = json.loads((examples / "aws-batch-array-s3.json").read_text())
    size = batch["arrayProperties"]["size"]
    params = _generate_params(batch["containerOverrides"]["command"])
    assert str(params["out"]).startswith("s3://")
    request = shard_from_env({"AWS_BATCH_JOB_ARRAY_INDEX": "3", "AWS_BATCH_JOB_ARRAY_SIZE": str(size)}, None)
    assert (request.task, request.count) == (3, size)
