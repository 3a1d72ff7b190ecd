"""``batchpilot tune`` rejects bad input before any stage runs: one line on stderr, exit 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from batchpilot.cli import app
from batchpilot.errors import BatchpilotError


def test_bad_input_is_one_line(cli_runner, tmp_path: Path) -> None:
    for args, text in ((["--skip", "bogus"], "unknown stage"), (["--gpus", "8"], "give --gpu and --gpus together"),
                       (["--time-budget", "abc"], "--time-budget"), (["--memory-budget", "-1GiB"], "--memory-budget")):
        result = cli_runner.invoke(app, ["tune", "--out", str(tmp_path / "x"), *args])
        assert result.exit_code == 2, (args, result.output)
        assert text in result.stderr and len(result.stderr.strip().splitlines()) == 1


def _config(cli_runner: Any, monkeypatch: pytest.MonkeyPatch, *args: str) -> Any:
    """The ``TuneConfig`` the flags build (the pipeline is replaced by a stub that keeps it and stops)."""
    import batchpilot.tune.pipeline as pipeline

    seen: list[Any] = []

    def stub(config: Any, **_: Any) -> None:
        seen.append(config)
        raise BatchpilotError("stub pipeline")

    monkeypatch.setattr(pipeline, "run_tune", stub)
    result = cli_runner.invoke(app, ["tune", *args])
    assert result.exit_code == 2 and "stub pipeline" in result.stderr, result.output
    return seen[0]


def test_flags_reach_the_config(cli_runner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Counts and sizes take units; ``--gpu`` alone is a one-GPU target; on a CPU the precision is fp32."""
    config = _config(cli_runner, monkeypatch, "--device", "cpu", "--gpu", "h100-sxm", "--seq-len", "1Ki",
                     "--memory-budget", "512MiB", "--time-budget", "2m", "--train-tokens", "2B",
                     "--out", str(tmp_path / "t"))
    assert (config.gpu, config.gpus, config.gpus_per_node) == ("h100-sxm", 1, 8)
    assert (config.seq_len, config.memory_budget_bytes, config.time_budget_s) == (1024, 512 * 2**20, 120.0)
    assert config.train_tokens == 2_000_000_000
    assert config.settings.precision == "fp32"
    explicit = _config(cli_runner, monkeypatch, "--device", "cpu", "--precision", "BF16", "--recompute", "full",
                       "--out", str(tmp_path / "t"))
    assert (explicit.settings.precision, explicit.settings.recompute, explicit.gpu) == ("bf16", "full", None)
