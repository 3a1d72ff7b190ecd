"""DeepSpeed config JSON, from a plan: standalone DeepSpeed (``deepspeed``) and the config the Hugging Face
Trainer fills (``hf-deepspeed``).

Standalone (:func:`deepspeed_config`): the batch triad ``train_batch_size = train_micro_batch_size_per_gpu ×
gradient_accumulation_steps × data-parallel size`` (DeepSpeed 0.19.8 ``runtime/config.py:602-605`` checks exactly
this product; the data-parallel size is the mpu's, i.e. the ``PipelineModule`` grid's with a pipeline,
``runtime/config.py:459-463``, ``deepspeed/__init__.py:581-584``), the ZeRO stage and optimizer offload, the
precision section, and with pp > 1 the ``pipeline`` section (``stages``, ``activation_checkpoint_interval`` 1
for full recomputation, ``runtime/pipe/engine.py:217-218``). DeepSpeed has no interleaved schedule, no
config-level tensor parallelism that keeps the batch product, and no recomputation switch without a
pipeline: such plans are refused (:data:`batchpilot.plan.engines.DEEPSPEED`).

Hugging Face (:func:`hf_deepspeed_config`): the same ZeRO policy with ``"auto"`` wherever the Trainer fills the
value from ``TrainingArguments`` (batch, accumulation, clipping, precision: ``integrations/deepspeed.py:138-194``
in transformers 5.25.0) or from the model (bucket sizes, ``:196-263``), so a change of world size or of
``max_grad_norm`` cannot make the Trainer refuse it.
https://www.deepspeed.ai/docs/config-json/
"""

from __future__ import annotations

from typing import Any

from batchpilot.plan.exports._common import Exported, ExportError, ExportOptions, render_json, require_engine
from batchpilot.plan.request import Plan, PlanRequest


def deepspeed_config(plan: Plan, request: PlanRequest) -> dict[str, Any]:
    """DeepSpeed config for ``plan`` (refused unless standalone DeepSpeed runs it)."""
    require_engine(plan, request, "deepspeed", "deepspeed")
    t, s = plan.triad, plan.settings
    config: dict[str, Any] = {
        "train_batch_size": t.global_batch_sequences,
        "train_micro_batch_size_per_gpu": t.micro_batch_sequences,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": 1.0,
        "zero_optimization": _zero(plan, auto=False),
        **_precision(s.precision),
        "steps_per_print": 100,
        "wall_clock_breakdown": False,
    }
    if s.pp > 1:
        config["pipeline"] = {"stages": s.pp, "activation_checkpoint_interval": 1 if s.recompute == "full" else 0}
    return config


def deepspeed_export(plan: Plan, request: PlanRequest, options: ExportOptions) -> Exported:
    config = deepspeed_config(plan, request)
    s = plan.settings
    notes = [f"launch {s.pp * plan.triad.data_parallel_ranks} ranks (deepspeed or torchrun); the micro-batch is the "
             f"DataLoader's and each sequence {request.seq_len} tokens: neither is a DeepSpeed setting"]
    if s.pp > 1:
        notes.append(f"DeepSpeed pipelines only a deepspeed.pipe.PipelineModule(layers, num_stages={s.pp}): its grid "
                     f"makes the data-parallel size {plan.triad.data_parallel_ranks} that train_batch_size counts")
    return Exported(text=render_json(config), notes=tuple(notes))


def hf_deepspeed_config(plan: Plan, request: PlanRequest) -> dict[str, Any]:
    """The DeepSpeed config for ``TrainingArguments(deepspeed=...)``: "auto" where the Trainer fills the value
    (refused unless the HF Trainer runs the plan with DeepSpeed)."""
    require_engine(plan, request, "hf", "hf-deepspeed")
    if plan.settings.engine != "deepspeed":
        raise ExportError(f"--export hf-deepspeed: the plan shards with {plan.settings.engine} (ZeRO-"
                          f"{plan.settings.zero_stage}), not DeepSpeed; use --export hf")
    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": _zero(plan, auto=True),
        "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},  # from TrainingArguments bf16/fp16
        "steps_per_print": 100,
        "wall_clock_breakdown": False,
    }


def _zero(plan: Plan, *, auto: bool) -> dict[str, Any]:
    """``zero_optimization``: the stage, optimizer offload (``offload_optimizer``; a stage-1/2 ``offload_param``
    would be ignored, ``runtime/engine.py:2731``), overlap (off under a pipeline, which turns it off,
    ``runtime/engine.py:2654-2657``) and, for the HF Trainer, the bucket sizes it derives from the model."""
    s = plan.settings
    zero: dict[str, Any] = {"stage": s.zero_stage, "contiguous_gradients": True}
    if s.pp == 1:
        zero["overlap_comm"] = True
    if s.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if auto and s.zero_stage >= 1:
        zero["reduce_bucket_size"] = "auto"
    if auto and s.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto",
                    stage3_gather_16bit_weights_on_model_save=True)
    return zero


def _precision(precision: str) -> dict[str, Any]:
    """``bf16``/``fp16`` sections (fp32: neither; DeepSpeed refuses both at once, ``runtime/config.py:511``)."""
    if precision == "bf16":
        return {"bf16": {"enabled": True}}
    if precision == "fp16":
        return {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}}
    return {}
