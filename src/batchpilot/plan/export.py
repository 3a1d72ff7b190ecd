"""Export a chosen plan to the configuration of another engine or launcher.

Examples::

    batchpilot plan --model llama-3-8b --gpu h100-sxm --gpus 64 --seq-len 8192 --global-batch-tokens 4Mi \\
        --engine deepspeed --export deepspeed --out ds_config.json
    batchpilot plan ... --export torchrun            # prints the launch command
    batchpilot plan --model llama-3-8b --gpu h100-sxm --gpus 64 --seq-len 8192 --global-batch-tokens 4Mi \\
        --export torchtitan --out job.toml            # torchtitan: --job.config_file job.toml

Formats (:data:`FORMATS`) and what each carries of the plan:

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

import dataclasses
import json
import shlex
from collections.abc import Callable
from typing import Any

from batchpilot.errors import BatchpilotError
from batchpilot.plan.planner import Plan, PlanRequest
from batchpilot.specs.model import ModelSpec


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
    """Megatron-LM ``pretrain_gpt.py`` arguments for ``plan``: layout, batch, precision and the model shape
    (:func:`megatron_model_args`). Data, tokenizer, optimizer and schedule arguments are the user's."""
    t, s = plan.triad, plan.settings
    model = request.model
    args = [
        "--tensor-model-parallel-size", str(s.tp), "--pipeline-model-parallel-size", str(s.pp),
        "--micro-batch-size", str(t.micro_batch_sequences), "--global-batch-size", str(t.global_batch_sequences),
        "--seq-length", str(t.seq_len_tokens), *megatron_model_args(model, tp=s.tp),
        *_megatron_pipeline_split(model.num_layers, s.pp, s.vpp),
    ]
    if model.is_moe:
        args += ["--expert-model-parallel-size", str(s.ep)]
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


def _megatron_pipeline_split(layers: int, pp: int, vpp: int) -> list[str]:
    """How Megatron splits the layers over ``pp`` ranks × ``vpp`` virtual stages (``vpp`` > 1: the
    interleaved schedule). An even split is Megatron's default (``--num-virtual-stages-per-pipeline-rank``
    for ``vpp`` > 1); otherwise the ``pp·vpp`` stages get ⌊L/(pp·vpp)⌋ or ⌈L/(pp·vpp)⌉ layers (the longer
    ones last: the first stage holds the embedding) in ``--pipeline-model-parallel-layout`` ("E" embedding,
    "t" a layer, "L" the loss, stages split by "|", in virtual order: stage i runs on rank i mod pp;
    Megatron derives vpp = stages / pp). ``megatron/training/arguments.py`` allows one of the two."""
    stages_total = pp * vpp
    if stages_total == 1:
        return []
    if layers % stages_total == 0:
        return ["--num-virtual-stages-per-pipeline-rank", str(vpp)] if vpp > 1 else []
    if layers < stages_total:
        raise ExportError(f"--export megatron: {layers} layers cannot fill {pp} pipeline stages × {vpp} virtual "
                          f"stages; pin --pp/--vpp with pp × vpp ≤ {layers}")
    counts = [layers // stages_total + (1 if i >= stages_total - layers % stages_total else 0)
              for i in range(stages_total)]
    stages = ["t" * n for n in counts]
    stages[0], stages[-1] = "E" + stages[0], stages[-1] + "L"
    return ["--pipeline-model-parallel-layout", "|".join(stages)]


