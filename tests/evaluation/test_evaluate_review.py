"""`cxrgen evaluate` after issue 19's independent review: malformed weight files, the quality folder as one unit,
escaped report text, files outside OUT, `cxrgen info --evaluator` without the extra, and tests that catch the bugs
planted in the review (FID/KID with an unreadable image, the MS-SSIM crop's rescale, `>=` at --min-score, the
saturated share, scores that must follow their ids).

Figures are compared with independent computations: the evaluator's own forward pass on each file, scipy's
Fréchet distance, torchmetrics' MS-SSIM on the original pixels.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiny_eval as te
import torch
from helpers import assert_input_error
from typer.testing import CliRunner

import cxrgen.evaluation.report
from cxrgen.cli import app
from cxrgen.evaluation.evaluate import ImageSet, _verdicts
from cxrgen.evaluation.metrics import adherence
from cxrgen.model.classifier import load_evaluator, prepare

runner = CliRunner()
PATHOLOGIES = [p for p in te.RELEASE["labels"] if p]


def evaluate(*args, weights=None):
    extra = ["--evaluator-weights", str(weights)] if weights else []
    return runner.invoke(app, ["evaluate", *map(str, args), *extra])


def summary_of(out: Path) -> dict:
    return json.loads((out / "quality" / "summary.json").read_text())


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in root.rglob("*")}


@pytest.fixture(scope="module")
def evaluator(weights):
    return load_evaluator(weights, "cpu")


def own_pass(evaluator, files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Features and scores of each readable file, one image per forward pass (independent of evaluate's batching)."""
    features, scores = [], []
    for path in files:
        prepared = prepare(path)
        f, s = evaluator.forward(prepared.tensor[None])
        features.append(f[0])
        scores.append(s[0])
    return np.array(features, dtype=np.float64), np.array(scores, dtype=np.float64)


# ------------------------------------------------------------------ item 6: malformed weight files, one line each

def _malformed(kind: str, folder: Path) -> Path:
    path = folder / f"{kind}.pt"
    model = te.build_model()
    if kind == "itself":  # a pickled module that contains itself: state_dict() recurses without end
        model.features.add_module("again", model)
    elif kind == "state_dict":  # its state_dict attribute is a number, not a method
        model.state_dict = 5
    elif kind == "global":  # a pickle that would call os.system when loaded unsafely
        class Evil:
            def __reduce__(self):
                import os
                return (os.system, ("true",))
        model = {"a": Evil()}
    torch.save(model, path)
    return path


@pytest.mark.parametrize("kind, words", [("itself", ("RecursionError",)), ("state_dict", ("TypeError",)),
                                         ("global", ("posix.system", "--evaluator-unsafe-pickle"))])
def test_a_malformed_weight_file_is_one_line_exit_2_and_nothing_written(kind, words, tmp_path, home):
    weights = _malformed(kind, tmp_path)
    out = te.make_run(tmp_path / "run", te.images(2, seed=2))
    before = tree(tmp_path)
    line = assert_input_error(evaluate(out, "--quiet", weights=weights), str(weights), *words)
    assert "weights_only" not in line and "Re-running" not in line  # not torch's advice, cut mid-sentence
    assert tree(tmp_path) == before


# ------------------------------------------------------------------ item 7: OUT/quality/ as one unit, plain plot text

def test_a_label_named_like_mathtext_is_plotted_as_plain_text(tmp_path, weights, home):
    name = "x $\\frac$ y"
    out = te.make_run(tmp_path / "run", te.images(4, seed=2), labels={name: [1, 0, 1, 0]})
    label_map = tmp_path / "map.json"
    label_map.write_text(json.dumps({name: "Effusion"}))
    result = evaluate(out, "--quiet", "--max-pairs", "0", "--label-map", label_map, weights=weights)
    assert result.exit_code == 0, result.output
    assert summary_of(out)["label_map"] == {name: "Effusion"}
    assert len(list((out / "quality").glob("score_*.png"))) == 1


def test_a_failed_evaluation_leaves_the_previous_quality_folder_whole(tmp_path, weights, home, monkeypatch):
    out = te.make_run(tmp_path / "run", te.images(4, seed=2), labels={"effusion": [1, 0, 1, 0]})
    assert evaluate(out, "--quiet", "--max-pairs", "0", weights=weights).exit_code == 0
    before = tree(out / "quality")

    def fails_half_way(folder, *args, **kwargs):  # scores.parquet is written, then the report fails
        assert (folder / "scores.parquet").is_file()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cxrgen.evaluation.report, "write_report", fails_half_way)
    result = evaluate(out, "--quiet", "--max-pairs", "0", "--min-score", "0.9", weights=weights)
    assert result.exit_code == 1 and "no space left" in result.stderr, result.output
    assert tree(out / "quality") == before  # the old evaluation, byte for byte: no new scores beside old plots
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # nothing half-built left
    monkeypatch.undo()
    assert evaluate(out, "--quiet", "--max-pairs", "0", "--min-score", "0.9", weights=weights).exit_code == 0
    assert summary_of(out)["min_score"] == 0.9


