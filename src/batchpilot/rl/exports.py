"""The plan in each RL framework's own names and units: verl Hydra overrides, TRL ``GRPOConfig`` keyword
arguments, OpenRLHF ``train_ppo_ray`` flags.

    batchpilot rl plan --like dapo --gpu h20 --gpus 128 --export verl --out dapo_verl.sh
    batchpilot rl plan … --export trl --out grpo_config.json       # GRPOConfig(**json.load(f))
    batchpilot rl plan … --export openrlhf --out openrlhf.sh

Conversions (prompts vs samples, global vs per GPU — :mod:`batchpilot.rl.batch`):

- verl 0.9.1 (``verl/trainer/config/ppo_trainer.yaml``): ``data.train_batch_size`` = prompts per rollout;
  ``actor_rollout_ref.rollout.n`` = group; ``actor.ppo_mini_batch_size`` = samples per update ÷ group
  (PROMPTS); ``actor.ppo_epochs``; dynamic batching with ``ppo_max_token_len_per_gpu`` = the plan's token
  budget and ``log_prob_max_token_len_per_gpu`` = its log-prob budget; Ulysses
  ``ulysses_sequence_parallel_size`` (FSDP) or Megatron TP/PP/EP; rollout TP, ``gpu_memory_utilization``,
  ``max_num_batched_tokens``, ``max_num_seqs``, ``max_model_len`` = prompt + response;
  ``trainer.n_gpus_per_node`` × ``trainer.nnodes`` = the GPUs. Every value the batch rules read is there,
  so :func:`verl.utils.config.validate_config` sees the plan's numbers.
- TRL 1.9.0 ``GRPOConfig``: ``per_device_train_batch_size`` = micro-batch (completions per process),
  ``gradient_accumulation_steps`` = samples per update ÷ (micro × processes), ``steps_per_generation`` =
  samples per rollout ÷ (micro × processes), ``num_generations`` = group, ``num_iterations`` = epochs,
  ``max_completion_length`` = response. TRL has no prompt-length cap in 1.9 (prompts are not truncated).
- OpenRLHF 0.11.0 (``openrlhf/cli/train_ppo_ray.py``): ``--rollout.batch_size`` = prompts per rollout,
  ``--rollout.n_samples_per_prompt`` = group, ``--train.batch_size`` = samples per update,
  ``--train.micro_batch_size``, ``--train.max_epochs`` = epochs, ``--data.max_len`` = prompt + response,
  ``--rollout.max_new_tokens`` = response, vLLM engines × TP, ``--train.colocate_all`` when colocated.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from batchpilot.errors import BatchpilotError
from batchpilot.rl.plan import RLPlan
from batchpilot.rl.rules import check

EXPORT_FORMATS: tuple[str, ...] = ("verl", "trl", "openrlhf")
VERL_FSDP_CONFIG = "ppo_trainer"
VERL_MEGATRON_CONFIG = "ppo_megatron_trainer"
"""verl's Hydra configs (``verl/trainer/config/``): FSDP actors, Megatron actors."""


class RLExportError(BatchpilotError):
    """The plan cannot be expressed in the requested framework."""


def verl_overrides(plan: RLPlan) -> dict[str, Any]:
    """verl Hydra overrides (``key=value`` for ``python -m verl.trainer.main_ppo``)."""
    r, b, t = plan.request, plan.batch, plan.train
    per_node = min(r.gpus_per_node, plan.train_gpus)
    out: dict[str, Any] = {
        "algorithm.adv_estimator": "grpo" if r.algorithm == "grpo" else "gae",
        "data.train_batch_size": b.prompts_per_rollout,
        "data.max_prompt_length": r.max_prompt_tokens,
        "data.max_response_length": r.max_response_tokens,
        "actor_rollout_ref.rollout.n": b.group_size,
        "actor_rollout_ref.actor.ppo_mini_batch_size": b.samples_per_update // b.group_size,
        "actor_rollout_ref.actor.ppo_epochs": b.epochs,
        "actor_rollout_ref.actor.use_dynamic_bsz": True,
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu": plan.token_budget_per_gpu,
        "actor_rollout_ref.actor.use_kl_loss": r.reference,
        "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz": True,
        "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu": plan.log_prob_token_budget_per_gpu,
        "actor_rollout_ref.ref.log_prob_use_dynamic_bsz": True,
        "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu": plan.log_prob_token_budget_per_gpu,
        "actor_rollout_ref.model.use_remove_padding": True,
        "actor_rollout_ref.model.enable_gradient_checkpointing": t.settings.recompute != "none",
        "actor_rollout_ref.rollout.name": "vllm",
        "actor_rollout_ref.rollout.tensor_model_parallel_size": plan.rollout.tp,
        "actor_rollout_ref.rollout.gpu_memory_utilization": plan.rollout.gpu_memory_utilization,
        "actor_rollout_ref.rollout.max_num_batched_tokens": r.max_num_batched_tokens,
        "actor_rollout_ref.rollout.max_num_seqs": plan.rollout.max_num_seqs,
        "actor_rollout_ref.rollout.max_model_len": r.max_tokens,
        "actor_rollout_ref.rollout.enable_chunked_prefill": True,
        "trainer.n_gpus_per_node": per_node,
        "trainer.nnodes": plan.train_gpus // per_node,
    }
    if r.train_engine == "fsdp":
        out["actor_rollout_ref.actor.strategy"] = "fsdp2"
        out["actor_rollout_ref.actor.ulysses_sequence_parallel_size"] = plan.sequence_parallel
        out["actor_rollout_ref.ref.ulysses_sequence_parallel_size"] = plan.sequence_parallel
        out["actor_rollout_ref.actor.fsdp_config.param_offload"] = r.offload
        out["actor_rollout_ref.actor.fsdp_config.optimizer_offload"] = r.offload
        out["actor_rollout_ref.ref.fsdp_config.param_offload"] = r.offload
    else:
        s = t.settings
        for role in ("actor", "ref"):
            out[f"actor_rollout_ref.{role}.megatron.tensor_model_parallel_size"] = s.tp
            out[f"actor_rollout_ref.{role}.megatron.pipeline_model_parallel_size"] = s.pp
            out[f"actor_rollout_ref.{role}.megatron.expert_model_parallel_size"] = s.ep
    if r.algorithm == "ppo":
        out["critic.ppo_mini_batch_size"] = b.samples_per_update // b.group_size
        out["critic.ppo_epochs"] = b.epochs
        out["critic.use_dynamic_bsz"] = True
        out["critic.ppo_max_token_len_per_gpu"] = plan.token_budget_per_gpu
    return out