def megatron_model_args(model: ModelSpec, *, tp: int = 1) -> list[str]:
    """The Megatron-LM arguments that build the same network as ``model`` (same parameter count).

    Flag names and semantics are those of Megatron-LM's ``megatron/training/arguments.py`` (most model
    flags there are generated from ``megatron/core/transformer/transformer_config.py``) at commit
    d98e8a64ddf34856e74b24714e3bedb2f5a39553; vocabulary handling from
    ``megatron/training/argument_utils.py`` (``--padded-vocab-size`` is used as given, "to support loading
    third-party checkpoints"; otherwise ``--vocab-size`` is padded to a multiple of
    ``--make-vocab-size-divisible-by`` × tp). The exact vocabulary is kept whenever tp divides it.
    """
    m = model
    args = ["--num-layers", str(m.num_layers), "--hidden-size", str(m.hidden_size),
            "--num-attention-heads", str(m.num_heads), "--ffn-hidden-size", str(m.intermediate_size),
            "--max-position-embeddings", str(m.max_position_embeddings),
            "--padded-vocab-size" if m.vocab_size % tp == 0 else "--vocab-size", str(m.vocab_size)]
    if m.family != "mla" and m.head_dim_qk * m.num_heads != m.hidden_size:
        args += ["--kv-channels", str(m.head_dim_qk)]
    if m.family != "mla" and m.num_kv_heads < m.num_heads:
        args += ["--group-query-attention", "--num-query-groups", str(m.num_kv_heads)]
    if not m.tie_word_embeddings:
        args.append("--untie-embeddings-and-output-weights")
    args += _megatron_block_args(m) + _megatron_position_args(m)
    if m.family == "mla":
        args += _megatron_mla_args(m)
    if m.is_moe:
        args += _megatron_moe_args(m)
    return args


def _hf_number(model: ModelSpec, key: str) -> float | None:
    value = model.hf_config.get(key)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _megatron_block_args(m: ModelSpec) -> list[str]:
    """Norm, MLP kind and biases. Megatron has one switch for every linear bias (``--disable-bias-linear``)
    plus ``--add-qkv-bias``: GPT-2 (all biases), Llama/Mistral/Mixtral/DeepSeek (none) and Qwen2 (Q/K/V
    only) are expressible; a Llama config with O but not MLP biases (or the reverse) is not."""
    args: list[str] = []
    if m.norm_kind == "rmsnorm":
        args += ["--normalization", "RMSNorm"]
    eps = _hf_number(m, "rms_norm_eps" if m.norm_kind == "rmsnorm" else "layer_norm_epsilon")
    if eps is not None:
        args += ["--norm-epsilon", repr(float(eps))]
    if m.mlp_kind == "swiglu":
        args.append("--swiglu")
    dense_mlp_bias = m.mlp_bias and m.num_dense_layers > 0
    if m.o_bias != dense_mlp_bias:
        raise ExportError(
            f"--export megatron: {m.name} has an attention-output bias {m.o_bias} but MLP biases "
            f"{dense_mlp_bias}; Megatron-LM switches all linear biases together (--disable-bias-linear)")
    if not m.o_bias:
        args.append("--disable-bias-linear")
        if m.qkv_bias:
            args.append("--add-qkv-bias")
    return args


def _megatron_position_args(m: ModelSpec) -> list[str]:
    """Learned absolute positions (GPT-2) or RoPE with its base (``rope_theta``; Megatron's default 10000
    is also the ``transformers`` default of every supported RoPE model but Mixtral, whose presets state it)
    and scaling: Llama-3.1 scaling (``--use-rope-scaling``; Megatron fixes low/high frequency factors 1
    and 4 and an original context of 8192, as Llama 3.1 does) or DeepSeek's YaRN on MLA."""
    if m.learned_positions:
        return ["--position-embedding-type", "learned_absolute"]
    args = ["--position-embedding-type", "rope"]
    theta = _hf_number(m, "rope_theta")
    if theta is not None:
        args += ["--rotary-base", _num(theta)]
    scaling = m.hf_config.get("rope_scaling")
    if not isinstance(scaling, dict):
        return args
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3" and (scaling.get("low_freq_factor"), scaling.get("high_freq_factor"),
                             scaling.get("original_max_position_embeddings")) == (1.0, 4.0, 8192):
        return [*args, "--use-rope-scaling", "--rope-scaling-factor", _num(scaling["factor"])]
    if kind == "yarn" and m.family == "mla":  # MLA's rope_type defaults to yarn in MLATransformerConfig
        return [*args, "--rotary-scaling-factor", _num(scaling["factor"]),
                "--mscale", _num(scaling.get("mscale", 1.0)), "--mscale-all-dim", _num(scaling.get("mscale_all_dim", 0.0))]
    raise ExportError(f"--export megatron: {m.name}'s rope_scaling {scaling} has no Megatron-LM equivalent here; "
                      f"remove it from the config or add the RoPE flags by hand")


