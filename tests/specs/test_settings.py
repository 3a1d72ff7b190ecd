"""RunSettings and validate_for_model: every rule is a one-line SpecError carrying the value, rule and fix."""

from __future__ import annotations

from typing import Any

import pytest

from batchpilot.errors import SpecError
from batchpilot.specs.model import load_model
from batchpilot.specs.settings import (
    ENGINES,
    OPTIMIZERS,
    PRECISIONS,
    RunSettings,
    check_effective,
    validate_for_model,
)


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
        ({"recompute": "some"}, "--recompute 'some' is not one of: none, selective, op, full"),
        ({"attention": "sparse"}, "--attention 'sparse' is not one of: eager, flash"),
        ({"zero_stage": 4}, "--zero 4 is not a ZeRO stage; use 0, 1, 2 or 3"),
        ({"zero_stage": True}, "--zero True is not a ZeRO stage"),
        ({"tp": 0}, "--tp 0 must be a positive integer"),
        ({"pp": -2}, "--pp -2 must be a positive integer"),
        ({"ep": 1.5}, "--ep 1.5 must be a positive integer"),
        ({"offload": True, "engine": "deepspeed"}, "--offload needs --zero 1, 2 or 3"),
        ({"cp": 0}, "--cp 0 must be a positive integer"),
        ({"recompute_every": 0, "recompute": "full"}, "--recompute-every 0 must be a positive integer"),
        ({"fp8_recipe": "mxfp4", "precision": "fp8"}, "--fp8-recipe 'mxfp4' is not one of: tensorwise, rowwise"),
        ({"fp8_recipe": "mxfp8"}, "--fp8-recipe mxfp8 needs --precision fp8 (got bf16)"),
        ({"fp8_all_gather": True, "precision": "fp8", "engine": "fsdp2", "fp8_recipe": "rowwise"},
         "--fp8-all-gather needs --engine fsdp2 --precision fp8 with tensorwise scaling"),
        ({"reshard_after_forward": "sometimes"}, "--reshard-after-forward 'sometimes' is not one of: default"),
        ({"loss": "liger"}, "--loss 'liger' is not one of: auto, eager, compiled, parallel, fused, chunked"),
        ({"loss_chunks": 0, "loss": "chunked"}, "--loss-chunks 0 must be a positive integer"),
        ({"param_dtype": "bf16", "precision": "fp32"}, "--param-dtype bf16 (pure bf16 training) needs --precision bf16"),
        ({"param_dtype": "fp16"}, "--param-dtype 'fp16' is not one of: fp32, bf16"),
        ({"compile": True, "engine": "megatron"}, "--compile: Megatron-LM does not torch.compile its model"),
        ({"compile": "yes"}, "--compile 'yes' must be true or false"),
        ({"cp": 2, "attention": "eager"}, "--cp 2 runs ring attention over SDPA/flash kernels; use --attention flash"),
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
    assert RunSettings(tp=2, cp=4).model_parallel_size == 8  # a sequence spans cp GPUs


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"recompute_every": 2}, "--recompute-every 2 checkpoints 1 layer in 2 and needs --recompute op"),
     ({"reshard_after_forward": "never", "engine": "fsdp2", "zero_stage": 2},
      "--reshard-after-forward never applies to FSDP2 full sharding (--engine fsdp2 --zero 3); --zero 2 never"),
     ({"reshard_after_forward": "never", "engine": "deepspeed"},
      "--reshard-after-forward never is FSDP2's policy; use it with --engine fsdp2 --zero 3"),
     ({"fp8_all_gather": True, "precision": "fp8", "engine": "megatron", "fp8_recipe": "tensorwise"},
      "--fp8-all-gather needs --engine fsdp2")],
)
def test_settings_without_effect(kwargs: dict[str, Any], needle: str) -> None:
    """Allowed in RunSettings (a planner varies recomputation and ZeRO around them), refused for a user's own."""
    settings = RunSettings(**kwargs)
    with pytest.raises(SpecError) as info:
        check_effective(settings)
    assert needle in _one_line(info)
    check_effective(RunSettings(recompute="full", recompute_every=2))


def test_resolved_fp8_recipe_is_the_engines_default() -> None:
    """torchao's Float8Linear defaults to dynamic tensorwise scaling; Megatron-LM's --fp8-recipe to delayed."""
    assert RunSettings(precision="fp8", engine="fsdp2").resolved_fp8_recipe == "tensorwise"
    assert RunSettings(precision="fp8", engine="megatron").resolved_fp8_recipe == "delayed"
    assert RunSettings(precision="fp8", fp8_recipe="mxfp8").resolved_fp8_recipe == "mxfp8"
    assert RunSettings().resolved_fp8_recipe is None


@pytest.mark.parametrize(
    ("kwargs", "loss"),
    [({}, "eager"), ({"compile": True}, "compiled"), ({"engine": "megatron"}, "fused"),
     ({"engine": "fsdp2", "tp": 2}, "parallel"), ({"engine": "fsdp2", "tp": 2, "compile": True}, "parallel"),
     ({"loss": "chunked"}, "chunked")],
)
def test_resolved_loss(kwargs: dict[str, Any], loss: str) -> None:
    """``auto``: Megatron's vocab-parallel loss, torchtitan's loss_parallel under TP, compiled with --compile."""
    assert RunSettings(**kwargs).resolved_loss == loss


def test_new_settings_are_accepted_together() -> None:
    s = RunSettings(engine="fsdp2", zero_stage=3, precision="fp8", fp8_recipe="tensorwise", fp8_all_gather=True,
                    recompute="op", recompute_every=2, cp=4, compile=True, reshard_after_forward="always",
                    loss="compiled")
    assert s.to_dict()["cp"] == 4 and s.to_dict()["recompute"] == "op"
    pure = RunSettings(precision="bf16", param_dtype="bf16", loss="chunked", loss_chunks=8)
    assert pure.to_dict()["param_dtype"] == "bf16"


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
