"""Fixtures of the runs tests: the small manifest (3 rows x 2 images) that resume and journal tests share."""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers import RESUME_MANIFEST


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("manifest") / "m.csv"
    path.write_text(RESUME_MANIFEST)
    return path
