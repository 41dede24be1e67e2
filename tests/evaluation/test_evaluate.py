"""`cxrgen evaluate` (issue 8): fidelity, diversity, label adherence, per-image verdicts, the real-feature cache,
safe weight loading and every refusal. CPU only, no network: the evaluator is torchxrayvision's DenseNet with
seeded random weights saved in the release file's format (tests/tiny_eval.py), the runs are made directly.

Results are checked through the files cxrgen writes (scores.parquet, summary.json, report.md, the cache) and,
for the exact FID/KID comparisons, through the features the library returns.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import pytest
import tiny_eval as te
import torch
from helpers import assert_input_error, bucket_objects, upload_run
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

import cxrgen.hub.download
import cxrgen.model.classifier
import cxrgen.pins
from cxrgen.cli import app
from cxrgen.errors import InputError
from cxrgen.evaluation.evaluate import EvalOptions, evaluate_run
from cxrgen.evaluation.metrics import (
    group_pairs,
    label_state,
    map_columns,
    ms_ssim_values,
    random_pairs,
)
from cxrgen.hub.components import MARKER, evaluator_component, is_staged
from cxrgen.hub.sources import WebSource
from cxrgen.model.classifier import Evaluator, resolve_weights

runner = CliRunner()
PATHOLOGIES = [p for p in te.RELEASE["labels"] if p]
SCORE_COLUMNS = [f"xrv_{p.replace(' ', '_')}" for p in PATHOLOGIES]


def evaluate(*args, weights=None):
    """Run `cxrgen evaluate` in-process (the given weights, if any)."""
    extra = ["--evaluator-weights", str(weights)] if weights else []
    return runner.invoke(app, ["evaluate", *map(str, args), *extra])


def summary_of(out: Path) -> dict:
    return json.loads((out / "quality" / "summary.json").read_text())


def snapshot(*folders: Path) -> dict:
    """Every file under the folders with its size and mtime: 'nothing written' means this does not change."""
    files = {}
    for folder in folders:
        if folder.exists():
            for path in folder.rglob("*"):
                files[str(path)] = None if path.is_dir() else (path.stat().st_size, path.stat().st_mtime_ns)
    return files


class ForwardCounter:
    """Counts the images that go through the network; `method` replaces Evaluator.forward."""

    def __init__(self):
        self.images = 0
        original = Evaluator.forward

        def method(evaluator, batch):
            self.images += batch.shape[0]
            return original(evaluator, batch)

        self.method = method


# ------------------------------------------------------------------ 1. fidelity and the real-feature cache

@pytest.fixture(scope="module")
def fidelity(tmp_path_factory, weights):
    """Three evaluations against one real folder: the real set itself, a brightened copy, and after a touch.

    Records what each wrote and how many images went through the network.
    """
    root = tmp_path_factory.mktemp("fidelity")
    home = root / "home"
    real = root / "real"
    originals = te.images(12, seed=1)
    for i, pixels in enumerate(originals):  # nested folders and both formats: the search is recursive
        te.write_image(real / f"part{i % 2}" / f"r{i:02d}.{'png' if i % 3 else 'jpg'}", pixels)
    # The synthetic "run" holds exactly the real files' pixels after their own encoding.
    decoded = [cxrgen.model.classifier.decode_gray(p) for p in sorted(real.rglob("r*.*"))]
    same = te.make_run(root / "same", decoded)
    bright = te.make_run(root / "bright", te.images(12, seed=1, brighten=60))
    counts = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CXRGEN_HOME", str(home))
        counter = ForwardCounter()
        mp.setattr(Evaluator, "forward", counter.method)
        # 1. the set against itself, through the CLI (fills the cache)
        result = evaluate(same, "--real", real, "--quiet", "--max-pairs", "10", weights=weights)
        assert result.exit_code == 0, result.output
        counts["same"] = counter.images
        # 2. the brightened set through the library, which returns the features it used
        before = counter.images
        bright_result = evaluate_run(EvalOptions(out=str(bright), real=str(real), evaluator_weights=str(weights),
                                                 cache_dir=str(home), max_pairs=10, quiet=True))
        counts["bright"] = counter.images - before
        cache_files = sorted((home / "eval-cache").glob("*.npz"))
        # 3. touching one real file invalidates the cache
        touched = sorted(real.rglob("r*.*"))[3]
        stamp = touched.stat().st_mtime + 5
        os.utime(touched, (stamp, stamp))
        before = counter.images
        result = evaluate(same, "--real", real, "--quiet", "--max-pairs", "10", weights=weights)
        assert result.exit_code == 0, result.output
        counts["touched"] = counter.images - before
    return {"same": same, "bright": bright, "bright_result": bright_result, "counts": counts,
            "cache_files": cache_files, "home": home, "real": real}


def test_fid_and_kid_of_a_set_against_itself_are_about_zero(fidelity):
    s = summary_of(fidelity["same"])
    bright = fidelity["bright_result"].summary
    assert s["n_images"] == 12 and s["n_real"] == 12 and s["n_real_unreadable"] == 0
    assert abs(s["fid"]) < 1e-3 * bright["fid"]
    assert abs(s["fid"]) < 1e-2
    # The unbiased KID estimator of a set against itself is slightly negative, never far from 0.
    assert abs(s["kid_mean"]) < 0.05 * bright["kid_mean"]
    assert s["fid_biased"] is True  # 12 images: the report must say FID is biased at this size
    report = (fidelity["same"] / "quality" / "report.md").read_text()
    assert "FID is biased at this size" in report


def test_fid_and_kid_grow_when_the_set_is_brightened(fidelity):
    same, bright = summary_of(fidelity["same"]), fidelity["bright_result"].summary
    assert bright["fid"] > 1.0
    assert bright["fid"] > 1000 * abs(same["fid"])
    assert bright["kid_mean"] > same["kid_mean"] + 1e-3


def test_fid_and_kid_equal_an_independent_computation_on_the_same_features(fidelity):
    result = fidelity["bright_result"]
    fake = result.synthetic_features.astype(np.float64)
    real = result.real_features.astype(np.float64)
    assert fake.shape == (12, 1024) and real.shape == (12, 1024)
    assert result.summary["fid"] == pytest.approx(te.frechet(fake, real), rel=1e-3)
    # With equal set sizes every KID subset is the whole set, so each subset's MMD is the full-set estimate.
    assert result.summary["kid_subset_size"] == 12
    assert result.summary["kid_mean"] == pytest.approx(te.kid_unbiased(real, fake), rel=1e-6)
    assert result.summary["kid_std"] == pytest.approx(0.0, abs=1e-9)
    # The cached real features are the same vectors (the file is the cache this evaluation read).
    with np.load(fidelity["cache_files"][0]) as cached:
        np.testing.assert_array_equal(cached["features"], result.real_features)


def test_real_features_are_cached_until_a_real_file_changes(fidelity):
    counts = fidelity["counts"]
    assert counts["same"] == 24  # 12 synthetic + 12 real
    assert counts["bright"] == 12  # the real set came from the cache
    assert fidelity["bright_result"].summary["real_features_cached"] is True
    assert counts["touched"] == 24  # one real file's mtime changed: computed again
    assert len(fidelity["cache_files"]) == 1
    assert len(list((fidelity["home"] / "eval-cache").glob("*.npz"))) == 2  # a new key, the old entry untouched
    assert summary_of(fidelity["same"])["real_features_cached"] is False


# ------------------------------------------------------------------ 2. label adherence and per-image verdicts

EFFUSION = [1, 1, 1, 0, 0, 0, -1, 0, 1, 0, 1, 0, None, -1, 1, 0]  # 6 positive, 7 negative (row 7 unreadable)
CARDIO = [True, False, None, True, False, True, False, None, True, False, True, False, True, False, True, False]
MINE = ["1", "0", "", "1", "0", "true", "false", "-1", "1", "0", "1", "0", "1", "0", "1", "0"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, weights):
    """A 16-image run with a blank, a saturated, an unreadable and a truncated image and five label columns."""
    root = tmp_path_factory.mktemp("labelled")
    pixels = te.images(16, seed=7)
    rng = np.random.default_rng(3)
    pixels[4] = np.full((64, 64), 128, np.uint8)  # blank
    pixels[5] = (rng.random((64, 64)) > 0.5).astype(np.uint8) * 255  # saturated (and not blank)
    pixels[6] = b"this is not an image"  # unreadable
    good = te.write_image(root / "tmp.png", pixels[7])
    pixels[7] = good.read_bytes()[:60]  # a cut-off PNG: unreadable too
    labels = {"Pleural Effusion": EFFUSION, "cardiomegaly": CARDIO, "my_finding": MINE,
              "Support Devices": [0] * 16, "No Finding": ["x"] * 16}
    out = te.make_run(root / "run", pixels, prompts=[f"prompt {i // 4}" for i in range(16)], labels=labels)
    label_map = root / "map.json"
    label_map.write_text(json.dumps({"my_finding": "pneumothorax"}))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in [out / "metadata.parquet", *out.rglob("*.png")]}
    home = root / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CXRGEN_HOME", str(home))
        result = evaluate(out, "--label-map", label_map, "--min-score", "0.5", "--batch-size", "5", weights=weights)
    assert result.exit_code == 0, result.output
    return {"out": out, "result": result, "before": before}


def test_scores_parquet_has_one_row_per_image_with_every_pathology(labelled):
    scores = pd.read_parquet(labelled["out"] / "quality" / "scores.parquet")
    assert list(scores.columns) == ["image_id", *SCORE_COLUMNS, "flags", "accepted"]
    assert len(SCORE_COLUMNS) == 18 and "xrv_Lung_Opacity" in SCORE_COLUMNS
    meta = pd.read_parquet(labelled["out"] / "metadata.parquet")
    assert scores["image_id"].tolist() == meta["image_id"].tolist()
    readable = ~scores.index.isin([6, 7])
    values = scores.loc[readable, SCORE_COLUMNS].to_numpy()
    assert np.isfinite(values).all() and (values >= 0).all() and (values <= 1).all()
    assert scores.loc[~readable, SCORE_COLUMNS].isna().all().all()


def test_auroc_median_and_agreement_equal_sklearn_and_numpy_on_the_stored_scores(labelled):
    scores = pd.read_parquet(labelled["out"] / "quality" / "scores.parquet")
    s = summary_of(labelled["out"])
    expected_states = {
        "Pleural Effusion": ("Effusion", [True if v == 1 else False if v == 0 else None for v in EFFUSION]),
        "cardiomegaly": ("Cardiomegaly", CARDIO),
        "my_finding": ("Pneumothorax", [{"1": True, "true": True, "0": False, "false": False}.get(v) for v in MINE]),
    }
    assert set(s["findings"]) == set(expected_states)
    for column, (pathology, states) in expected_states.items():
        finding = s["findings"][column]
        assert finding["pathology"] == pathology
        rows = [i for i, st in enumerate(states) if st is not None and i not in (6, 7)]  # -1, blank, unreadable out
        y = np.array([states[i] for i in rows])
        score = scores[f"xrv_{pathology.replace(' ', '_')}"].to_numpy()[rows]
        assert (finding["n_pos"], finding["n_neg"]) == (int(y.sum()), int((~y).sum()))
        assert finding["auroc"] == pytest.approx(roc_auc_score(y, score), abs=1e-12)
        assert finding["median_pos_score"] == pytest.approx(float(np.median(score[y])), abs=1e-12)
        assert finding["agreement"] == pytest.approx(float(np.mean(score[y] >= 0.5)), abs=1e-12)
    # -1 and blanks are neither positive nor negative, and the unreadable row 7 has no score: 6 + 6 remain
    assert (s["findings"]["Pleural Effusion"]["n_pos"], s["findings"]["Pleural Effusion"]["n_neg"]) == (6, 6)


def test_unmapped_label_columns_are_reported_as_not_evaluated(labelled):
    s = summary_of(labelled["out"])
    assert s["not_evaluated"] == ["Support Devices", "No Finding"]
    assert s["label_map"] == {"Pleural Effusion": "Effusion", "cardiomegaly": "Cardiomegaly",
                              "my_finding": "Pneumothorax"}
    report = (labelled["out"] / "quality" / "report.md").read_text()
    assert "Support Devices, No Finding" in report
    assert "not evaluated: Support Devices, No Finding" in labelled["result"].stdout


def test_blank_saturated_unreadable_and_label_missing_flags_and_counts_add_up(labelled):
    scores = pd.read_parquet(labelled["out"] / "quality" / "scores.parquet")
    s = summary_of(labelled["out"])
    flags = [set(f.split(",")) - {""} for f in scores["flags"]]
    assert flags[4] >= {"blank"} and "saturated" not in flags[4]
    assert flags[5] >= {"saturated"} and "blank" not in flags[5]
    assert flags[6] == {"unreadable"} and flags[7] == {"unreadable"}
    # label_missing: exactly the readable images with a positive mapped label scoring below --min-score
    positives = {"xrv_Effusion": [v == 1 for v in EFFUSION], "xrv_Cardiomegaly": [v is True for v in CARDIO],
                 "xrv_Pneumothorax": [v in ("1", "true") for v in MINE]}
    for row in range(16):
        if row in (6, 7):
            continue
        missing = any(positives[c][row] and scores.loc[row, c] < 0.5 for c in positives)
        assert ("label_missing" in flags[row]) == missing, row
        assert flags[row] - {"label_missing", "blank", "saturated"} == set()
    assert any("label_missing" in f for f in flags) and not all("label_missing" in f for f in flags)
    assert s["n_flagged"] == {flag: sum(flag in f for f in flags)
                              for flag in ("unreadable", "blank", "saturated", "label_missing")}
    assert s["n_flagged"]["unreadable"] == 2
    assert scores["accepted"].tolist() == [not f for f in flags]
    assert s["n_accepted"] == int(scores["accepted"].sum()) == 16 - sum(bool(f) for f in flags)


def test_report_summary_and_printed_headline(labelled, weights):
    out = labelled["out"] / "quality"
    s = summary_of(labelled["out"])
    assert s["evaluator"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert s["versions"]["torchxrayvision"] and s["versions"]["torchmetrics"] and s["versions"]["cxrgen"]
    assert s["n_real"] is None and s["fid"] is None and s["ms_ssim_real"] is None
    # 4 prompts x 4 images, rows 6 and 7 unreadable: within-prompt pairs of readable images only
    assert s["ms_ssim_within_prompt_pairs"] == 6 + 1 + 6 + 6
    assert 0 < s["ms_ssim_within_prompt"] <= 1 and 0 < s["ms_ssim_random"] <= 1
    report = (out / "report.md").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 4  # MS-SSIM histogram + one per finding
    for name in pngs:
        assert f"]({name})" in report
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 'query("accepted")' in report  # how to keep only accepted images
    assert "MS-SSIM" in labelled["result"].stdout and "AUROC" in labelled["result"].stdout
    assert "cxrgen evaluate" in labelled["result"].stderr  # the progress bar
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_metadata_and_images_are_never_touched(labelled):
    for path, (data, mtime) in labelled["before"].items():
        assert path.read_bytes() == data and path.stat().st_mtime_ns == mtime, path


def test_rerunning_replaces_outputs_and_drops_stale_plots(tmp_path, weights, home):
    labels = {"effusion": [1, 0, 1, 0], "edema": [0, 1, 0, 1]}
    out = te.make_run(tmp_path / "run", te.images(4, seed=2), labels=labels)
    assert evaluate(out, "--quiet", "--max-pairs", "0", weights=weights).exit_code == 0
    assert len(list((out / "quality").glob("score_*.png"))) == 2
    label_map = tmp_path / "map.json"
    label_map.write_text(json.dumps({"edema": None}))  # null: do not evaluate that column
    result = evaluate(out, "--quiet", "--max-pairs", "0", "--label-map", label_map, weights=weights)
    assert result.exit_code == 0, result.output
    s = summary_of(out)
    assert list(s["findings"]) == ["effusion"] and s["not_evaluated"] == ["edema"]
    assert [p.name for p in (out / "quality").glob("score_*.png")] == ["score_00_effusion.png"]
    assert s["ms_ssim_random"] is None and s["ms_ssim_random_pairs"] == 0


def test_a_run_in_a_bucket_is_evaluated_in_place_as_its_local_copy_is(tmp_path, weights, home, s3):
    labels = {"effusion": [1, 0, 1, 0], "edema": [0, 1, 0, 1]}
    out = te.make_run(tmp_path / "run", te.images(4, seed=2), labels=labels)
    url = upload_run(out, s3)
    assert evaluate(out, "--quiet", "--max-pairs", "4", weights=weights).exit_code == 0
    stale = "score_07_gone.png"  # a plot of an earlier evaluation of the bucket's run, with other labels
    s3.gate.requests.clear()
    boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1").put_object(
        Bucket=url.split("/")[2], Key=f"run/quality/{stale}", Body=b"old plot")
    result = evaluate(url, "--quiet", "--max-pairs", "4", weights=weights)
    assert result.exit_code == 0, result.output
    found = bucket_objects(s3, url)
    local = {p.relative_to(out).as_posix(): p.read_bytes() for p in (out / "quality").iterdir()}
    assert {k for k in found if k.startswith("quality/")} == set(local)  # the stale plot is gone
    pd.testing.assert_frame_equal(pd.read_parquet(f"{url}/quality/scores.parquet"),
                                  pd.read_parquet(out / "quality" / "scores.parquet"))
    remote, here = json.loads(found["quality/summary.json"]), summary_of(out)
    for key in ("n_images", "n_accepted", "findings", "ms_ssim_within_prompt", "ms_ssim_random", "n_flagged"):
        assert remote[key] == here[key], key
    assert remote["out"] == url
    # metadata.parquet and the images were only read
    assert not [p for m, p, _, _ in s3.gate.requests if m in ("PUT", "DELETE") and "/quality/" not in p]


def test_a_real_generated_run_is_evaluated_and_its_own_columns_are_not_labels(tmp_path, bundle_dir,
                                                                              text_encoder_dir, weights, home):
    manifest = tmp_path / "m.csv"
    manifest.write_text("prompt,Pleural Effusion,steps,Support Devices\nbig effusion,1,5,0\nclear lungs,0,9,1\n")
    out = tmp_path / "run"
    made = runner.invoke(app, ["generate", str(manifest), "--out", str(out), "--model", str(bundle_dir),
                               "--text-encoder", str(text_encoder_dir), "--steps", "1", "--num-images", "2",
                               "--image-format", "png", "--quiet", "--cache-dir", str(home)])
    assert made.exit_code == 0, made.output
    before = {p: p.read_bytes() for p in [out / "metadata.parquet", *out.rglob("*.png")]}
    result = evaluate(out, "--real", out / "images", "--quiet", weights=weights)
    assert result.exit_code == 0, result.output
    s = summary_of(out)
    assert s["n_images"] == 4 and s["n_real"] == 4
    assert s["findings"]["Pleural Effusion"]["n_pos"] == 2 and s["findings"]["Pleural Effusion"]["n_neg"] == 2
    # the manifest's `steps` label became `label_steps`; cxrgen's own columns (seed, steps, ...) are not labels
    assert s["not_evaluated"] == ["label_steps", "Support Devices"]
    assert s["ms_ssim_within_prompt_pairs"] == 2
    assert {p: p.read_bytes() for p in before} == before


def test_evaluating_with_the_verifiers_own_weights_says_so_and_gives_its_scores(tmp_path, bundle_dir,
                                                                                text_encoder_dir, weights, home):
    manifest = tmp_path / "m.csv"
    manifest.write_text("prompt,Pleural Effusion,Cardiomegaly\nbig effusion,1,0\nbig heart,0,1\nclear lungs,0,0\n")
    out = tmp_path / "run"
    # verified by the evaluator's own release file: every first try passes --min-score 0 and records its score
    made = runner.invoke(app, ["generate", str(manifest), "--out", str(out), "--model", str(bundle_dir),
                               "--text-encoder", str(text_encoder_dir), "--steps", "1", "--num-images", "2", "--quiet",
                               "--cache-dir", str(home), "--verify", "--min-score", "0", "--verifier-weights",
                               str(weights)])
    assert made.exit_code == 0, made.output
    assert evaluate(out, "--quiet", "--max-pairs", "0", weights=weights).exit_code == 0
    s = summary_of(out)
    assert s["verifier"]["is_evaluator"] is True and s["verifier"]["release"] == "densenet121-res224-all"
    assert "**The evaluator is the verifier.**" in (out / "quality" / "report.md").read_text()
    # the same weights score each file as the verifier did, from the same decoded pixels
    meta = pd.read_parquet(out / "metadata.parquet").merge(pd.read_parquet(out / "quality" / "scores.parquet"),
                                                          on="image_id")
    for column, pathology in (("Pleural Effusion", "Effusion"), ("Cardiomegaly", "Cardiomegaly")):
        rows = meta[meta[column] == 1]
        assert len(rows) == 2 and rows.verified.all()
        np.testing.assert_allclose(rows.verify_score, rows[f"xrv_{pathology}"], atol=1e-4)
    assert meta[(meta["Pleural Effusion"] == 0) & (meta.Cardiomegaly == 0)].verified.isna().all()
    # other weights: the report says the run was judged by another classifier, not that it is circular
    other = te.save_release(tmp_path / "other" / te.RELEASE_FILE, seed=1)
    assert evaluate(out, "--quiet", "--max-pairs", "0", weights=other).exit_code == 0
    assert summary_of(out)["verifier"]["is_evaluator"] is False
    report = (out / "quality" / "report.md").read_text()
    assert "judged by other weights" in report and "The evaluator is the verifier" not in report


# ------------------------------------------------------------------ 3. real tables, weights, extras

def test_real_table_with_paths_labels_and_an_unreadable_file(tmp_path, weights, home):
    out = te.make_run(tmp_path / "run", te.images(6, seed=4))
    folder = tmp_path / "real"
    for i, pixels in enumerate(te.images(6, seed=5)):
        te.write_image(folder / "img" / f"{i}.png", pixels)
    (folder / "img" / "2.png").write_bytes(b"broken")
    pd.DataFrame({"path": [""] + [f"img/{i}.png" for i in range(6)] + ["img/absent.png"],
                  "Effusion": [1, 1, 0, 1, 0, -1, 1, 0]}).to_csv(folder / "real.csv", index=False)
    result = evaluate(out, "--real", folder / "real.csv", "--quiet", weights=weights)
    assert result.exit_code == 0, result.output
    s = summary_of(out)
    assert (s["n_real"], s["n_real_files"], s["n_real_unreadable"]) == (5, 8, 3)
    real = s["findings_real"]["Effusion"]
    # rows 0 (blank path), 3 (broken) and 7 (absent) are skipped and -1 left out; labels stay on their rows
    assert (real["n_pos"], real["n_neg"]) == (2, 2)
    assert 0 <= real["auroc"] <= 1
    assert s["fid"] is not None and s["ms_ssim_real_pairs"] == 10


def test_weights_are_fetched_once_into_cxrgen_home_through_the_source(tmp_path, weights, home, monkeypatch,
                                                                      loopback_hub):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # conftest's: the CLI would stay offline
        monkeypatch.delenv(name)
    monkeypatch.setitem(cxrgen.pins.KNOWN_SHA256, te.RELEASE_FILE, hashlib.sha256(weights.read_bytes()).hexdigest())
    loopback_hub.add_url(te.RELEASE["weights_url"], weights)  # the hub lacks it: from the release URL
    source = loopback_hub.source()
    dest = home / "torchxrayvision" / te.RELEASE_FILE
    assert resolve_weights(None, home, source, progress=False) == dest.resolve()
    assert resolve_weights(None, home, source, progress=False) == dest.resolve()
    assert loopback_hub.transfers == [(f"urls/{te.RELEASE_FILE}", 0)]  # fetched once
    assert dest.read_bytes() == weights.read_bytes() and is_staged(evaluator_component(te.RELEASE["weights_url"], home))
    # The CLI's default source (cxrgen download's), replaced by the fake: the download lands there and is used.
    dest.unlink()
    monkeypatch.setattr(cxrgen.hub.download, "WebSource", lambda: source)
    out = te.make_run(tmp_path / "run", te.images(4, seed=2))
    result = evaluate(out, "--quiet", "--max-pairs", "0")
    assert result.exit_code == 0, result.output
    assert summary_of(out)["evaluator"]["weights"] == str(dest.resolve())
    assert len(loopback_hub.transfers) == 2


def test_default_source_downloads_through_a_temporary_name(tmp_path, weights, monkeypatch):
    # a file:// URL exercises the real download code (cxrgen.hub.sources.WebSource) without any network
    release = cxrgen.model.classifier.release_info()
    monkeypatch.setattr(cxrgen.model.classifier, "release_info", lambda: {**release, "url": weights.as_uri()})
    monkeypatch.setitem(cxrgen.pins.KNOWN_SHA256, te.RELEASE_FILE, hashlib.sha256(weights.read_bytes()).hexdigest())
    dest = resolve_weights(None, tmp_path / "home", progress=False)
    assert dest == (tmp_path / "home" / "torchxrayvision" / te.RELEASE_FILE).resolve()
    assert dest.read_bytes() == weights.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == sorted([te.RELEASE_FILE, MARKER])  # no .part left
    absent = (tmp_path / "absent.pt").as_uri()
    monkeypatch.setattr(cxrgen.model.classifier, "release_info", lambda: {**release, "url": absent, "file_name": "other.pt"})
    with pytest.raises(InputError, match="cannot download the evaluator weights"):
        resolve_weights(None, tmp_path / "home", progress=False)
    assert sorted(p.name for p in dest.parent.iterdir()) == sorted([te.RELEASE_FILE, MARKER])  # nothing half-written


class _Unreachable(WebSource):
    """The real source (a URL's listing needs no network) on a machine whose network is down."""

    def open(self, url: str, offset: int):
        raise OSError("[Errno 101] Network is unreachable")


def test_offline_without_weights_names_the_url_and_where_to_place_the_file(tmp_path, home, monkeypatch):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # a failing network here, not offline mode
        monkeypatch.delenv(name)
    monkeypatch.setattr(cxrgen.hub.download, "WebSource", _Unreachable)
    out = te.make_run(tmp_path / "run", te.images(2, seed=2))
    before = snapshot(tmp_path)
    line = assert_input_error(evaluate(out, "--quiet"), te.RELEASE["weights_url"],
                              str(home / "torchxrayvision" / te.RELEASE_FILE), "--evaluator-weights")
    assert "Network is unreachable" in line
    added = [Path(p).relative_to(home) for p in snapshot(tmp_path).keys() - before.keys()]  # only in the cache:
    assert {p.parts[0] for p in added if p.parts} <= {"torchxrayvision", ".locks"}  # its folders and the lock
    assert not any((home / "torchxrayvision").glob("*.pt*")) and not (out / "quality").exists()


@pytest.mark.parametrize("missing", ["torchxrayvision", "torchmetrics", "sklearn", "matplotlib"])
def test_missing_extra_says_which_install_command_fixes_it(tmp_path, home, weights, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import <missing>` fail
    out = te.make_run(tmp_path / "run", te.images(2, seed=2))
    assert_input_error(evaluate(out, weights=weights), 'pip install "cxrgen[evaluate]"', missing)
    assert not (out / "quality").exists()


def test_allow_listed_foreign_class_is_refused_unless_unsafe_pickle_is_asked(tmp_path, weights, home):
    model = torch.load(weights, weights_only=False)  # the test's own file
    model.extra = te.Foreign()  # a class from outside torch, torchvision and torchxrayvision
    foreign = te.save_release(tmp_path / "foreign.pt", model=model)
    out = te.make_run(tmp_path / "run", te.images(3, seed=2))
    before = snapshot(tmp_path)
    assert_input_error(evaluate(out, "--quiet", weights=foreign), "tiny_eval.Foreign", "--evaluator-unsafe-pickle")
    assert snapshot(tmp_path) == before
    # Asked explicitly, it loads as torchxrayvision loads it (the extra module has no weights, so keys match).
    result = evaluate(out, "--quiet", "--max-pairs", "0", "--evaluator-unsafe-pickle", weights=foreign)
    assert result.exit_code == 0, result.output
    assert summary_of(out)["evaluator"]["sha256"] == hashlib.sha256(foreign.read_bytes()).hexdigest()


# ------------------------------------------------------------------ 4. bad input: exit 2, one line, nothing written

def _bad_weights(kind: str, folder: Path) -> Path:
    path = folder / f"{kind}.pt"
    if kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "state_dict":
        torch.save({"conv.weight": torch.zeros(3, 3)}, path)
    elif kind == "resnet":
        import torchvision

        torch.save(torchvision.models.resnet18(weights=None), path)
    elif kind == "narrow":  # a DenseNet of another width: right classes, wrong shapes
        torch.save(te.xrv.models.DenseNet(weights=None, num_classes=18, growth_rate=16), path)
    return path


@pytest.mark.parametrize("case", ["no_run_json", "unfinished", "missing_metadata", "empty_real", "unreadable_real",
                                  "unknown_pathology", "weights_text", "weights_state_dict", "weights_resnet",
                                  "weights_narrow", "missing_weights_file", "bad_min_score", "cuda_absent"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tmp_path, weights, home):
    out = tmp_path / "run"
    args: list = ["--quiet"]
    use_weights = weights
    words: tuple = ()
    if case == "no_run_json":
        out.mkdir()
        words = ("not a cxrgen run",)
    elif case == "unfinished":
        te.make_run(out, te.images(4, seed=2), planned=6)
        words = ("4 of 6", "cxrgen resume")
    elif case == "missing_metadata":
        te.make_run(out, te.images(4, seed=2), metadata=False)
        words = ("no metadata.parquet", "cxrgen resume")
    else:
        te.make_run(out, te.images(3, seed=2))
    if case == "empty_real":
        (tmp_path / "real").mkdir()
        (tmp_path / "real" / "notes.txt").write_text("no images here")
        args += ["--real", tmp_path / "real"]
        words = ("--real", "no PNG or JPEG")
    elif case == "unreadable_real":
        (tmp_path / "real").mkdir()
        (tmp_path / "real" / "a.png").write_bytes(b"broken")
        args += ["--real", tmp_path / "real"]
        words = ("--real", "none of its 1 image files could be read")
    elif case == "unknown_pathology":
        (tmp_path / "map.json").write_text(json.dumps({"effusion": "Pleural Effusionz"}))
        args += ["--label-map", tmp_path / "map.json"]
        words = ("Pleural Effusionz", "Effusion", "--label-map")
    elif case.startswith("weights_"):
        use_weights = _bad_weights(case.removeprefix("weights_"), tmp_path)
        words = {"weights_text": ("not a torchxrayvision model file",),
                 "weights_state_dict": ("not a torchxrayvision densenet121-res224-all model",),
                 "weights_resnet": ("torchvision.models.resnet.ResNet", "--evaluator-unsafe-pickle"),
                 "weights_narrow": ("has shape",)}[case]
    elif case == "missing_weights_file":
        use_weights = tmp_path / "nowhere.pt"
        words = ("--evaluator-weights", "no such file")
    elif case == "bad_min_score":
        args += ["--min-score", "1.5"]
        words = ("--min-score",)
    elif case == "cuda_absent":
        if torch.cuda.is_available():  # on a GPU machine the refusal case is an unknown device string instead
            args += ["--device", "gpu0"]
        else:
            args += ["--device", "cuda"]
        words = ("--device",)
    before = snapshot(tmp_path)
    assert_input_error(evaluate(out, *args, weights=use_weights), *words)
    assert snapshot(tmp_path) == before  # nothing written: no evaluation/, no cache, no weights download
    assert not (out / "quality").exists()


# ------------------------------------------------------------------ 5. units: label values, map, pairs

def test_label_values_positive_negative_and_neither():
    for value in (1, 1.0, True, "1", "true", " TRUE "):
        assert label_state(value) is True, value
    for value in (0, 0.0, False, "0", "false"):
        assert label_state(value) is False, value
    for value in (-1, -1.0, None, float("nan"), "", "-1", "uncertain", 2):
        assert label_state(value) is None, value


def test_builtin_label_map_is_case_insensitive_and_treats_underscore_as_space():
    columns = ["Pleural Effusion", "pleural_effusion", "EFFUSION", "Enlarged_Cardiomediastinum", "lung opacity",
               "Lung Lesion", "cardiomegaly", "Pneumothorax", "edema", "Consolidation", "pneumonia",
               "Atelectasis", "Fracture", "No Finding", "Pleural Other", "Support Devices", "age"]
    mapped, rest = map_columns(columns, PATHOLOGIES, {})
    assert mapped["Pleural Effusion"] == mapped["pleural_effusion"] == mapped["EFFUSION"] == "Effusion"
    assert mapped["Enlarged_Cardiomediastinum"] == "Enlarged Cardiomediastinum"
    assert mapped["lung opacity"] == "Lung Opacity" and mapped["Lung Lesion"] == "Lung Lesion"
    assert rest == ["No Finding", "Pleural Other", "Support Devices", "age"]
    mapped, rest = map_columns(["age", "effusion"], PATHOLOGIES, {"age": "Fracture", "effusion": None})
    assert mapped == {"age": "Fracture"} and rest == ["effusion"]


def test_pairs_are_capped_and_stay_within_prompts():
    rng = np.random.default_rng(0)
    groups = [[0, 1, 2], [3], [4, 5, 6, 7, 8, 9, 10, 11]]
    assert len(group_pairs(groups, 1000, rng)) == 3 + 28
    capped = group_pairs(groups, 10, rng)
    assert len(capped) == len(set(capped)) == 10
    owner = {i: g for g, members in enumerate(groups) for i in members}
    assert all(owner[i] == owner[j] and i < j for i, j in capped)
    assert len(random_pairs(5, 100, rng)) == 10
    assert len(set(random_pairs(100, 50, rng))) == 50


def test_ms_ssim_values_are_torchmetrics_per_pair_and_one_for_identical_images():
    from torchmetrics.functional.image import (
        multiscale_structural_similarity_index_measure as ms_ssim,
    )

    crops = {i: te.radiograph(np.random.default_rng(i), 224) for i in range(4)}
    crops[4] = crops[0].copy()
    values = ms_ssim_values(crops, [(0, 4), (0, 1), (2, 3), (1, 9)])  # (1, 9): 9 was unreadable, so skipped
    assert len(values) == 3 and values[0] == pytest.approx(1.0, abs=1e-6) and (values[1:] < 0.99).all()
    for value, (i, j) in zip(values[1:], [(0, 1), (2, 3)]):
        a, b = (torch.from_numpy(crops[k])[None, None].float() / 255 for k in (i, j))
        assert value == pytest.approx(float(ms_ssim(a, b, data_range=1.0)), abs=1e-5)


# ------------------------------------------------------------------ 6. the benchmark still runs

def test_evaluation_benchmark_runs_and_ends_with_its_json_line(tmp_path):
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "evaluate.py"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(script), "--images", "4", "--size", "64", "--repeats", "1",
                           "--max-pairs", "3", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["images"] == 4 and report["images_per_s"] > 0 and report["image_pass_images_per_s"] > 0
    assert time.monotonic() - started < 600


def test_decoding_threads_fill_the_cores_only_when_a_gpu_runs_the_network():
    from cxrgen.evaluation.evaluate import decode_threads

    assert decode_threads(0, "cpu", 16) == 2  # the DenseNet needs the cores on the CPU
    assert decode_threads(0, "cuda:0", 16) == 15  # two threads capped a GPU near 100 images/s
    assert decode_threads(0, "cuda", 2) == 2
    assert decode_threads(5, "cuda:0", 16) == 5  # asked for
    with pytest.raises(InputError, match="--threads"):
        EvalOptions(out="x", threads=-1)
