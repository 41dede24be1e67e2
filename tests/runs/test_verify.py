"""Verified generation (issue 20): `cxrgen generate --verify` keeps making an image, with the next attempt's seed,
until a classifier confirms every positive label of its row, decides nothing twice, and gives the same dataset
whatever the kills, workers, ranks and shards.

The classifier is a random-weight torchxrayvision DenseNet in the release format, saved under the default
verifier's file name. Its scores of the tiny bundle's images are arbitrary but fixed, so the acceptance rate is set
by the threshold: a run at --min-score 0 (everything accepted at attempt 0) measures every first try's score, and
the verified runs use a threshold in the middle of those scores, where a wide gap keeps float rounding away.
Results are checked through the files, the journals, metadata.parquet and the library.
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxrgen.config import RunConfig
from cxrgen.manifests.workitems import attempt_seed, load_plan
from cxrgen.provenance import read_provenance
from cxrgen.runs.generate import generate, resume
from cxrgen.runs.state import inspect_run
from cxrgen.runs.verify import ATTEMPTS_DIR, read_attempts
from cxrgen.runs.workers import share_of

with warnings.catch_warnings():
    import torchxrayvision as xrv

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Pneumothorax and Effusion (as "Pleural Effusion") are CheXpert findings the verifier knows; Support Devices is
# a label it does not know; view is no label at all; row e's -1 is uncertain (not verified), its effusion is.
MANIFEST = ("id,prompt,Pneumothorax,Pleural Effusion,Support Devices,view,num_images\n"
            "a,Left apical pneumothorax,1,0,1,PA,2\n"
            "b,Small right pleural effusion,0,1,0,AP,2\n"
            "c,Pneumothorax and pleural effusion,1,1,,PA,2\n"
            "d,No acute cardiopulmonary process,0,0,0,PA,1\n"
            "e,Possible pneumothorax with effusion,-1,1,0,PA,1\n")
JUDGED = {"a", "b", "c", "e"}  # rows whose images are verified
POSITIVES = {"a": ["Pneumothorax"], "b": ["Effusion"], "c": ["Effusion", "Pneumothorax"], "e": ["Effusion"]}
VOLATILE = ["created_at", "worker"]
RELEASE = "densenet121-res224-chex"
FLIP = 1e-3  # a score this close to the threshold may come out on either side in another batch layout


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("m") / "m.csv"
    path.write_text(MANIFEST)
    return path


def config(manifest, out, bundle_dir, text_encoder_dir, **kw) -> RunConfig:
    options = dict(steps=1, batch_size=3, quiet=True, device="cpu", rank_wait=0.0)
    return RunConfig(manifest=str(manifest), out=str(out), model=str(bundle_dir), text_encoder=str(text_encoder_dir),
                     **{**options, **kw})


def verified(manifest, out, bundle_dir, text_encoder_dir, weights, **kw) -> RunConfig:
    return config(manifest, out, bundle_dir, text_encoder_dir, verify_labels=True, verifier_weights=str(weights), **kw)


@pytest.fixture(scope="module")
def plain(manifest, bundle_dir, text_encoder_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain") / "out"
    generate(config(manifest, out, bundle_dir, text_encoder_dir))
    return out


@pytest.fixture(scope="module")
def first_tries(manifest, bundle_dir, text_encoder_dir, verifier_file, tmp_path_factory) -> Path:
    """--min-score 0: every judged image is accepted at attempt 0 (its score is measured, nothing is remade)."""
    out = tmp_path_factory.mktemp("zero") / "out"
    generate(verified(manifest, out, bundle_dir, text_encoder_dir, verifier_file, min_score=0.0))
    return out


@pytest.fixture(scope="module")
def threshold(first_tries) -> float:
    """The middle of the widest gap between the first tries' lowest positive scores, near their median."""
    scores = sorted(s for s in meta(first_tries).verify_score if not np.isnan(s))
    gaps = [(scores[i + 1] - scores[i], i) for i in range(1, len(scores) - 2)]
    width, i = max(gaps)
    assert width > 10 * FLIP, scores
    return round((scores[i] + scores[i + 1]) / 2, 6)


@pytest.fixture(scope="module")
def single(manifest, bundle_dir, text_encoder_dir, verifier_file, threshold, tmp_path_factory) -> Path:
    """The verified run every other layout must reproduce."""
    out = tmp_path_factory.mktemp("single") / "out"
    generate(verified(manifest, out, bundle_dir, text_encoder_dir, verifier_file, min_score=threshold,
                      max_attempts=8))
    return out


