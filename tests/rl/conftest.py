"""Shared small plans for the RL tests (planned once per session: a few seconds)."""

from __future__ import annotations

import pytest

from batchpilot.rl.batch import RLBatch
from batchpilot.rl.plan import RLPlan, RLPlanRequest, plan_rl
from batchpilot.specs.hardware import load_accelerator
from batchpilot.specs.model import load_model


@pytest.fixture(scope="session")
def qwen7b_plan() -> RLPlan:
    """Qwen2.5-7B GRPO on one node of 8 H100s: 64 prompts × 8, 4 updates per rollout."""
    req = RLPlanRequest(model=load_model("qwen2.5-7b"), gpu=load_accelerator("h100-sxm"), gpus=8,
                        batch=RLBatch(prompts_per_rollout=64, group_size=8, samples_per_update=128),
                        max_prompt_tokens=1024, max_response_tokens=4096)
    return plan_rl(req)


@pytest.fixture(scope="session")
def qwen7b_trl_plan() -> RLPlan:
    """The same run planned for TRL (its GRPOTrainer shards no model: the update is data parallel)."""
    req = RLPlanRequest(model=load_model("qwen2.5-7b"), gpu=load_accelerator("h100-sxm"), gpus=8,
                        batch=RLBatch(prompts_per_rollout=64, group_size=8, samples_per_update=128),
                        max_prompt_tokens=1024, max_response_tokens=4096, framework="trl")
    return plan_rl(req)
