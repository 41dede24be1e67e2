"""Fixtures of the evaluation tests: the random-weight evaluator file and a per-test $CXRGEN_HOME."""
from __future__ import annotations

from pathlib import Path

import pytest
import tiny_eval as te


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> Path:
    """The random-weight evaluator, pickled whole like the release file."""
    return te.save_release(tmp_path_factory.mktemp("weights") / te.RELEASE_FILE)


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    """$CXRGEN_HOME of one test: read by the CLI, where weights and the real-feature cache go."""
    path = tmp_path / "home"
    monkeypatch.setenv("CXRGEN_HOME", str(path))
    return path