def _megatron_mla_args(m: ModelSpec) -> list[str]:
    """Multi-head latent attention (DeepSeek-V2/V3). ``--qk-layernorm`` builds MLA's two latent RMSNorms
    (``q_a_layernorm``, ``kv_a_layernorm``), as in Megatron-LM's own DeepSeek-R1 recipe
    (``examples/post_training/modelopt/conf/deepseek-ai/DeepSeek-R1.sh``)."""
    args = ["--multi-latent-attention", "--qk-layernorm", "--kv-lora-rank", str(m.kv_lora_rank),
            "--qk-head-dim", str(m.head_dim_qk - m.qk_rope_head_dim),
            "--qk-pos-emb-head-dim", str(m.qk_rope_head_dim), "--v-head-dim", str(m.head_dim_v)]
    if m.q_lora_rank:
        args += ["--q-lora-rank", str(m.q_lora_rank)]
    return args


def _megatron_moe_args(m: ModelSpec) -> list[str]:
    """Routed experts, shared experts, leading dense layers (``--moe-layer-freq`` pattern) and DeepSeek's
    router (group-limited top-k, sigmoid scores with a correction bias, scaled weights) where the config says.
    DeepSeek-V3's MTP modules are not requested: the plan's memory excludes them (``params_mtp``);
    add ``--mtp-num-layers`` by hand to train them."""
    args = ["--num-experts", str(m.num_experts), "--moe-router-topk", str(m.num_experts_per_token),
            "--moe-ffn-hidden-size", str(m.moe_intermediate_size)]
    if m.num_shared_experts:
        args += ["--moe-shared-expert-intermediate-size", str(m.moe_intermediate_size * m.num_shared_experts)]
    if m.first_k_dense:
        args += ["--moe-layer-freq", f"[0]*{m.first_k_dense}+[1]*{m.num_moe_layers}"]
    config = m.hf_config
    if m.family == "mla":
        if config.get("scoring_func") in ("softmax", "sigmoid"):
            args += ["--moe-router-score-function", config["scoring_func"]]
        if config.get("scoring_func") == "softmax" and not config.get("norm_topk_prob", False):
            args.append("--moe-router-pre-softmax")  # softmax over all experts, top-k weights not renormalised
        if config.get("topk_method") == "noaux_tc":
            args.append("--moe-router-enable-expert-bias")
        groups, group_topk = _hf_number(m, "n_group"), _hf_number(m, "topk_group")
        if groups and group_topk and groups > 1:
            args += ["--moe-router-num-groups", _num(groups), "--moe-router-group-topk", _num(group_topk)]
        scale = _hf_number(m, "routed_scaling_factor")
        if scale is not None:
            args += ["--moe-router-topk-scaling-factor", _num(scale)]
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


#: torchtitan 0.2.x model flavors (``torchtitan/models/llama3/__init__.py``, ``.../deepseek_v3/__init__.py``
#: at tag v0.2.2) by (model_type, layers, hidden, heads, kv heads, dense FFN width, vocab).
_TORCHTITAN_FLAVORS: dict[tuple[str, int, int, int, int, int, int], tuple[str, str]] = {
    ("llama", 32, 4096, 32, 8, 14336, 128256): ("llama3", "8B"),
    ("llama", 80, 8192, 64, 8, 28672, 128256): ("llama3", "70B"),
    ("llama", 126, 16384, 128, 8, 53248, 128256): ("llama3", "405B"),
    ("deepseek_v3", 61, 7168, 128, 128, 18432, 129280): ("deepseek_v3", "671B"),
}


