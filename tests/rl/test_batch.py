"""The RL batch hierarchy: levels, policy lag, refusals with the nearest valid choices."""

from __future__ import annotations

import pytest

from batchpilot.rl.batch import MicroBatching, RLBatch, RLBatchError


def test_deepseek_r1_zero_hierarchy() -> None:
    # DeepSeek-R1 (Nature 2025, Methods): 32 questions × 16 = 512 per step; a rollout of 8,192 outputs split
    # into 16 mini-batches, one inner epoch.
    b = RLBatch(prompts_per_rollout=512, group_size=16, samples_per_update=512)
    assert (b.samples_per_rollout, b.updates_per_rollout, b.prompts_per_update) == (8192, 16, 32)
    assert (b.max_policy_lag, b.mean_policy_lag) == (15, 7.5)


def test_from_updates_equals_direct() -> None:
    b = RLBatch.from_updates(prompts_per_rollout=512, group_size=16, updates_per_rollout=16)
    assert b == RLBatch(prompts_per_rollout=512, group_size=16, samples_per_update=512)


def test_epochs_multiply_updates_and_lag() -> None:
    # Two passes over 4 mini-batches: 8 updates, the last one 7 updates after generation.
    b = RLBatch(prompts_per_rollout=64, group_size=8, samples_per_update=128, epochs=2)
    assert (b.updates_per_rollout, b.max_policy_lag, b.mean_policy_lag) == (8, 7, 3.5)


def test_on_policy_when_one_update() -> None:
    b = RLBatch(prompts_per_rollout=32, group_size=16, samples_per_update=512)
    assert (b.updates_per_rollout, b.max_policy_lag) == (1, 0)


def test_uneven_updates_refused_with_nearest() -> None:
    with pytest.raises(RLBatchError) as err:
        RLBatch(prompts_per_rollout=512, group_size=16, samples_per_update=500)
    message = str(err.value)
    assert "\n" not in message and "8192" in message and "500" in message
    assert "512 (16 updates)" in message


def test_updates_that_split_prompt_groups_refused() -> None:
    with pytest.raises(RLBatchError, match="divisor of the 512 prompts"):
        RLBatch.from_updates(prompts_per_rollout=512, group_size=16, updates_per_rollout=3)


@pytest.mark.parametrize("value", [0, -1, True, 2.0])
def test_bad_counts_are_one_line(value: object) -> None:
    with pytest.raises(RLBatchError, match="positive whole number"):
        RLBatch(prompts_per_rollout=value, group_size=16, samples_per_update=512)  # type: ignore[arg-type]


def test_accumulation() -> None:
    b = RLBatch(prompts_per_rollout=512, group_size=16, samples_per_update=512)
    assert MicroBatching(dp=64, micro_batch_per_gpu=2).accumulation(b) == 4  # 512 / 64 / 2
