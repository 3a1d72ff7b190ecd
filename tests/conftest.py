"""Shared test fixtures. Keep this file small: per-area fixtures live in each tests/<area>/conftest.py."""

from __future__ import annotations

import os

import pytest

# Tests share two cores with other work; deterministic and cheap CPU math by default.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture()
def cli_runner():
    """A typer CliRunner (stderr kept separate so one-line error messages can be checked)."""
    from typer.testing import CliRunner

    return CliRunner()