# ------------------------------------------------------------------ item 8: report.md escapes manifest text

def test_report_md_shows_hostile_column_names_as_text(tmp_path, weights, home):
    hostile = "<img src=x onerror=alert(1)>"
    heading = "line\n## injected"
    out = te.make_run(tmp_path / "run", te.images(4, seed=2),
                      labels={hostile: [1, 0, 1, 0], heading: [0, 1, 0, 1], "pipe|column": [1, 1, 0, 0]})
    label_map = tmp_path / "map.json"
    label_map.write_text(json.dumps({hostile: "Effusion"}))
    assert evaluate(out, "--quiet", "--max-pairs", "0", "--label-map", label_map, weights=weights).exit_code == 0
    from markdown_it import MarkdownIt

    report = (out / "quality" / "report.md").read_text()
    html = MarkdownIt("commonmark").render(report)  # as a viewer renders it, raw HTML allowed
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "injected</h" not in html and "line ## injected" in html and "pipe|column" in html
    for line in report.splitlines():
        if line.startswith("| ") and "&lt;img" in line:  # the table row keeps its 7 cells
            assert line.count(" | ") == 6


# ------------------------------------------------------------------ item 9: file_name must stay inside OUT

@pytest.mark.parametrize("name", ["../secret.png", "images/../../secret.png", "ABSOLUTE"])
def test_a_file_name_outside_the_run_is_refused_before_anything_is_read(tmp_path, weights, home, name):
    secret = te.write_image(tmp_path / "secret.png", te.images(1, seed=9)[0])
    out = te.make_run(tmp_path / "run", te.images(3, seed=2))
    table = pq.read_table(out / "metadata.parquet")
    names = table.column("file_name").to_pylist()
    names[1] = str(secret) if name == "ABSOLUTE" else name
    pq.write_table(table.set_column(1, "file_name", pa.array(names)), out / "metadata.parquet")
    before = tree(tmp_path)
    assert_input_error(evaluate(out, "--quiet", weights=weights), names[1], "relative to OUT")
    assert tree(tmp_path) == before


# ------------------------------------------------------------------ item 10: info --evaluator needs the extra too

def test_info_evaluator_exits_1_when_the_evaluate_extra_is_missing(tmp_path, weights, home, monkeypatch,
                                                                   loopback_hub):
    import hashlib

    import cxrgen.pins
    from cxrgen.model.classifier import resolve_weights

    loopback_hub.add_url(te.RELEASE["weights_url"], weights)
    # random test weights stand in for the release: they are "the release" here
    monkeypatch.setitem(cxrgen.pins.KNOWN_SHA256, te.RELEASE_FILE, hashlib.sha256(weights.read_bytes()).hexdigest())
    resolve_weights(None, home, loopback_hub.source(), progress=False)  # the weights are staged and verify
    args = ["info", "--evaluator", "--cache-dir", str(home), "--model", str(tmp_path), "--text-encoder", str(tmp_path)]
    complete = runner.invoke(app, args)
    assert complete.exit_code == 0, complete.output
    monkeypatch.setitem(sys.modules, "torchxrayvision", None)  # `import torchxrayvision` fails
    missing = runner.invoke(app, args)
    assert missing.exit_code == 1 and 'pip install "cxrgen[evaluate]"' in missing.stdout
    as_json = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert as_json["complete"] is False and "torchxrayvision" in as_json["evaluate_extra_problem"]
    # without --evaluator the extra is not required
    assert runner.invoke(app, args[:1] + args[2:]).exit_code == 0


# ------------------------------------------------------------------ planted: FID/KID with an unreadable synthetic image

def test_fid_and_kid_leave_out_an_unreadable_synthetic_image(tmp_path, weights, home, evaluator):
    pixels = te.images(10, seed=11, brighten=30)
    pixels[3] = b"not an image"
    out = te.make_run(tmp_path / "run", pixels)
    real = tmp_path / "real"
    for i, image in enumerate(te.images(10, seed=12)):
        te.write_image(real / f"r{i}.png", image)
    result = evaluate(out, "--real", real, "--quiet", "--max-pairs", "0", weights=weights)
    assert result.exit_code == 0, result.output
    s = summary_of(out)
    assert s["n_flagged"]["unreadable"] == 1 and np.isfinite(s["fid"]) and np.isfinite(s["kid_mean"])
    readable = [out / f"images/00000/img{i:03d}_0000.png" for i in range(10) if i != 3]
    fake, _ = own_pass(evaluator, readable)
    reference, _ = own_pass(evaluator, sorted(real.glob("*.png")))
    assert s["fid"] == pytest.approx(te.frechet(fake, reference), rel=1e-3)
    assert s["kid_subset_size"] == 9
    assert s["fid_biased"] is True


# ------------------------------------------------------------------ planted: the MS-SSIM crop keeps its 8-bit scale

