"""RunSettings and validate_for_model: every rule is a one-line SpecError carrying the value, rule and fix."""

from __future__ import annotations

from typing import Any

import pytest

from batchpilot.errors import SpecError
from batchpilot.specs.model import load_model
from batchpilot.specs.settings import ENGINES, OPTIMIZERS, PRECISIONS, RunSettings, validate_for_model


def _one_line(excinfo: pytest.ExceptionInfo[SpecError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"precision": "fp64"}, "--precision 'fp64' is not one of: fp32, bf16, fp16, fp8"),
        ({"optimizer": "lion"}, "--optimizer 'lion' is not one of"),
        ({"engine": "jax"}, "--engine 'jax' is not one of"),
        ({"recompute": "some"}, "--recompute 'some' is not one of: none, selective, full"),
        ({"attention": "sparse"}, "--attention 'sparse' is not one of: eager, flash"),
        ({"zero_stage": 4}, "--zero 4 is not a ZeRO stage; use 0, 1, 2 or 3"),
        ({"zero_stage": True}, "--zero True is not a ZeRO stage"),
        ({"tp": 0}, "--tp 0 must be a positive integer"),
        ({"pp": -2}, "--pp -2 must be a positive integer"),
        ({"ep": 1.5}, "--ep 1.5 must be a positive integer"),
        ({"offload": True, "engine": "deepspeed"}, "--offload needs --zero 1, 2 or 3"),
    ],
)
def test_bad_values(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(SpecError) as info:
        RunSettings(**kwargs)
    assert needle in _one_line(info)


def test_every_choice_is_accepted() -> None:
    for precision in PRECISIONS:
        for engine in ENGINES:
            for optimizer in OPTIMIZERS:
                s = RunSettings(precision=precision, engine=engine, optimizer=optimizer)  # type: ignore[arg-type]
                assert s.to_dict()["engine"] == engine


def test_model_parallel_size() -> None:
    assert RunSettings(tp=4, pp=2, ep=8).model_parallel_size == 8


@pytest.mark.parametrize(
    ("preset", "kwargs", "needle"),
    [
        ("llama-3-8b", {"tp": 3}, "--tp 3 does not divide the 32 attention heads of llama-3-8b; use a divisor of 32"),
        ("qwen2.5-7b", {"tp": 14}, "--tp 14 must divide or be a multiple of the 4 key/value heads of qwen2.5-7b; "
                                   "use a divisor of 4"),
        ("llama-3-8b", {"pp": 33}, "--pp 33 exceeds the 32 layers of llama-3-8b; use --pp ≤ 32"),
        ("llama-3-8b", {"ep": 2}, "--ep 2 needs a mixture-of-experts model; llama-3-8b is dense (use --ep 1)"),
        ("mixtral-8x7b", {"ep": 3}, "--ep 3 does not divide the 8 experts of mixtral-8x7b"),
    ],
)
def test_layout_rules(preset: str, kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(SpecError) as info:
        validate_for_model(RunSettings(**kwargs), load_model(preset))
    assert needle in _one_line(info)


def test_valid_layouts_pass() -> None:
    validate_for_model(RunSettings(tp=8, pp=4, sp=True), load_model("llama-3-8b"))
    validate_for_model(RunSettings(tp=2, ep=8), load_model("mixtral-8x7b"))
    validate_for_model(RunSettings(tp=8), load_model("deepseek-v3"))
