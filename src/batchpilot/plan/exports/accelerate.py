"""accelerate ``config.yaml`` (``accelerate launch --config_file``), from a plan.

The launcher's view of the plan (accelerate 1.16.0, ``commands/config/config_args.py:178-232`` top-level keys,
``commands/launch.py`` nested keys): ``num_processes`` (all machines together) and ``num_machines``,
``mixed_precision``, ``distributed_type`` — ``MULTI_GPU`` (DDP), ``FSDP`` with ``fsdp_config`` (``fsdp_version``
2, ``fsdp_reshard_after_forward`` true for ZeRO-3 and false for ZeRO-2, ``fsdp_activation_checkpointing`` for
full recomputation of every block) or ``DEEPSPEED`` with ``deepspeed_config`` (``zero_stage``,
``gradient_accumulation_steps``, ``offload_optimizer_device``; ``zero3_init_flag`` for ZeRO-3), and
``dynamo_config`` for ``torch.compile``.

accelerate has no setting for the micro-batch (the DataLoader's or ``TrainingArguments``'), nor, outside its
DeepSpeed plugin, for the accumulation (``Accelerator(gradient_accumulation_steps=…)``), nor for recomputation
outside FSDP: the file's header states them, and ``--export hf`` writes them as ``TrainingArguments``.
"""

from __future__ import annotations

from typing import Any

from batchpilot.plan.exports._common import (
    Exported,
    ExportOptions,
    launch_shape,
    render_yaml,
    require_engine,
    world_size,
)
from batchpilot.plan.exports.hf import hf_optim, peft_setup
from batchpilot.plan.request import Plan, PlanRequest

MAIN_PROCESS_PORT = 29500
"""torchrun's default rendezvous port."""

MAIN_PROCESS_IP = "MAIN_NODE_IP"
"""Placeholder for the first node's address (multi-node files): replace it before launching."""


def accelerate_config(plan: Plan, request: PlanRequest) -> dict[str, Any]:
    """The ``config.yaml`` mapping for ``plan`` (refused unless the HF Trainer / accelerate runs it)."""
    require_engine(plan, request, "hf", "accelerate")
    s = plan.settings
    nodes, _per_node = launch_shape(plan, request)
    world = world_size(plan)
    distributed = {"fsdp2": "FSDP", "deepspeed": "DEEPSPEED"}.get(s.engine, "MULTI_GPU" if world > 1 else "NO")
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE", "distributed_type": distributed,
        "mixed_precision": {"bf16": "bf16", "fp16": "fp16"}.get(s.precision, "no"),
        "num_machines": nodes, "num_processes": world, "machine_rank": 0,
    }
    if nodes > 1:
        config.update(main_process_ip=MAIN_PROCESS_IP, main_process_port=MAIN_PROCESS_PORT, rdzv_backend="static",
                      same_network=True)
    config.update(use_cpu=False, main_training_function="main")
    if s.compile:
        config["dynamo_config"] = {"dynamo_backend": "INDUCTOR"}
    if s.engine == "fsdp2":
        config["fsdp_config"] = {
            "fsdp_version": 2, "fsdp_reshard_after_forward": s.zero_stage == 3,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_offload_params": False,
            "fsdp_activation_checkpointing": s.recompute == "full" and s.recompute_every == 1,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT", "fsdp_cpu_ram_efficient_loading": True,
        }
    elif s.engine == "deepspeed":
        config["deepspeed_config"] = {
            "zero_stage": s.zero_stage, "gradient_accumulation_steps": plan.triad.grad_accum_steps,
            "gradient_clipping": 1.0, "offload_optimizer_device": "cpu" if s.offload else "none",
            "offload_param_device": "none", "zero3_init_flag": s.zero_stage == 3,
            "zero3_save_16bit_model": s.zero_stage == 3,
        }
        if nodes > 1:  # torchrun on each node; the default pdsh needs a hostfile
            config["deepspeed_config"]["deepspeed_multinode_launcher"] = "standard"
    return config


def accelerate_export(plan: Plan, request: PlanRequest, options: ExportOptions) -> Exported:
    config = accelerate_config(plan, request)
    t, s = plan.triad, plan.settings
    header = [f"batchpilot plan for {request.model.name} on {world_size(plan)} GPUs: micro-batch "
              f"{t.micro_batch_sequences} x accumulation {t.grad_accum_steps} x dp {t.data_parallel_ranks} = "
              f"{t.global_batch_sequences} sequences of {request.seq_len} tokens",
              f"micro-batch {t.micro_batch_sequences}: TrainingArguments(per_device_train_batch_size=...) "
              f"(--export hf) or DataLoader(batch_size=...)"]
    if s.engine != "deepspeed":
        header.append(f"accumulation {t.grad_accum_steps}: TrainingArguments(gradient_accumulation_steps=...) or "
                      f"Accelerator(gradient_accumulation_steps=...)")
    fsdp_checkpointing = s.engine == "fsdp2" and s.recompute == "full" and s.recompute_every == 1
    if s.recompute == "full" and not fsdp_checkpointing:
        every = f", activation_checkpointing_kwargs={{'every_n_layers': {s.recompute_every}}}" if s.recompute_every > 1 else ""
        header.append(f"recompute: TrainingArguments(activation_checkpointing=True{every}) or "
                      f"model.gradient_checkpointing_enable()")
    header.append(f"optimizer: {s.optimizer} (TrainingArguments optim={hf_optim(s)!r})"
                  + (f"; data: {options.data}" if options.data else ""))
    setup = peft_setup(plan, request)
    if setup is not None:
        header.append(f"model: {setup}")
    if "main_process_ip" in config:
        header.append(f"set main_process_ip to the first node's address and machine_rank to 0..{config['num_machines'] - 1}")
    return Exported(text=render_yaml(config, header=header), notes=tuple(header[1:]))
