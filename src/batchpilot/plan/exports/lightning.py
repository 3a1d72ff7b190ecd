"""``lightning.Trainer`` arguments, from a plan.

``lightning.Trainer`` keyword arguments (Lightning 2.6.6: ``devices``, ``num_nodes``, ``precision``
``32-true``/``bf16-mixed``/``16-mixed``, ``accumulate_grad_batches``, ``strategy``), the strategy to build when
the plan needs arguments (``strategy_class`` + ``strategy_kwargs``: ``DeepSpeedStrategy(stage,
offload_optimizer)``, ``FSDPStrategy(sharding_strategy, auto_wrap_policy, activation_checkpointing_policy)`` with
the model's block class), the DataLoader ``batch_size`` and the optimizer ``configure_optimizers`` returns.
Lightning's tensor parallelism (``ModelParallelStrategy``) is model code; recomputation is a setting only of
``FSDPStrategy``: other plans are refused (:data:`batchpilot.plan.engines.LIGHTNING`).
"""

from __future__ import annotations

from typing import Any

from batchpilot.plan.exports._common import (
    Exported,
    ExportOptions,
    decoder_layer_class,
    launch_shape,
    render_json,
    require_engine,
)
from batchpilot.plan.request import Plan, PlanRequest

LIGHTNING_PRECISION: dict[str, str] = {"bf16": "bf16-mixed", "fp16": "16-mixed", "fp32": "32-true"}
"""batchpilot precision → ``Trainer(precision=...)`` (``fabric/plugins/precision/precision.py:25-35``)."""

OPTIMIZER_CLASS: dict[str, str] = {"adamw": "torch.optim.AdamW", "adamw-8bit": "bitsandbytes.optim.AdamW8bit"}
"""What ``configure_optimizers`` returns for each optimizer Lightning plans use."""


def lightning_trainer(plan: Plan, request: PlanRequest) -> dict[str, Any]:
    """``lightning.Trainer`` keyword arguments, the strategy, the DataLoader batch size and the optimizer."""
    require_engine(plan, request, "lightning", "lightning")
    t, s = plan.triad, plan.settings
    nodes, per_node = launch_shape(plan, request)
    strategy, strategy_class, kwargs = _strategy(plan, request)
    trainer = {"accelerator": "gpu", "devices": per_node, "num_nodes": nodes,
               "precision": LIGHTNING_PRECISION[s.precision], "accumulate_grad_batches": t.grad_accum_steps,
               "strategy": strategy}
    return {"trainer": trainer, "strategy_class": strategy_class, "strategy_kwargs": kwargs,
            "dataloader": {"batch_size": t.micro_batch_sequences}, "optimizer": OPTIMIZER_CLASS[s.optimizer]}


def _strategy(plan: Plan, request: PlanRequest) -> tuple[str, str, dict[str, Any]]:
    """(registered strategy name, class to build, its keyword arguments; empty: the name alone)."""
    s = plan.settings
    if s.engine == "torch":
        return "ddp", "DDPStrategy", {}
    if s.engine == "deepspeed":
        if s.offload:  # deepspeed_stage_*_offload would also offload parameters at stage 3: build it
            return "deepspeed", "DeepSpeedStrategy", {"stage": s.zero_stage, "offload_optimizer": True}
        return f"deepspeed_stage_{s.zero_stage}", "DeepSpeedStrategy", {}
    block = decoder_layer_class(request.model)
    kwargs: dict[str, Any] = {"sharding_strategy": "FULL_SHARD" if s.zero_stage == 3 else "SHARD_GRAD_OP",
                              "auto_wrap_policy": [block]}
    if s.recompute == "full":
        kwargs["activation_checkpointing_policy"] = [block]
    return "fsdp", "FSDPStrategy", kwargs


def lightning_export(plan: Plan, request: PlanRequest, options: ExportOptions) -> Exported:
    exported = lightning_trainer(plan, request)
    notes = [f"each sequence {request.seq_len} tokens (the DataLoader's; not a Trainer setting)"
             + (f"; data: {options.data}" if options.data else "")]
    if exported["strategy_kwargs"]:
        notes.append(f"build {exported['strategy_class']}(**strategy_kwargs) and pass it as strategy (the import "
                     f"paths in auto_wrap_policy/activation_checkpointing_policy stand for the classes)")
    return Exported(text=render_json(exported), notes=tuple(notes))