def meta(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "metadata.parquet")


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.int16)


def journal_attempts(out: Path) -> list[dict]:
    """Every complete line of the attempts journal, duplicates kept."""
    lines = []
    for part in sorted((out / ATTEMPTS_DIR).glob("part-*.jsonl")):
        lines += [json.loads(line) for line in part.read_text().splitlines(keepends=True) if line.endswith("\n")]
    return lines


def independent_scores(path: Path, weights: Path, release: str = RELEASE) -> dict[str, float]:
    """torchxrayvision's own forward pass (sigmoid + op_norm with the release's table) on the file as read by Pillow."""
    model = torch.load(weights, map_location="cpu", weights_only=False).eval()
    entry = xrv.models.model_urls[release]
    model.op_threshs = torch.tensor(entry["op_threshs"], dtype=torch.float32)
    image = xrv.datasets.normalize(pixels(path).astype(np.float32), 255)[None]
    image = xrv.datasets.XRayResizer(224)(xrv.datasets.XRayCenterCrop()(image))
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None])[0]
    return {name: float(out[i]) for i, name in enumerate(entry["labels"]) if name}


def row_of(image_id: str) -> str:
    return image_id.split("_")[0]


def flips_only(a: Path, b: Path, threshold: float) -> set[str]:
    """Images whose attempts differ between two runs; each must have had a score within FLIP of the threshold."""
    left, right = read_attempts(a), read_attempts(b)
    assert left.keys() == right.keys()
    differ = {i for i in left if sorted(left[i]) != sorted(right[i])}
    for image_id in differ:
        near = [s for tried in (left[image_id], right[image_id]) for r in tried.values()
                for s in r["scores"].values() if abs(s - threshold) < FLIP]
        assert near, f"{image_id}: attempts {sorted(left[image_id])} vs {sorted(right[image_id])}, no score near it"
    return differ


def assert_same_dataset(a: Path, b: Path, threshold: float) -> None:
    """The same rows, attempts and files (threshold flips aside), one file per row and nothing else in images/."""
    flipped = flips_only(a, b, threshold)
    meta_a, meta_b = meta(a), meta(b)
    keep = ~meta_a.image_id.isin(flipped)
    pd.testing.assert_frame_equal(meta_a[keep].drop(columns=VOLATILE + ["verify_score"]).reset_index(drop=True),
                                  meta_b[keep].drop(columns=VOLATILE + ["verify_score"]).reset_index(drop=True))
    np.testing.assert_allclose(meta_a[keep].verify_score, meta_b[keep].verify_score, atol=1e-4)
    for name in meta_a[keep].file_name:
        assert np.abs(pixels(a / name) - pixels(b / name)).max() <= 1, name
    files = sorted(str(p.relative_to(b)) for p in (b / "images").rglob("*") if p.is_file())
    assert files == sorted(meta_b.file_name)
    status = inspect_run(b)
    assert status.complete and not (status.orphaned_files or status.missing_files or status.temp_files)


# ---------------------------------------------------------------------------------------------- the rule of seeds

def test_attempt_seeds_follow_the_documented_rule():
    import hashlib

    assert attempt_seed(123, 0) == 123
    for seed in (0, 123, 2**63 - 1):
        for j in (1, 2, 7):
            digest = hashlib.sha256(f"cxrgen-attempt:{seed}:{j}".encode()).digest()
            assert attempt_seed(seed, j) == int.from_bytes(digest[:8], "big") >> 1
            assert 0 <= attempt_seed(seed, j) < 2**63
    assert len({attempt_seed(5, j) for j in range(50)}) == 50


# ---------------------------------------------------------------------------------------------- what a run keeps

def test_first_tries_are_the_files_a_plain_run_makes(plain, first_tries):
    a, b = meta(plain), meta(first_tries)
    # a plain run says so in the new columns: first and only attempt, not verified
    assert (a.attempt == 0).all() and a.verified.isna().all() and a.verify_score.isna().all()
    assert str(a.attempt.dtype) == "int64" and str(a.verify_score.dtype) == "float64"
    assert (b.attempt == 0).all()
    judged = b.image_id.map(row_of).isin(JUDGED)
    assert (b.verified[judged] == True).all() and b.verified[~judged].isna().all()  # noqa: E712
    assert b.verify_score[judged].notna().all() and b.verify_score[~judged].isna().all()
    pd.testing.assert_frame_equal(a.drop(columns=VOLATILE + ["verified", "verify_score"]),
                                  b.drop(columns=VOLATILE + ["verified", "verify_score"]))
    for name in a.file_name:
        assert (plain / name).read_bytes() == (first_tries / name).read_bytes(), name


