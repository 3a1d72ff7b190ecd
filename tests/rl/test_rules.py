"""The frameworks' batch rules, refused first in one line with the nearest valid choices."""

from __future__ import annotations

import dataclasses

import pytest

from batchpilot.rl.batch import RLBatch, RLBatchError
from batchpilot.rl.rules import RuleContext, check, violation

R1 = RLBatch(prompts_per_rollout=512, group_size=16, samples_per_update=512)


def _ctx(**kw: object) -> RuleContext:
    base = RuleContext(batch=R1, gpus=512, gpus_per_node=8, max_prompt_tokens=1024, max_response_tokens=32768)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_r1_zero_on_512_passes_and_on_480_is_refused_with_choices() -> None:
    check("verl", _ctx())
    with pytest.raises(RLBatchError) as err:
        check("verl", _ctx(gpus=480))
    message = str(err.value)
    assert "\n" not in message
    assert "samples per rollout 8192" in message and "480 GPUs" in message and "only support equal chunk" in message
    assert "--gpus 256 or 512" in message            # the divisors of 8192 that are whole nodes
    assert "--group-size 15 or 30" in message        # 512 prompts × 15 = 7680 = 16 × 480
    assert "--prompts-per-rollout 480 or 960" in message


def test_update_must_split_over_dp() -> None:
    # 8 GPUs in tensor-parallel pairs: dp 4; 512 samples per update split fine, 510 would not.
    assert violation("verl", _ctx(gpus=8, model_parallel=2)) is None
    odd = RLBatch(prompts_per_rollout=51, group_size=10, samples_per_update=170)
    message = violation("verl", _ctx(gpus=8, model_parallel=2, batch=odd))
    assert message is not None and "must divide by the 8 GPUs" in message


def test_token_budget_times_sp_must_hold_a_sequence() -> None:
    message = violation("verl", _ctx(token_budget_per_gpu=4096, sequence_parallel=8))
    assert message is not None and "4096 × sequence parallel 8 < prompt 1024 + response 32768" in message
    assert violation("verl", _ctx(token_budget_per_gpu=4224, sequence_parallel=8)) is None


def test_rollout_tp_divides_gpus_and_heads() -> None:
    assert "divide by the rollout TP 3" in (violation("verl", _ctx(rollout_tp=3)) or "")
    assert "40 attention heads" in (violation("verl", _ctx(rollout_tp=16, num_heads=40)) or "")


def test_context_beyond_the_model_refused() -> None:
    assert "max_position_embeddings 16384" in (violation("verl", _ctx(max_position_embeddings=16384)) or "")


def test_trl_generation_batch_rule() -> None:
    # GRPOConfig: generation_batch_size % (per_device × processes) == 0.
    assert violation("trl", _ctx(gpus=8, micro_batch_per_gpu=4)) is None
    message = violation("trl", _ctx(gpus=24, micro_batch_per_gpu=4))
    assert message is not None and "generation_batch_size 8192" in message and "= 96" in message


def test_grpo_needs_a_group() -> None:
    one = RLBatch(prompts_per_rollout=512, group_size=1, samples_per_update=32)
    for framework in ("verl", "trl", "openrlhf"):
        assert "at least 2" in (violation(framework, _ctx(batch=one)) or "")


def test_openrlhf_train_batch_is_micro_times_dp() -> None:
    assert violation("openrlhf", _ctx(gpus=512, micro_batch_per_gpu=1)) is None
    assert "train.batch_size 512" in (violation("openrlhf", _ctx(gpus=512, micro_batch_per_gpu=3)) or "")
