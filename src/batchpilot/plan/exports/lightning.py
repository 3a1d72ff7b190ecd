"""``lightning.Trainer`` arguments, from a plan.

``lightning.Trainer`` keyword arguments (devices, nodes, precision, ``accumulate_grad_batches``, strategy)
plus the DataLoader ``batch_size``; tensor/pipeline parallelism refused as for ``hf``.
"""

from __future__ import annotations

from typing import Any

from batchpilot.plan.exports._common import refuse_model_parallel
from batchpilot.plan.request import Plan, PlanRequest


def lightning_trainer(plan: Plan, request: PlanRequest) -> dict[str, Any]:
    """``lightning.Trainer`` keyword arguments plus the DataLoader batch size for ``plan``."""
    refuse_model_parallel(plan, "lightning")
    t, s = plan.triad, plan.settings
    strategy_kwargs: dict[str, Any] = {}
    if s.zero_stage == 0:
        strategy = "ddp"
    elif s.engine == "fsdp2":
        strategy = "fsdp_cpu_offload" if s.offload else "fsdp"
        strategy_kwargs = {"sharding_strategy": "FULL_SHARD" if s.zero_stage == 3 else "SHARD_GRAD_OP"}
    else:
        strategy = f"deepspeed_stage_{s.zero_stage}" + ("_offload" if s.offload and s.zero_stage >= 2 else "")
    precision = {"bf16": "bf16-mixed", "fp8": "bf16-mixed", "fp16": "16-mixed", "fp32": "32-true"}[s.precision]
    world = t.data_parallel_ranks
    devices = min(world, request.cluster.devices_per_node)
    trainer = {"accelerator": "gpu", "devices": devices, "num_nodes": world // devices, "precision": precision,
               "accumulate_grad_batches": t.grad_accum_steps, "strategy": strategy}
    return {"trainer": trainer, "strategy_kwargs": strategy_kwargs,
            "dataloader": {"batch_size": t.micro_batch_sequences}}