def test_every_verified_image_shows_its_positive_labels_when_scored_again(single, verifier_file, threshold, manifest,
                                                                          bundle_dir, text_encoder_dir):
    table = meta(single)
    judged = table.image_id.map(row_of).isin(JUDGED)
    assert table.verified[~judged].isna().all() and (table.attempt[~judged] == 0).all()
    assert (table.attempt > 0).any(), "the threshold made no image try again: the test would prove nothing"
    attempts = read_attempts(single)
    for row in table[judged].itertuples():
        scores = independent_scores(single / row.file_name, verifier_file)
        positives = POSITIVES[row_of(row.image_id)]
        if row.verified:
            assert all(scores[p] >= threshold for p in positives), (row.image_id, scores)
            assert abs(row.verify_score - min(scores[p] for p in positives)) < 1e-4
        # every earlier attempt was rejected, with its verdict and scores in the journal
        tried = attempts[row.image_id]
        assert sorted(tried) == list(range(len(tried)))
        assert not any(tried[j]["accepted"] for j in range(row.attempt))
        for j, record in tried.items():
            assert record["seed"] == attempt_seed(tried[0]["seed"], j)
            assert set(record["scores"]) == set(positives)
            assert record["accepted"] == all(record["scores"][p] >= threshold for p in positives)
    # seeds: attempt j of an image is made from attempt_seed(the plan's seed, j), and its file says so
    plan = {item.image_id: item for item in load_plan(config(manifest, single, bundle_dir, text_encoder_dir))[1]}
    for row in table.itertuples():
        assert row.seed == attempt_seed(plan[row.image_id].seed, row.attempt)
        marker = read_provenance(single / row.file_name)
        assert marker["seed"] == row.seed and marker.get("attempt", 0) == row.attempt
    # the figures: status and the card agree with the table
    stats = inspect_run(single).verification
    assert stats["verified"] == int((table.verified == True).sum())  # noqa: E712
    assert stats["not_verified"] == int((~judged).sum()) == stats["not_verified_planned"]
    assert stats["made"] == sum(len(t) for t in attempts.values()) + int((~judged).sum())
    assert stats["findings"]["Pneumothorax"]["planned"] == 4 and stats["findings"]["Effusion"]["planned"] == 5
    assert stats["findings"]["Pneumothorax"]["attempts"] == sum(len(attempts[i]) for i in table.image_id
                                                                if row_of(i) in ("a", "c"))
    card = (single / "README.md").read_text()
    assert "## Verification" in card and "Support Devices" in card.split("## Verification")[1].split("## Settings")[0]


def test_when_every_attempt_fails_the_best_one_is_kept_unverified(manifest, bundle_dir, text_encoder_dir, verifier_file,
                                                                  tmp_path):
    out = tmp_path / "out"
    # no calibrated score reaches 1: every attempt is rejected and each judged image keeps its best of three
    generate(verified(manifest, out, bundle_dir, text_encoder_dir, verifier_file, min_score=1.0, max_attempts=3,
                      keep_rejected=True))
    table, attempts = meta(out), read_attempts(out)
    judged = table.image_id.map(row_of).isin(JUDGED)
    assert (table.verified[judged] == False).all() and table.verified[~judged].isna().all()  # noqa: E712
    for row in table[judged].itertuples():
        tried = attempts[row.image_id]
        assert sorted(tried) == [0, 1, 2] and not any(r["accepted"] for r in tried.values())
        best = max(tried, key=lambda j: (tried[j]["verify_score"], -j))
        assert row.attempt == best and row.verify_score == pytest.approx(tried[best]["verify_score"])
        data = (out / row.file_name).read_bytes()
        assert len(data) == tried[best]["file_bytes"]  # the kept file is that attempt's very bytes
    # --keep-rejected: every rejected attempt on disk under rejected/, with a table of its own
    rejected = pd.read_parquet(out / "rejected" / "metadata.parquet")
    assert len(rejected) == 3 * int(judged.sum())
    for row in rejected.itertuples():
        assert (out / "rejected" / row.file_name).is_file()
        assert row.verify_score == pytest.approx(attempts[row.image_id][row.attempt]["verify_score"])
    kept = rejected[rejected.kept]
    assert sorted(zip(kept.image_id, kept.attempt)) == sorted(zip(table[judged].image_id, table[judged].attempt))
    # status names the findings the model never draws at this threshold
    stats = inspect_run(out).verification
    assert stats["rare"] == ["Effusion", "Pneumothorax"] and stats["unverified"] == int(judged.sum())
    # the dataset's own export leaves them out
    from cxrgen.publish.export import ExportOptions, export_run

    exported = export_run(ExportOptions(out=str(out), to=str(tmp_path / "kept"), format="imagefolder",
                                        verified_only=True))
    assert exported.images == 0 and exported.total == len(table)


