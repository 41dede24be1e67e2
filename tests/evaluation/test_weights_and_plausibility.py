"""Issue 19, item 16: `cxrgen evaluate` names the weight file it used (and its sha256) and says whether it is
torchxrayvision's published release; FID and KID that their definitions rule out for the features at hand are
withheld as "not meaningful" instead of printed as results. Random-weight evaluators (tests/tiny_eval.py)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tiny_eval as te
import torch
from typer.testing import CliRunner

import cxrgen.pins
from cxrgen.cli import app
from cxrgen.evaluation import metrics as em

runner = CliRunner()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return te.save_release(tmp_path_factory.mktemp("weights") / te.RELEASE_FILE)


def evaluate(out: Path, weights: Path, *args) -> tuple[dict, str, str]:
    """Run `cxrgen evaluate` (not quiet); the summary, report.md and what it printed."""
    result = runner.invoke(app, ["evaluate", str(out), "--evaluator-weights", str(weights), "--max-pairs", "0",
                                 *map(str, args)])
    assert result.exit_code == 0, result.output
    quality = out / "quality"
    return (json.loads((quality / "summary.json").read_text()), (quality / "report.md").read_text(encoding="utf-8"),
            result.stdout)


def test_the_weight_file_used_is_named_with_its_sha256_and_checked_against_the_release(tmp_path, weights,
                                                                                       monkeypatch):
    monkeypatch.setenv("CXRGEN_HOME", str(tmp_path / "home"))
    out = te.make_run(tmp_path / "run", te.images(3, seed=2))
    summary, report, printed = evaluate(out, weights)
    used = summary["evaluator"]
    assert (used["file_name"], used["sha256"], used["size"]) == (te.RELEASE_FILE, sha256(weights),
                                                                 weights.stat().st_size)
    # a file of the release's name but not its bytes: said plainly, with the release's own digest
    assert used["published_release"] is False and used["release_sha256"] == cxrgen.pins.KNOWN_SHA256[te.RELEASE_FILE]
    assert used["release_sha256"] in used["check"]
    assert sha256(weights) in report and "**not the published release**" in report
    assert f"`{te.RELEASE_FILE}`" in report and "not comparable" in report
    assert "NOT the published release" in printed and sha256(weights)[:16] in printed
    # the release's bytes under another name are the release (the digest decides; the name is reported)
    renamed = Path(shutil.copyfile(weights, tmp_path / "my-copy.pt"))
    monkeypatch.setitem(cxrgen.pins.KNOWN_SHA256, te.RELEASE_FILE, sha256(weights))
    summary, report, printed = evaluate(out, renamed)
    used = summary["evaluator"]
    assert used["file_name"] == "my-copy.pt" and used["published_release"] is True
    assert "**the published release**" in report and "`my-copy.pt`" in report
    assert "NOT the published" not in printed


def test_without_a_published_digest_only_a_file_of_another_name_is_known_not_to_be_the_release(tmp_path, weights,
                                                                                              monkeypatch):
    monkeypatch.setenv("CXRGEN_HOME", str(tmp_path / "home"))
    monkeypatch.delitem(cxrgen.pins.KNOWN_SHA256, te.RELEASE_FILE)
    out = te.make_run(tmp_path / "run", te.images(2, seed=2))
    assert evaluate(out, weights)[0]["evaluator"]["published_release"] is None  # the release's name: unknown
    other = Path(shutil.copyfile(weights, tmp_path / "other.pt"))
    summary, report, _ = evaluate(out, other)
    assert summary["evaluator"]["published_release"] is False and "not the release file's" in report


# ------------------------------------------------------------------ figures a definition rules out


def features(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """Non-negative features of the size and scale of DenseNet-121's features2."""
    rng = np.random.default_rng(seed)
    return np.abs(rng.normal(0.5 + shift, 0.3, (n, 1024))).astype(np.float32)


def test_real_figures_are_never_withheld_even_for_identical_sets():
    a, b = features(40, 0), features(30, 1, shift=0.4)
    figures = em.fid_kid(a, b)
    assert figures["fid"] > 1 and figures["kid_mean"] > 0
    assert em.not_meaningful(a, b, figures) == {}
    same = em.fid_kid(a, a)  # identical sets: KID's unbiased estimate is negative, as its definition allows
    assert same["kid_mean"] < 0
    assert em.not_meaningful(a, a, same) == {}


def test_figures_outside_their_definitions_range_are_withheld_with_the_reason():
    a, b = features(40, 0), features(30, 1, shift=0.4)
    figures = em.fid_kid(a, b)
    gap = float(((a.mean(0) - b.mean(0)) ** 2).sum())
    traces = float(a.astype(np.float64).var(0, ddof=1).sum() + b.astype(np.float64).var(0, ddof=1).sum())
    for fid in (-1.0, gap * 0.5 - 1e-3 * traces, (gap + traces) * 1.01, float("nan")):
        reasons = em.not_meaningful(a, b, {**figures, "fid": fid})
        assert set(reasons) == {"fid"} and "outside the range" in reasons["fid"], fid
    for kid in (-9.8e13, 1e9, float("inf")):
        reasons = em.not_meaningful(a, b, {**figures, "kid_mean": kid})
        assert set(reasons) == {"kid"} and "outside the range" in reasons["kid"], kid
    # the bounds themselves are plausible: FID at |mu_s - mu_r|^2 and at the top of its range
    assert em.not_meaningful(a, b, {**figures, "fid": gap}) == {}
    assert em.not_meaningful(a, b, {**figures, "fid": gap + traces}) == {}


def test_features_no_trained_network_gives_make_both_figures_not_meaningful(tmp_path, weights, monkeypatch):
    """The issue's case: a broken weight file gives FID 6e4 and KID -9.8e13; never printed as results."""
    monkeypatch.setenv("CXRGEN_HOME", str(tmp_path / "home"))
    model = torch.load(weights, weights_only=False)
    with torch.no_grad():
        model.features.norm5.weight.mul_(1e7)  # the last batch norm's scale: features of order 1e6
    broken = te.save_release(tmp_path / "broken" / te.RELEASE_FILE, model=model)
    real = tmp_path / "real"
    for i, pixels in enumerate(te.images(6, seed=1)):
        te.write_image(real / f"r{i}.png", pixels)
    out = te.make_run(tmp_path / "run", te.images(6, seed=3))
    summary, report, printed = evaluate(out, broken, "--real", real)
    assert summary["fid"] is None and summary["kid_mean"] is None and summary["kid_std"] is None
    withheld = summary["not_meaningful"]
    assert set(withheld) == {"fid", "kid"} and all("not a working classifier" in w["reason"] for w in withheld.values())
    assert withheld["fid"]["computed"] is not None  # kept for whoever investigates, under its own name
    assert report.count("not meaningful: ") == 2 and "FID is biased" not in report
    assert "FID:       not meaningful" in printed and "KID: not meaningful" in printed
    # the same run with the working evaluator: figures, nothing withheld
    summary, report, printed = evaluate(out, weights, "--real", real)
    assert summary["fid"] is not None and summary["not_meaningful"] == {} and "not meaningful" not in report
