"""Hugging Face ``TrainingArguments``, from a plan.

Hugging Face ``TrainingArguments`` keyword arguments as JSON (``per_device_train_batch_size``,
``gradient_accumulation_steps``, precision, gradient checkpointing; ZeRO through an inline DeepSpeed config or
FSDP through ``fsdp_config``). The Trainer has no tensor/pipeline parallelism: such plans are refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from batchpilot.plan.exports._common import refuse_model_parallel
from batchpilot.plan.exports.deepspeed import deepspeed_config
from batchpilot.plan.request import Plan, PlanRequest


def hf_training_arguments(plan: Plan, request: PlanRequest) -> dict[str, Any]:
    """``transformers.TrainingArguments`` keyword arguments (JSON) for ``plan``."""
    refuse_model_parallel(plan, "hf")
    t, s = plan.triad, plan.settings
    args: dict[str, Any] = {
        "output_dir": "output",
        "per_device_train_batch_size": t.micro_batch_sequences,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "bf16": s.precision in ("bf16", "fp8"),
        "fp16": s.precision == "fp16",
    }
    if s.engine == "fsdp2" and s.zero_stage >= 2:  # FSDP checkpoints inside its wrapper (no extra all-gather)
        args["fsdp"] = True
        args["fsdp_config"] = {"version": 2, "reshard_after_forward": s.zero_stage == 3,
                               "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "cpu_offload": s.offload,
                               "activation_checkpointing": s.recompute != "none"}
        return args
    args[_hf_checkpointing_key()] = s.recompute != "none"
    if s.zero_stage >= 1:
        args["deepspeed"] = deepspeed_config(plan, request)
    return args


def _hf_checkpointing_key() -> str:
    """``activation_checkpointing`` where the installed transformers has it (it deprecates
    ``gradient_checkpointing``), else ``gradient_checkpointing``."""
    try:
        from transformers import TrainingArguments
    except ImportError:
        return "gradient_checkpointing"
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