# ---------------------------------------------------------------------------------------------- kills and layouts

_DRIVER = """
import os, signal, sys
import cxrgen.runs.journal as journal
fault = sys.argv[1]
original = journal.Journal.append
def append(self, records):
    if records and "attempts" in str(self.path):
        retry = any(r["attempt"] >= 1 for r in records)
        rejected = any(not r["accepted"] for r in records)
        if fault == "before_verdict" and retry:
            os.kill(os.getpid(), signal.SIGKILL)  # the retry's file is written, its verdict is not
        original(self, records)
        if fault == "after_verdict" and rejected:
            os.kill(os.getpid(), signal.SIGKILL)  # verdicts journaled; the images they decide and the retries not
        return
    original(self, records)
journal.Journal.append = append
from cxrgen.cli import main
sys.argv = ["cxrgen"] + sys.argv[2:]
main()
"""


@pytest.mark.parametrize("fault", ["before_verdict", "after_verdict"])
def test_a_kill_around_a_verdict_resumes_to_the_same_dataset_deciding_nothing_twice(
        fault, manifest, bundle_dir, text_encoder_dir, verifier_file, threshold, single, tmp_path):
    out = tmp_path / "out"
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    argv = ["generate", str(manifest), "-o", str(out), "--model", str(bundle_dir), "--text-encoder",
            str(text_encoder_dir), "--steps", "1", "--batch-size", "3", "--device", "cpu", "--quiet", "--verify",
            "--verifier-weights", str(verifier_file), "--min-score", str(threshold), "--max-attempts", "8"]
    killed = subprocess.run([sys.executable, str(driver), fault, *argv], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -9, killed.stderr
    before = collections.Counter((r["image_id"], r["attempt"]) for r in journal_attempts(out))
    assert before and not (out / "metadata.parquet").exists()
    result = resume(out, quiet=True)
    assert result.complete
    # a recorded attempt is never made or judged again; the dataset is the uninterrupted run's
    after = collections.Counter((r["image_id"], r["attempt"]) for r in journal_attempts(out))
    assert set(after.values()) == {1} and set(before) <= set(after)
    assert_same_dataset(single, out, threshold)


def test_workers_ranks_and_shards_make_the_same_attempts_and_files(manifest, bundle_dir, text_encoder_dir,
                                                                   verifier_file, threshold, single, tmp_path):
    options = dict(min_score=threshold, max_attempts=8)
    # 2 local worker processes
    workers = tmp_path / "workers"
    generate(verified(manifest, workers, bundle_dir, text_encoder_dir, verifier_file, workers=2, **options))
    assert_same_dataset(single, workers, threshold)
    # 2 array-job shards, one after the other; the second one merges
    shards = tmp_path / "shards"
    for index in range(2):
        generate(verified(manifest, shards, bundle_dir, text_encoder_dir, verifier_file, **options),
                 rank=share_of((index, 2), None))
    assert_same_dataset(single, shards, threshold)
    # 2 torchrun ranks at once
    ranks = tmp_path / "ranks"
    cmd = [sys.executable, "-m", "cxrgen", "generate", str(manifest), "-o", str(ranks), "--model", str(bundle_dir),
           "--text-encoder", str(text_encoder_dir), "--steps", "1", "--batch-size", "3", "--device", "cpu",
           "--quiet", "--verify", "--verifier-weights", str(verifier_file), "--min-score", str(threshold),
           "--max-attempts", "8"]
    procs = [subprocess.Popen(cmd, env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                        "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True) for r in range(2)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert_same_dataset(single, ranks, threshold)
    assert set(meta(ranks).worker) == {"rank0", "rank1"}
