"""``--recompute-every N`` beyond the model's layer count would checkpoint nothing: every command that takes it
refuses it in one line, exit 2, before anything runs or is written (tiny-llama-1m has 4 decoder layers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchpilot.cli import app

ARGS = {
    "memory": ["--gpu", "h100-sxm", "--seq-len", "64", "--micro-batch", "1"],
    "plan": ["--gpu", "h100-sxm", "--seq-len", "64", "--global-batch", "8"],
    "probe": ["--device", "cpu", "--seq-len", "64", "--memory-budget", "64MiB"],
    "train": ["--steps", "2", "--seq-len", "64"],
    "tune": ["--device", "cpu", "--seq-len", "64"],
}


@pytest.mark.parametrize("command", list(ARGS))
def test_more_than_the_layers_is_refused_before_anything_runs(cli_runner, tmp_path: Path, command: str) -> None:
    out = tmp_path / "run"
    extra = ["--out", str(out)] if command in ("train", "tune") else []
    result = cli_runner.invoke(app, [command, "--model", "tiny-llama-1m", *ARGS[command], "--recompute", "full",
                                     "--recompute-every", "5", *extra])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--recompute-every 5 exceeds the" in errors[0] and "4 layers" in errors[0]
    assert not out.exists()


def test_every_layer_count_up_to_the_model_is_accepted(cli_runner) -> None:
    result = cli_runner.invoke(app, ["memory", "--model", "tiny-llama-1m", *ARGS["memory"], "--recompute", "full",
                                     "--recompute-every", "4", "--json"])
    assert result.exit_code == 0, result.stderr
