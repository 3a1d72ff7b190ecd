"""Fixtures for the runner's tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import write_corpus


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus")