def trl_grpo_config(plan: RLPlan) -> dict[str, Any]:
    """``trl.GRPOConfig`` keyword arguments (per process: ``accelerate launch`` with the plan's GPUs)."""
    r, b = plan.request, plan.batch
    micro = plan.train.triad.micro_batch_sequences
    per_step = micro * plan.train_gpus
    return {
        "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": b.samples_per_update // per_step,
        "steps_per_generation": b.samples_per_rollout // per_step,
        "num_generations": b.group_size,
        "num_iterations": b.epochs,
        "max_completion_length": r.max_response_tokens,
        "beta": 0.001 if r.reference else 0.0,
        "gradient_checkpointing": plan.train.settings.recompute != "none",
        "bf16": True,
        "use_vllm": True,
        "vllm_mode": "colocate" if r.placement == "colocated" else "server",
        "vllm_gpu_memory_utilization": plan.rollout.gpu_memory_utilization,
        "vllm_tensor_parallel_size": plan.rollout.tp,
    }


def openrlhf_args(plan: RLPlan) -> list[str]:
    """``python -m openrlhf.cli.train_ppo_ray`` flags."""
    r, b = plan.request, plan.batch
    per_node = min(r.gpus_per_node, plan.train_gpus)
    rollout_gpus = r.rollout_gpus if r.placement == "separate" and r.rollout_gpus else plan.train_gpus
    args = [
        "--actor.num_nodes", str(plan.train_gpus // per_node), "--actor.num_gpus_per_node", str(per_node),
        "--ref.num_nodes", str(plan.train_gpus // per_node), "--ref.num_gpus_per_node", str(per_node),
        "--vllm.num_engines", str(rollout_gpus // plan.rollout.tp),
        "--vllm.tensor_parallel_size", str(plan.rollout.tp),
        "--vllm.gpu_memory_utilization", str(plan.rollout.gpu_memory_utilization),
        "--rollout.batch_size", str(b.prompts_per_rollout),
        "--rollout.n_samples_per_prompt", str(b.group_size),
        "--train.batch_size", str(b.samples_per_update),
        "--train.micro_batch_size", str(plan.train.triad.micro_batch_sequences),
        "--train.max_epochs", str(b.epochs),
        "--data.max_len", str(r.max_tokens),
        "--rollout.max_new_tokens", str(r.max_response_tokens),
        "--algo.advantage.estimator", "group_norm" if r.algorithm == "grpo" else "gae",
        "--ds.zero_stage", "3",
    ]
    if r.placement == "colocated":
        args += ["--train.colocate_all", "--vllm.enable_sleep"]
    if r.reference:
        args += ["--algo.kl.use_loss"]
    return args


def export_text(plan: RLPlan, fmt: str) -> str:
    """The plan in ``fmt`` (one of :data:`EXPORT_FORMATS`), after that framework's own rules."""
    fmt = fmt.lower()
    if fmt not in EXPORT_FORMATS:
        raise RLExportError(f"--export {fmt!r} is not one of: {', '.join(EXPORT_FORMATS)}")
    ctx = plan.rule_context()
    import dataclasses

    check(fmt, dataclasses.replace(ctx, token_budget_per_gpu=ctx.token_budget_per_gpu if fmt == "verl" else None))
    if fmt == "verl":
        items = [f"{k}={_hydra(v)}" for k, v in verl_overrides(plan).items()]
        if plan.request.train_engine == "megatron":
            items.insert(0, f"--config-name={VERL_MEGATRON_CONFIG}")
        return "python3 -m verl.trainer.main_ppo \\\n    " + " \\\n    ".join(items) + "\n"
    if fmt == "trl":
        return json.dumps(trl_grpo_config(plan), indent=2) + "\n"
    return "python3 -m openrlhf.cli.train_ppo_ray " + " ".join(shlex.quote(a) for a in openrlhf_args(plan)) + "\n"


def _hydra(value: Any) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    return str(value)


def parse_verl_overrides(text: str) -> tuple[str, list[str]]:
    """The Hydra config name and the ``key=value`` overrides of a verl export (what ``compose`` takes)."""
    tokens = shlex.split(text.replace("\\\n", " "))
    name = next((t.split("=", 1)[1] for t in tokens if t.startswith("--config-name=")), VERL_FSDP_CONFIG)
    return name, [t for t in tokens if "=" in t and not t.startswith("--")]
