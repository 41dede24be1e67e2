"""Fixtures of the model tests: the tiny text encoder loaded once per module."""
from __future__ import annotations

import pytest

from cxrgen.model.text_encoder import load_text_encoder


@pytest.fixture(scope="module")
def text(text_encoder_dir):
    return load_text_encoder(str(text_encoder_dir), "cpu")
