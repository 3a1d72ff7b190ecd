"""The README's Python API example runs (extracted from the README, executed as written), and the API's search
and decorator on injected out-of-memory failures."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import batchpilot.api as bp

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_example() -> str:
    section = README.read_text(encoding="utf-8").split("## Python API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's Python API section has no python block"
    return match.group(1)


def test_readme_python_api_example_runs(capsys) -> None:
    exec(compile(_readme_example(), str(README), "exec"), {"__name__": "readme_example"})
    first, second = capsys.readouterr().out.strip().splitlines()
    found, trials = first.split(" ", 1)
    assert int(found) >= 1 and "True" in trials  # a size that fitted, found by measurement
    assert "GPU-hours" in second and "tokens (--epochs 1" in second


def test_search_confirms_an_exact_prediction_in_two_trials(monkeypatch) -> None:
    """With an injected limit of 12 sequences and a prediction of 12: 12 fits, 13 does not, done."""
    calls = []

    def step(b: int) -> None:
        calls.append(b)
        if b > 12:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(bp, "_cuda_trial", lambda s, b, budget: bp.Outcome(fits=_runs(s, b)))
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    result = bp.find_batch_size(step, model="tiny-llama-1m", seq_len=128, budget_bytes=2**30, prediction=12)
    assert result.max_micro_batch == 12 and calls == [12, 13] and result.num_trials == 2


def _runs(step, b: int) -> bool:
    try:
        step(b)
    except RuntimeError as exc:
        assert bp.is_out_of_memory(exc)
        return False
    return True


def test_decorator_steps_down_after_an_out_of_memory_error() -> None:
    tried = []

    @bp.find_executable_batch_size(model="tiny-llama-1m", seq_len=128, budget_bytes=64 * 2**20, device="cpu",
                                   precision="fp32")
    def train(batch_size: int) -> int:
        tried.append(batch_size)
        if batch_size > 3:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return batch_size

    predicted = bp.predict_max_micro_batch("tiny-llama-1m", seq_len=128, budget_bytes=64 * 2**20, device="cpu",
                                           precision="fp32")
    assert train() == 3 and tried[0] == predicted and tried[1] == predicted - 1


def test_other_errors_are_not_swallowed() -> None:
    @bp.find_executable_batch_size(model="tiny-llama-1m", seq_len=128, budget_bytes=2**26, device="cpu")
    def train(batch_size: int) -> None:
        raise ValueError("a bug, not memory")

    with pytest.raises(ValueError, match="a bug"):
        train()
