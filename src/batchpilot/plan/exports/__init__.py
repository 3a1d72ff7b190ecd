"""Export a chosen plan to the configuration of another engine or launcher.

Examples::

    batchpilot plan --model llama-3-8b --gpu h100-sxm --gpus 64 --seq-len 8192 --global-batch-tokens 4Mi \\
        --engine deepspeed --export deepspeed --out ds_config.json
    batchpilot plan ... --export torchrun            # prints the launch command
    batchpilot plan --model llama-3-8b --gpu h100-sxm --gpus 64 --seq-len 8192 --global-batch-tokens 4Mi \\
        --export torchtitan --out job.toml            # torchtitan: --job.config_file job.toml

Formats (:data:`FORMATS`), one module each; each carries every setting the plan relies on that its engine
has a name for, and refuses (one line, with the reason) a plan its engine does not run from its own
configuration (:mod:`batchpilot.plan.engines`):

- ``deepspeed`` — standalone DeepSpeed config: batch triad, ZeRO stage and optimizer offload, precision, and
  the ``pipeline`` section (stages, recomputation interval) for 1F1B pipelines (:mod:`.deepspeed`).
- ``hf`` — Hugging Face ``TrainingArguments`` (micro-batch, accumulation, precision, optimizer, recomputation,
  compile; DeepSpeed with "auto" values or FSDP2) (:mod:`.hf`); ``hf-deepspeed`` — its DeepSpeed config alone.
- ``accelerate`` — accelerate's ``config.yaml`` (processes, machines, precision, FSDP2 or DeepSpeed plugin)
  (:mod:`.accelerate`).
- ``lightning`` — ``lightning.Trainer`` arguments, the strategy, the DataLoader batch size (:mod:`.lightning`).
- ``torchtitan`` — a torchtitan job TOML (:mod:`.torchtitan`).
- ``megatron`` — Megatron-LM ``pretrain_gpt.py`` arguments with the model shape (:mod:`.megatron`).
- ``torchrun`` — the launch line of ``batchpilot train`` or of Megatron-LM (:mod:`.torchrun`).
"""


from __future__ import annotations

from collections.abc import Callable

from batchpilot.plan.exports import accelerate, deepspeed, hf, lightning, megatron, torchrun, torchtitan
from batchpilot.plan.exports._common import Exported, ExportError, ExportOptions
from batchpilot.plan.request import Plan, PlanRequest

__all__ = ["FORMATS", "SUFFIXES", "ExportError", "ExportOptions", "Exported", "export", "export_text"]


FORMATS: dict[str, Callable[[Plan, PlanRequest, ExportOptions], Exported]] = {
    "deepspeed": deepspeed.deepspeed_export,
    "megatron": megatron.megatron_export,
    "hf": hf.hf_export,
    "hf-deepspeed": lambda p, r, o: Exported(text=deepspeed.render_json(deepspeed.hf_deepspeed_config(p, r))),
    "accelerate": accelerate.accelerate_export,
    "lightning": lightning.lightning_export,
    "torchrun": torchrun.torchrun_export,
    "torchtitan": torchtitan.torchtitan_export,
}
"""Export format → exporter: the text (JSON, YAML or TOML for configs, one shell line for argument lists) and the
notes on what no setting of the format expresses. Each exporter refuses, in one line with the reason, a plan its
engine does not run (:func:`batchpilot.plan.engines.plan_problems`)."""

SUFFIXES: dict[str, str] = {"deepspeed": "json", "megatron": "sh", "hf": "json", "hf-deepspeed": "json",
                            "accelerate": "yaml", "lightning": "json", "torchrun": "sh", "torchtitan": "toml"}
"""Export format → the file name suffix of its text (without the dot): what ``batchpilot tune`` writes under
``exports/`` and what the web page's download is named."""


def export(plan: Plan, request: PlanRequest, fmt: str, options: ExportOptions | None = None) -> Exported:
    """The plan in ``fmt`` (one of :data:`FORMATS`) with its notes."""
    exporter = FORMATS.get(fmt.lower())
    if exporter is None:
        raise ExportError(f"--export {fmt!r} is not a format; use one of {', '.join(FORMATS)}")
    return exporter(plan, request, options or ExportOptions())


def export_text(plan: Plan, request: PlanRequest, fmt: str, options: ExportOptions | None = None) -> str:
    """The plan rendered in ``fmt`` (one of :data:`FORMATS`)."""
    return export(plan, request, fmt, options).text