def torchtitan_config(plan: Plan, request: PlanRequest) -> dict[str, dict[str, Any]]:
    """torchtitan job config sections for ``plan`` (``torchtitan/config/job_config.py`` at tag v0.2.2).

    - Batch: torchtitan derives accumulation = ``global_batch_size`` / (``local_batch_size`` × dp), dp =
      ``data_parallel_replicate_degree`` × ``data_parallel_shard_degree`` (``train.py``). Without
      pipelining, ``local_batch_size`` is the micro-batch. With pipelining the schedule splits
      ``local_batch_size`` into microbatches of ``pipeline_parallel_microbatch_size``, so the
      accumulation becomes pipeline microbatches: local = micro × accumulation, pipeline microbatch = micro.
    - ZeRO → FSDP2: stage 0 is DDP (``data_parallel_replicate_degree`` = dp); stages 1–3 shard over dp
      (``data_parallel_shard_degree``). FSDP has no optimizer-only sharding, so stages 1 and 2 keep
      parameters unsharded between forward and backward (``fsdp_reshard_after_forward = "never"``,
      ZeRO-2 memory, at most the plan's) and stage 3 reshards after every forward (``"always"``).
      ``hybrid_shard`` shards within a node and replicates across (HSDP). Offload moves parameters,
      gradients and optimizer states to the CPU (``enable_cpu_offload``), more than the plan offloads.
    - Experts: ``expert_parallel_degree`` = ep, ``expert_tensor_parallel_degree`` = tp (Megatron's
      default); torchtitan carves ep out of the FSDP dimension, so DDP plans with ep > 1 are refused.
    - Precision: bf16 (fp8 adds the ``quantize.linear.float8`` converter) or fp32; fp16 is refused.
    - Pipeline: 1F1B (torchtitan's default) for ``vpp`` 1; ``Interleaved1F1B`` with
      :func:`_torchtitan_interleaved_split` for ``vpp`` > 1.
    """
    t, s = plan.triad, plan.settings
    if s.precision == "fp16":
        raise ExportError("--export torchtitan: torchtitan trains in bfloat16 or float32, not fp16; "
                          "use --precision bf16")
    replicate, shard = _torchtitan_dp(plan, request)
    pipelined = s.pp > 1
    local = t.micro_batch_sequences * (t.grad_accum_steps if pipelined else 1)
    training: dict[str, Any] = {
        "local_batch_size": local, "global_batch_size": t.global_batch_sequences, "seq_len": t.seq_len_tokens,
        "mixed_precision_param": "float32" if s.precision == "fp32" else "bfloat16",
        "enable_cpu_offload": s.offload,
    }
    parallelism: dict[str, Any] = {
        "data_parallel_replicate_degree": replicate, "data_parallel_shard_degree": shard,
        "tensor_parallel_degree": s.tp, "pipeline_parallel_degree": s.pp, "context_parallel_degree": 1,
        "expert_parallel_degree": s.ep, "expert_tensor_parallel_degree": s.tp if s.ep > 1 else 1,
    }
    if shard > 1:
        parallelism["fsdp_reshard_after_forward"] = "always" if s.zero_stage == 3 else "never"
    if pipelined:
        parallelism["pipeline_parallel_microbatch_size"] = t.micro_batch_sequences
    if s.vpp > 1:
        parallelism["pipeline_parallel_schedule"] = "Interleaved1F1B"
        parallelism.update(_torchtitan_interleaved_split(request.model.num_layers, s.pp, s.vpp))
    checkpointing: dict[str, Any] = {"mode": s.recompute}
    if s.recompute == "selective":
        checkpointing["selective_ac_option"] = "op"
    return {"model": _torchtitan_model(request.model, s.precision), "training": training,
            "parallelism": parallelism, "activation_checkpoint": checkpointing}


