"""Fixtures of the publish tests: one finished, evaluated tiny run shared by the preview and gallery tests."""
from __future__ import annotations

from pathlib import Path

import pytest
import tiny_eval as te
from helpers import run_args, write_preview_manifest
from typer.testing import CliRunner

from cxrgen.cli import app


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, bundle_dir, text_encoder_dir) -> Path:
    """A finished tiny run of 7 images in 3 prompts, evaluated by `cxrgen evaluate` (random-weight evaluator)."""
    root = tmp_path_factory.mktemp("preview_run")
    out = root / "out"
    manifest = write_preview_manifest(root / "m.csv")
    runner = CliRunner()
    result = runner.invoke(app, [str(a) for a in run_args(manifest, bundle_dir, text_encoder_dir, root, "-o", out)])
    assert result.exit_code == 0, result.output
    weights = te.save_release(root / "weights" / te.RELEASE_FILE)
    result = runner.invoke(app, ["evaluate", str(out), "--evaluator-weights", str(weights), "--max-pairs", "0",
                                 "--cache-dir", str(root / "home"), "--quiet"])
    assert result.exit_code == 0, result.output
    return out
