"""Export a chosen plan to the configuration of another engine or launcher.

Examples::

    batchpilot plan --model llama-3-8b --gpu h100-sxm --gpus 64 --seq-len 8192 --global-batch-tokens 4Mi \\
        --engine deepspeed --export deepspeed --out ds_config.json
    batchpilot plan ... --export torchrun            # prints the launch command
    batchpilot plan --model llama-3-8b --gpu h100-sxm --gpus 64 --seq-len 8192 --global-batch-tokens 4Mi \\
        --export torchtitan --out job.toml            # torchtitan: --job.config_file job.toml

Formats (:data:`FORMATS`), one module each, and what each carries of the plan:

- ``deepspeed`` — a DeepSpeed config: the batch triad ``train_batch_size = train_micro_batch_size_per_gpu
  × gradient_accumulation_steps × data-parallel world size`` (DeepSpeed checks exactly this product,
  ``DeepSpeedConfig._batch_assertion``), the ZeRO stage and offload, the precision section.
  https://www.deepspeed.ai/docs/config-json/
- ``megatron`` — Megatron-LM ``pretrain_gpt.py`` arguments: parallel sizes, ``--micro-batch-size`` and
  ``--global-batch-size`` (Megatron derives the accumulation as global / (micro × dp)), recomputation,
  sequence parallelism, the distributed optimizer, precision and the model shape that rebuilds the spec's
  network (GQA groups, FFN width, SwiGLU, RMSNorm and its epsilon, RoPE base and scaling or learned positions,
  biases, untied head, exact vocabulary, MoE experts/shared experts/dense-layer pattern/DeepSeek router, MLA
  ranks): :func:`megatron_model_args`, names from Megatron-LM ``megatron/training/arguments.py``.
- ``hf`` — Hugging Face ``TrainingArguments`` keyword arguments as JSON (``per_device_train_batch_size``,
  ``gradient_accumulation_steps``, precision, gradient checkpointing; ZeRO through an inline DeepSpeed
  config or FSDP through ``fsdp_config``). The Trainer has no tensor/pipeline parallelism: such plans
  are refused.
- ``lightning`` — ``lightning.Trainer`` keyword arguments (devices, nodes, precision,
  ``accumulate_grad_batches``, strategy) plus the DataLoader ``batch_size``; tensor/pipeline
  parallelism refused as for ``hf``.
- ``torchrun`` — the launch command (``--nnodes``, ``--nproc-per-node``): ``batchpilot train`` with the
  triad (``--global-batch``, ``--micro-batch``; the runner derives the accumulation from the world size
  it checks with ``--expect-world-size``) for data-parallel plans, FSDP2 (``--fsdp``) for ZeRO-2/3;
  Megatron-LM's ``pretrain_gpt.py`` with the ``megatron`` arguments for tensor/pipeline/expert plans.
- ``torchtitan`` — a torchtitan job config (TOML, the ``--job.config_file`` of torchtitan ≤ 0.2.x; later
  releases take the same keys as ``--section.key`` flags): ``[training]`` local/global batch and sequence
  length, ``[parallelism]`` DDP/FSDP/HSDP degrees from the ZeRO stage, TP, PP (with its microbatch), EP,
  ``[activation_checkpoint]`` mode, ``[model]`` name/flavor where torchtitan ships one of the same shape
  (:func:`torchtitan_config` says how each field is derived).
"""


from __future__ import annotations

from collections.abc import Callable

from batchpilot.plan.exports import deepspeed, hf, lightning, megatron, torchrun, torchtitan
from batchpilot.plan.exports._common import ExportError, render_json, render_shell
from batchpilot.plan.request import Plan, PlanRequest

__all__ = ["FORMATS", "ExportError", "export_text"]


FORMATS: dict[str, Callable[[Plan, PlanRequest], str]] = {
    "deepspeed": lambda p, r: render_json(deepspeed.deepspeed_config(p, r)),
    "megatron": lambda p, r: render_shell(megatron.megatron_args(p, r)),
    "hf": lambda p, r: render_json(hf.hf_training_arguments(p, r)),
    "lightning": lambda p, r: render_json(lightning.lightning_trainer(p, r)),
    "torchrun": lambda p, r: render_shell(torchrun.torchrun_command(p, r)),
    "torchtitan": torchtitan.torchtitan_toml,
}
"""Export format → text renderer (JSON or TOML for configs, one shell line for argument lists)."""


def export_text(plan: Plan, request: PlanRequest, fmt: str) -> str:
    """The plan rendered in ``fmt`` (one of :data:`FORMATS`)."""
    renderer = FORMATS.get(fmt.lower())
    if renderer is None:
        raise ExportError(f"--export {fmt!r} is not a format; use one of {', '.join(FORMATS)}")
    return renderer(plan, request)
