"""Export a chosen plan to the configuration of another engine or launcher.

Examples::

    batchpilot plan --model llama-3-8b --gpu h100-sxm --gpus 64 --seq-len 8192 --global-batch-tokens 4Mi \\
        --engine deepspeed --export deepspeed --out ds_config.json
    batchpilot plan ... --export torchrun            # prints the launch command

Formats (:data:`FORMATS`) and what each carries of the plan:

- ``deepspeed`` — a DeepSpeed config: the batch triad ``train_batch_size = train_micro_batch_size_per_gpu
  × gradient_accumulation_steps × data-parallel world size`` (DeepSpeed checks exactly this product,
  ``DeepSpeedConfig._batch_assertion``), the ZeRO stage and offload, the precision section.
  https://www.deepspeed.ai/docs/config-json/
- ``megatron`` — Megatron-LM ``pretrain_gpt.py`` arguments: parallel sizes, ``--micro-batch-size`` and
  ``--global-batch-size`` (Megatron derives the accumulation as global / (micro × dp)), recomputation,
  sequence parallelism, the distributed optimizer, precision and the model shape.
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
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from collections.abc import Callable
from typing import Any

from batchpilot.errors import BatchpilotError
from batchpilot.plan.planner import Plan, PlanRequest


class ExportError(BatchpilotError):
    """The plan cannot be expressed in the requested format."""


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


def megatron_args(plan: Plan, request: PlanRequest) -> list[str]:
    """Megatron-LM ``pretrain_gpt.py`` arguments for ``plan``."""
    t, s = plan.triad, plan.settings
    model = request.model
    args = [
        "--tensor-model-parallel-size", str(s.tp), "--pipeline-model-parallel-size", str(s.pp),
        "--micro-batch-size", str(t.micro_batch_sequences), "--global-batch-size", str(t.global_batch_sequences),
        "--seq-length", str(t.seq_len_tokens),
        "--num-layers", str(model.num_layers), "--hidden-size", str(model.hidden_size),
        "--num-attention-heads", str(model.num_heads), "--max-position-embeddings", str(model.max_position_embeddings),
    ]
    if model.is_moe:
        args += ["--expert-model-parallel-size", str(s.ep), "--num-experts", str(model.num_experts),
                 "--moe-router-topk", str(model.num_experts_per_token)]
    if s.sp and s.tp > 1:
        args.append("--sequence-parallel")
    if s.zero_stage >= 1:
        args.append("--use-distributed-optimizer")
    if s.recompute == "full":
        args += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    elif s.recompute == "selective":
        args += ["--recompute-granularity", "selective"]
    args += {"bf16": ["--bf16"], "fp16": ["--fp16"], "fp8": ["--bf16", "--fp8-format", "hybrid"], "fp32": []}[
        s.precision]
    return args


def _refuse_model_parallel(plan: Plan, fmt: str) -> None:
    s = plan.settings
    if s.tp > 1 or s.pp > 1 or s.ep > 1:
        raise ExportError(
            f"--export {fmt}: the plan uses tp {s.tp}, pp {s.pp}, ep {s.ep}, which {fmt} cannot express "
            f"(data parallelism and ZeRO/FSDP only); pin --tp 1 --pp 1 --ep 1 or use --export megatron"
        )


def hf_training_arguments(plan: Plan, request: PlanRequest) -> dict[str, Any]:
    """``transformers.TrainingArguments`` keyword arguments (JSON) for ``plan``."""
    _refuse_model_parallel(plan, "hf")
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


def lightning_trainer(plan: Plan, request: PlanRequest) -> dict[str, Any]:
    """``lightning.Trainer`` keyword arguments plus the DataLoader batch size for ``plan``."""
    _refuse_model_parallel(plan, "lightning")
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


def torchrun_command(plan: Plan, request: PlanRequest) -> list[str]:
    """``torchrun`` argv for ``plan``: ``batchpilot train`` (DDP, or FSDP2 for ZeRO-2/3) when the plan is
    purely data-parallel, Megatron-LM's ``pretrain_gpt.py`` with :func:`megatron_args` otherwise."""
    t, s = plan.triad, plan.settings
    world = t.data_parallel_ranks * s.tp * s.pp
    per_node = min(world, request.cluster.devices_per_node)
    nodes = world // per_node
    cmd = ["torchrun", "--nnodes", str(nodes), "--nproc-per-node", str(per_node)]
    if nodes > 1:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", "$MASTER_ADDR:29500", "--rdzv-id", "batchpilot"]
    if s.tp > 1 or s.pp > 1 or s.ep > 1:
        return [*cmd, "pretrain_gpt.py", *megatron_args(plan, request)]
    precision = "bf16" if s.precision == "fp8" else s.precision
    cmd += ["-m", "batchpilot.cli", "train", "--model", request.model.name, "--seq-len", str(t.seq_len_tokens),
            "--global-batch", str(t.global_batch_sequences), "--micro-batch", str(t.micro_batch_sequences),
            "--precision", precision, "--expect-world-size", str(world)]
    if s.zero_stage >= 2:
        cmd.append("--fsdp")
    return cmd


def _json(value: Any) -> str:
    return json.dumps(value, indent=2) + "\n"


def _shell(argv: list[str]) -> str:
    return " ".join(a if a.startswith("$") else shlex.quote(a) for a in argv) + "\n"


FORMATS: dict[str, Callable[[Plan, PlanRequest], str]] = {
    "deepspeed": lambda p, r: _json(deepspeed_config(p, r)),
    "megatron": lambda p, r: _shell(megatron_args(p, r)),
    "hf": lambda p, r: _json(hf_training_arguments(p, r)),
    "lightning": lambda p, r: _json(lightning_trainer(p, r)),
    "torchrun": lambda p, r: _shell(torchrun_command(p, r)),
}
"""Export format → text renderer (JSON for configs, one shell line for argument lists)."""


def export_text(plan: Plan, request: PlanRequest, fmt: str) -> str:
    """The plan rendered in ``fmt`` (one of :data:`FORMATS`)."""
    renderer = FORMATS.get(fmt.lower())
    if renderer is None:
        raise ExportError(f"--export {fmt!r} is not a format; use one of {', '.join(FORMATS)}")
    return renderer(plan, request)
