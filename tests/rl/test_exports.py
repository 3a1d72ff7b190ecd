"""Exports validated by the frameworks' own code: verl's validate_config, TRL's GRPOConfig; OpenRLHF's CLI rules."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from unittest import mock

import pytest

from batchpilot.rl.batch import RLBatchError
from batchpilot.rl.exports import (
    export_text,
    openrlhf_args,
    parse_verl_overrides,
    trl_grpo_config,
    verl_overrides,
)
from batchpilot.rl.plan import RLPlan
from batchpilot.rl.rules import violation


def test_verl_names_and_units(qwen7b_plan: RLPlan) -> None:
    o = verl_overrides(qwen7b_plan)
    assert o["data.train_batch_size"] == 64                       # prompts
    assert o["actor_rollout_ref.rollout.n"] == 8
    assert o["actor_rollout_ref.actor.ppo_mini_batch_size"] == 16  # PROMPTS per update: 128 samples / 8
    assert o["trainer.n_gpus_per_node"] * o["trainer.nnodes"] == 8
    assert o["actor_rollout_ref.actor.ppo_max_token_len_per_gpu"] == qwen7b_plan.token_budget_per_gpu
    assert o["actor_rollout_ref.rollout.max_model_len"] == 1024 + 4096


def test_trl_names_and_units(qwen7b_trl_plan: RLPlan) -> None:
    c = trl_grpo_config(qwen7b_trl_plan)
    micro = qwen7b_trl_plan.train.triad.micro_batch_sequences
    assert c["per_device_train_batch_size"] * 8 * c["gradient_accumulation_steps"] == 128  # samples per update
    assert c["per_device_train_batch_size"] * 8 * c["steps_per_generation"] == 512         # samples per rollout
    assert c["steps_per_generation"] // c["gradient_accumulation_steps"] == 4               # updates per rollout
    assert c["num_generations"] == 8 and micro == c["per_device_train_batch_size"]


def test_openrlhf_names_and_its_cli_rules(qwen7b_plan: RLPlan) -> None:
    args = openrlhf_args(qwen7b_plan)
    value = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--") and not args[i + 1].startswith("--")}
    assert value["--rollout.batch_size"] == "64" and value["--rollout.n_samples_per_prompt"] == "8"
    assert value["--train.batch_size"] == "128"
    # train_ppo_ray.py L57–63: colocated actor GPUs == vllm engines × vllm TP.
    assert int(value["--vllm.num_engines"]) * int(value["--vllm.tensor_parallel_size"]) == 8
    # L711–716: sample batches ≥ actor processes.
    assert 8 * 64 // 1 >= 8
    assert violation("openrlhf", qwen7b_plan.rule_context()) is None


def test_export_refuses_what_the_framework_would(qwen7b_trl_plan: RLPlan) -> None:
    bad = dataclasses.replace(qwen7b_trl_plan, train=dataclasses.replace(
        qwen7b_trl_plan.train, triad=dataclasses.replace(qwen7b_trl_plan.train.triad, micro_batch_sequences=3)))
    with pytest.raises(RLBatchError, match="generation_batch_size 512 must divide by the global batch per_device 3"):
        export_text(bad, "trl")
    sharded = dataclasses.replace(qwen7b_trl_plan, train=dataclasses.replace(  # verl's Ulysses sp 2: not TRL's
        qwen7b_trl_plan.train, settings=dataclasses.replace(qwen7b_trl_plan.train.settings, tp=2)))
    with pytest.raises(RLBatchError, match=r"GRPOTrainer has no tensor.*sequence parallel 2.*--framework trl"):
        export_text(sharded, "trl")


def test_trl_grpo_config_accepts_the_export(qwen7b_trl_plan: RLPlan) -> None:
    trl = pytest.importorskip("trl", reason="the optional extra `rl` installs TRL")
    kwargs = trl_grpo_config(qwen7b_trl_plan)
    cpu = {**kwargs, "bf16": False, "use_cpu": True}  # this machine has no GPU; the batch fields are unchanged
    with mock.patch.object(trl.GRPOConfig, "world_size", new_callable=mock.PropertyMock, return_value=8):
        config = trl.GRPOConfig(output_dir="unused", report_to=[], **cpu)
        assert config.generation_batch_size == 512
        # TRL's own check refuses what batchpilot's rule refuses.
        with pytest.raises(ValueError, match="divisible by num_generations"):
            trl.GRPOConfig(output_dir="unused", report_to=[], **{**cpu, "num_generations": 16, "steps_per_generation": 63})


def _verl_compose(text: str) -> object:
    verl = pytest.importorskip("verl", reason="the optional extra `rl` installs verl's validator")
    from hydra import compose, initialize_config_dir

    name, overrides = parse_verl_overrides(text)
    with initialize_config_dir(config_dir=str(Path(verl.__file__).parent / "trainer" / "config"), version_base=None):
        return compose(config_name=name, overrides=overrides)


@pytest.mark.slow
def test_verl_validate_config_accepts_the_export(qwen7b_plan: RLPlan) -> None:
    pytest.importorskip("verl")
    from verl.utils.config import validate_config

    validate_config(_verl_compose(export_text(qwen7b_plan, "verl")), use_reference_policy=True, use_critic=False)


@pytest.mark.slow
def test_verl_asserts_the_rule_batchpilot_applies_first(qwen7b_plan: RLPlan) -> None:
    """R1-Zero's 8,192 samples on 480 GPUs: verl's own validate_config fails on the rule batchpilot refuses."""
    pytest.importorskip("verl")
    from verl.utils.config import validate_config

    text = export_text(qwen7b_plan, "verl")
    _, overrides = parse_verl_overrides(text)
    swap = {"data.train_batch_size": "512", "actor_rollout_ref.rollout.n": "16",
            "actor_rollout_ref.actor.ppo_mini_batch_size": "32", "trainer.nnodes": "60",
            "actor_rollout_ref.actor.use_dynamic_bsz": "False"}
    fixed = [o for o in overrides if o.split("=")[0] not in swap] + [f"{k}={v}" for k, v in swap.items()]
    fixed.append("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1")
    with pytest.raises(AssertionError, match=r"real_train_batch_size \(8192\) must be divisible .* \(480\)"):
        validate_config(_verl_compose("x " + " ".join(shlex.quote(o) for o in fixed)), use_reference_policy=True,
                        use_critic=False)
