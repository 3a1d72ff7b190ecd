"""Hugging Face ``TrainingArguments``, from a plan.

``TrainingArguments`` keyword arguments as JSON (transformers 5.25.0 ``training_args.py``):
``per_device_train_batch_size``, ``gradient_accumulation_steps``, ``bf16``/``fp16``, ``optim`` (``adamw_torch``,
``adamw_bnb_8bit``, ``sgd`` with ``optim_args`` momentum, ``adafactor``), ``activation_checkpointing`` (+
``activation_checkpointing_kwargs`` ``every_n_layers``: checkpoints layers 0, N, 2N, …, ``modeling_utils.py:3245-3248``),
``torch_compile``; ZeRO through ``deepspeed`` (:func:`~batchpilot.plan.exports.deepspeed.hf_deepspeed_config`, "auto"
where the Trainer fills the value) or FSDP2 through ``fsdp``/``fsdp_config`` (``version`` 2,
``reshard_after_forward`` true for ZeRO-3 and false for ZeRO-2, ``activation_checkpointing`` inside the wrapper:
no extra all-gather, ``training_args.py:2796-2800``). The Trainer has no tensor, pipeline or context parallelism
among its arguments: such plans are refused (:data:`batchpilot.plan.engines.HF`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from batchpilot.plan.exports._common import Exported, ExportOptions, launch_shape, render_json, require_engine
from batchpilot.plan.exports.deepspeed import hf_deepspeed_config
from batchpilot.plan.request import Plan, PlanRequest
from batchpilot.specs.finetune import HF_MODULE_NAMES
from batchpilot.specs.settings import RunSettings

HF_OPTIM: dict[str, str] = {"adamw": "adamw_torch", "adamw-8bit": "adamw_bnb_8bit", "sgd-momentum": "sgd",
                            "adafactor": "adafactor"}
"""batchpilot optimizer → ``TrainingArguments.optim`` (transformers ``training_args.py:118-129``)."""

SGD_MOMENTUM_ARGS = "momentum=0.9"
"""``optim_args`` for SGD with momentum 0.9 (``trainer_optimizer.py:317-326`` parses it; the memory model
counts one momentum buffer)."""


def hf_training_arguments(plan: Plan, request: PlanRequest) -> dict[str, Any]:
    """``transformers.TrainingArguments`` keyword arguments (JSON) for ``plan``."""
    require_engine(plan, request, "hf", "hf")
    t, s = plan.triad, plan.settings
    args: dict[str, Any] = {
        "output_dir": "output",
        "per_device_train_batch_size": t.micro_batch_sequences,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "bf16": s.precision == "bf16",
        "fp16": s.precision == "fp16",
        "optim": hf_optim(s),
    }
    if s.optimizer == "sgd-momentum":
        args["optim_args"] = SGD_MOMENTUM_ARGS
    if s.compile:
        args["torch_compile"] = True
    checkpointing, kwargs_key = _hf_checkpointing_keys()
    fsdp_checkpointing = s.engine == "fsdp2" and s.recompute == "full" and s.recompute_every == 1
    if s.engine == "fsdp2":
        args["fsdp"] = True
        args["fsdp_config"] = {"version": 2, "reshard_after_forward": s.zero_stage == 3,
                               "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                               "activation_checkpointing": fsdp_checkpointing}
    if not fsdp_checkpointing:
        args[checkpointing] = s.recompute == "full"
    if s.recompute_every > 1:
        args[kwargs_key] = {"every_n_layers": s.recompute_every}
    if s.engine == "deepspeed":
        args["deepspeed"] = hf_deepspeed_config(plan, request)
    return args


def hf_optim(s: RunSettings) -> str:
    """``TrainingArguments.optim``: paged AdamW states (bitsandbytes, QLoRA §3) where the plan pages them."""
    if s.finetune.paged:
        return "paged_adamw_8bit" if s.optimizer == "adamw-8bit" else "paged_adamw_32bit"
    return HF_OPTIM[s.optimizer]


def peft_setup(plan: Plan, request: PlanRequest) -> str | None:
    """The model-side setup a LoRA/QLoRA or frozen-layer plan relies on, in PEFT's and bitsandbytes' names (None for
    full training): ``BitsAndBytesConfig`` for QLoRA's NF4 base at ``from_pretrained``, then ``get_peft_model`` with
    the ``LoraConfig`` (``layers_to_transform`` skips the frozen layers)."""
    ft, layers = plan.settings.finetune, request.model.num_layers
    if ft.method == "full":
        return (f"freeze the embedding and the first {ft.frozen_layers} decoder layers (requires_grad_(False))"
                if ft.frozen_layers else None)
    targets = [HF_MODULE_NAMES[t] for t in ft.targets]
    lora = (f"peft.get_peft_model(model, peft.LoraConfig(r={ft.rank}, lora_alpha={ft.alpha:g}, "
            f"target_modules={targets}, lora_dropout={ft.dropout:g}"
            + (f", layers_to_transform=list(range({ft.frozen_layers}, {layers}))" if ft.frozen_layers else "") + "))")
    if ft.method == "qlora":
        quant = (f"from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, "
                 f"bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant={ft.double_quant}, "
                 f"bnb_4bit_compute_dtype=torch.bfloat16))")
        return f"{quant}, then {lora}"
    return lora


def hf_export(plan: Plan, request: PlanRequest, options: ExportOptions) -> Exported:
    args = hf_training_arguments(plan, request)
    nodes, per_node = launch_shape(plan, request)
    notes = [f"launch {nodes * per_node} processes ({nodes} node(s) × {per_node}): `--export accelerate` writes the "
             f"accelerate launch config; the Trainer checks nothing of the world size",
             f"tokenize to {request.seq_len} tokens per sequence (the data collator's max_length: not a "
             f"TrainingArguments field)" + (f"; data: {options.data}" if options.data else "")]
    setup = peft_setup(plan, request)
    if setup is not None:
        notes.append(f"model: {setup}")
    return Exported(text=render_json(args), notes=tuple(notes))


def _hf_checkpointing_keys() -> tuple[str, str]:
    """(``activation_checkpointing``, ``activation_checkpointing_kwargs``) where the installed transformers has
    them (it deprecates ``gradient_checkpointing``), else the ``gradient_checkpointing`` pair."""
    try:
        from transformers import TrainingArguments
    except ImportError:  # pragma: no cover - transformers is a dependency
        return "gradient_checkpointing", "gradient_checkpointing_kwargs"
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "activation_checkpointing" in names:
        return "activation_checkpointing", "activation_checkpointing_kwargs"
    return "gradient_checkpointing", "gradient_checkpointing_kwargs"