def test_the_ms_ssim_crop_is_the_8_bit_image(tmp_path):
    # a 224 x 224 image is its own centre crop at the classifier's size: the kept crop must be its pixels,
    # mapped back from [-1024, 1024] to [0, 255], not the network's input values clipped to [0, 255]
    pixels = te.images(1, seed=3, size=224)[0]
    prepared = prepare(te.write_image(tmp_path / "a.png", pixels), keep_small=True)
    assert prepared.small.dtype == np.uint8 and prepared.small.shape == (224, 224)
    assert np.abs(prepared.small.astype(int) - pixels.astype(int)).max() <= 1
    assert float(prepared.tensor.min()) < -500  # the network's input itself is on torchxrayvision's scale


def test_ms_ssim_within_prompt_equals_torchmetrics_on_the_original_pixels(tmp_path, weights, home):
    from torchmetrics.functional.image import (
        multiscale_structural_similarity_index_measure as ms_ssim,
    )

    a = te.images(1, seed=4, size=224)[0]
    b = np.clip(a.astype(int) + np.random.default_rng(5).integers(-6, 7, a.shape), 0, 255).astype(np.uint8)
    out = te.make_run(tmp_path / "run", [a, b], prompts=["same prompt", "same prompt"])
    assert evaluate(out, "--quiet", weights=weights).exit_code == 0
    expected = float(ms_ssim(torch.from_numpy(a)[None, None].float() / 255, torch.from_numpy(b)[None, None].float()
                             / 255, data_range=1.0))
    assert 0.5 < expected < 0.999
    assert summary_of(out)["ms_ssim_within_prompt"] == pytest.approx(expected, abs=2e-3)


# ------------------------------------------------------------------ planted: a positive at exactly --min-score agrees

def test_a_positive_scored_exactly_at_the_threshold_agrees():
    states = [True, True, True, False]
    scores = np.array([0.5, 0.5000001, 0.4999999, 0.9])
    assert adherence(states, scores, 0.5)["agreement"] == pytest.approx(2 / 3)
    images = ImageSet(features=np.zeros((4, 1)), scores=scores[:, None], flags=[[], [], [], []])
    flags = _verdicts(images, {"c": states}, {"c": "Effusion"}, {"Effusion": 0}, 0.5)
    assert flags == [[], [], ["label_missing"], []]


def test_an_evaluation_whose_min_score_equals_a_stored_score(tmp_path, weights, home):
    labels = {"effusion": [1, 1, 1, 1, 0, 0]}
    out = te.make_run(tmp_path / "run", te.images(6, seed=6), labels=labels)
    assert evaluate(out, "--quiet", "--max-pairs", "0", weights=weights).exit_code == 0
    scores = pd.read_parquet(out / "quality" / "scores.parquet")["xrv_Effusion"].to_numpy()
    threshold = float(np.sort(scores[:4])[1])  # the second lowest positive: exactly at the threshold
    assert evaluate(out, "--quiet", "--max-pairs", "0", "--min-score", repr(threshold), weights=weights).exit_code == 0
    flags = pd.read_parquet(out / "quality" / "scores.parquet")["flags"].tolist()
    at = int(np.flatnonzero(scores == threshold)[0])
    assert "label_missing" not in flags[at]
    assert summary_of(out)["findings"]["effusion"]["agreement"] == pytest.approx(0.75)


# ------------------------------------------------------------------ planted: the saturated share

@pytest.mark.parametrize("black, saturated", [(0.10, False), (0.45, False), (0.60, True)])
def test_saturated_means_most_pixels_at_0_or_255(black, saturated, tmp_path):
    rng = np.random.default_rng(7)
    pixels = rng.integers(40, 200, (100, 100)).astype(np.uint8)  # mid-gray texture: never blank
    pixels.flat[rng.permutation(pixels.size)[:int(black * pixels.size)]] = 0
    flags = prepare(te.write_image(tmp_path / "x.png", pixels)).flags
    assert ("saturated" in flags) is saturated and "blank" not in flags


# ------------------------------------------------------------------ planted: scores follow their ids

def test_scores_rows_follow_their_image_ids_when_the_ids_are_not_sorted(tmp_path, weights, home, evaluator):
    ids = ["zeta_0000", "alpha_0000", "mu_0000", "beta_0000", "omega_0000"]
    out = te.make_run(tmp_path / "run", te.images(5, seed=8), ids=ids)
    assert evaluate(out, "--quiet", "--max-pairs", "0", "--batch-size", "2", weights=weights).exit_code == 0
    scores = pd.read_parquet(out / "quality" / "scores.parquet")
    assert scores["image_id"].tolist() == ids  # metadata order, not sorted
    meta = pd.read_parquet(out / "metadata.parquet").set_index("image_id")
    _, expected = own_pass(evaluator, [out / meta.loc[i, "file_name"] for i in scores["image_id"]])
    columns = [f"xrv_{p.replace(' ', '_')}" for p in PATHOLOGIES]
    np.testing.assert_allclose(scores[columns].to_numpy(), expected, rtol=1e-4, atol=1e-5)