def _torchtitan_interleaved_split(layers: int, pp: int, vpp: int) -> dict[str, int]:
    """Settings that make torchtitan cut ``pp × vpp`` virtual stages: it makes ⌈(L + w_in + w_out) /
    layers_per_stage⌉ of them, counting the embedding and the output as ``w_in``/``w_out`` layers
    (``pipeline_parallel_first/last_stage_less_layers``, default 1; v0.2.2
    ``distributed/pipeline_parallel.py``). Weights 0 first — the plan's split: ⌈L/pp⌉ layers on every
    stage, embedding and head on top — then torchtitan's default 1."""
    stages = pp * vpp
    for weight in (0, 1):
        for per_stage in range(1, layers + 2 * weight + 1):
            if -(-(layers + 2 * weight) // per_stage) == stages:
                return {"pipeline_parallel_layers_per_stage": per_stage,
                        "pipeline_parallel_first_stage_less_layers": weight,
                        "pipeline_parallel_last_stage_less_layers": weight}
    raise ExportError(f"--export torchtitan: no layers-per-stage splits {layers} layers into {pp} ranks × {vpp} "
                      f"virtual stages; pin another --vpp or --pp")


def _torchtitan_dp(plan: Plan, request: PlanRequest) -> tuple[int, int]:
    """(data_parallel_replicate_degree, data_parallel_shard_degree) for the plan's ZeRO stage."""
    dp, s = plan.triad.data_parallel_ranks, plan.settings
    if s.zero_stage == 0:
        if s.ep > 1:
            raise ExportError(f"--export torchtitan: expert parallelism (ep {s.ep}) needs FSDP in torchtitan, "
                              f"but the plan is ZeRO-0 (DDP); pin --zero 1 or higher, or --ep 1")
        return dp, 1
    if not s.hybrid_shard:
        return 1, dp
    shard = min(dp, request.cluster.devices_per_node)
    if dp % shard or shard % s.ep:
        raise ExportError(f"--export torchtitan: hybrid sharding {dp} data-parallel ranks in groups of {shard} "
                          f"(ep {s.ep}) does not divide evenly; drop --hybrid-shard")
    return dp // shard, shard


def _torchtitan_model(model: ModelSpec, precision: str) -> dict[str, Any]:
    key = (model.model_type, model.num_layers, model.hidden_size, model.num_heads, model.num_kv_heads,
           model.intermediate_size, model.vocab_size)
    name, flavor = _TORCHTITAN_FLAVORS.get(key, (model.model_type, f"batchpilot:{model.name}"))
    section: dict[str, Any] = {"name": name, "flavor": flavor}
    if precision == "fp8":
        section["converters"] = ["quantize.linear.float8"]
    return section


def torchtitan_toml(plan: Plan, request: PlanRequest) -> str:
    """:func:`torchtitan_config` as a TOML file for ``torchrun ... -m torchtitan.train --job.config_file``."""
    config = torchtitan_config(plan, request)
    t, s = plan.triad, plan.settings
    world = t.data_parallel_ranks * s.tp * s.pp
    lines = [f"# batchpilot plan for {request.model.name} on {world} GPUs: micro-batch {t.micro_batch_sequences} x "
             f"accumulation {t.grad_accum_steps} x dp {t.data_parallel_ranks} = {t.global_batch_sequences} sequences",
             "# torchtitan <= 0.2.x: --job.config_file THIS_FILE; later releases take each key as --section.key VALUE."]
    if config["model"]["flavor"].startswith("batchpilot:"):
        lines.append(f"# torchtitan ships no flavor of this shape: register {config['model']['flavor']!r} under "
                     f"torchtitan/models/<model>/ or the run stops at the unknown flavor.")
    for section, values in config.items():
        lines += ["", f"[{section}]"] + [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    """A TOML scalar or array: booleans, integers, basic strings, lists of those. JSON's string escapes
    (``\\"``, ``\\\\``, ``\\n``, ``\\uXXXX`` for control characters) are TOML's; DEL, which TOML also forbids raw,
    is escaped too. Non-ASCII stays UTF-8 (``ensure_ascii`` would write surrogate pairs, which TOML rejects)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


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
    "torchtitan": torchtitan_toml,
}
"""Export format → text renderer (JSON or TOML for configs, one shell line for argument lists)."""


def export_text(plan: Plan, request: PlanRequest, fmt: str) -> str:
    """The plan rendered in ``fmt`` (one of :data:`FORMATS`)."""
    renderer = FORMATS.get(fmt.lower())
    if renderer is None:
        raise ExportError(f"--export {fmt!r} is not a format; use one of {', '.join(FORMATS)}")
    return renderer(plan, request)
