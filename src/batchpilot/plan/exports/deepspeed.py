"""DeepSpeed config JSON, from a plan.

A DeepSpeed config: the batch triad ``train_batch_size = train_micro_batch_size_per_gpu ×
gradient_accumulation_steps × data-parallel world size`` (DeepSpeed checks exactly this product,
``DeepSpeedConfig._batch_assertion``), the ZeRO stage and offload, the precision section.
https://www.deepspeed.ai/docs/config-json/
"""

from __future__ import annotations

from typing import Any

from batchpilot.plan.request import Plan, PlanRequest


def deepspeed_config(plan: Plan, request: PlanRequest) -> dict[str, Any]:
    """DeepSpeed config JSON for ``plan`` (the data-parallel world size is ``plan.triad.data_parallel_ranks``)."""
    t, s = plan.triad, plan.settings
    config: dict[str, Any] = {
        "train_batch_size": t.global_batch_sequences,
        "train_micro_batch_size_per_gpu": t.micro_batch_sequences,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": s.zero_stage, "overlap_comm": True, "contiguous_gradients": True},
        "steps_per_print": 100,
        "wall_clock_breakdown": False,
    }
    if s.offload:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if s.precision in ("bf16", "fp8"):  # DeepSpeed has no fp8 section: fp8 matmuls come from Transformer Engine
        config["bf16"] = {"enabled": True}
    elif s.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config
