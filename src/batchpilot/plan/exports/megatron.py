"""Megatron-LM ``pretrain_gpt.py`` arguments, from a plan.

Megatron-LM ``pretrain_gpt.py`` arguments: parallel sizes, ``--micro-batch-size`` and ``--global-batch-size``
(Megatron derives the accumulation as global / (micro × dp)), recomputation, sequence parallelism, the
distributed optimizer, precision and the model shape that rebuilds the spec's network (GQA groups, FFN width,
SwiGLU, RMSNorm and its epsilon, RoPE base and scaling or learned positions, biases, untied head, exact
vocabulary, MoE experts/shared experts/dense-layer pattern/DeepSeek router, MLA ranks):
:func:`megatron_model_args`, names from Megatron-LM ``megatron/training/arguments.py``.
"""

from __future__ import annotations

from batchpilot.plan.exports._common import Exported, ExportError, ExportOptions, render_shell, require_engine
from batchpilot.plan.request import Plan, PlanRequest
from batchpilot.specs.model import ModelSpec
from batchpilot.specs.settings import RunSettings


def megatron_args(plan: Plan, request: PlanRequest, data: str | None = None) -> list[str]:
    """Megatron-LM ``pretrain_gpt.py`` arguments for ``plan`` (refused unless Megatron-LM runs it): layout, batch,
    recomputation, optimizer and offload, precision and the model shape (:func:`megatron_model_args`).
    Tokenizer, learning-rate schedule and the data (unless given) are the user's."""
    require_engine(plan, request, "megatron", "megatron")
    t, s = plan.triad, plan.settings
    model = request.model
    args = [
        "--tensor-model-parallel-size", str(s.tp), "--pipeline-model-parallel-size", str(s.pp),
        "--micro-batch-size", str(t.micro_batch_sequences), "--global-batch-size", str(t.global_batch_sequences),
        "--seq-length", str(t.seq_len_tokens), *megatron_model_args(model, tp=s.tp),
        *_megatron_pipeline_split(model.num_layers, s.pp, s.vpp),
    ]
    if s.cp > 1:
        args += ["--context-parallel-size", str(s.cp)]
    if model.is_moe:
        args += ["--expert-model-parallel-size", str(s.ep)]
    if s.sp and s.tp > 1:
        args.append("--sequence-parallel")
    if s.zero_stage >= 1:
        args.append("--use-distributed-optimizer")
    args += _megatron_recompute(s, -(-model.num_layers // (s.pp * s.vpp)))
    if s.optimizer == "sgd-momentum":
        args += ["--optimizer", "sgd", "--sgd-momentum", "0.9"]
    if s.offload:  # arguments.py:1884-1892; the HybridDeviceOptimizer (core/optimizer/__init__.py:504-520)
        args += ["--optimizer-cpu-offload", "--use-precision-aware-optimizer", "--optimizer-offload-fraction", "1.0"]
    args += {"bf16": ["--bf16"], "fp16": ["--fp16"], "fp32": []}.get(s.precision, [])
    if s.precision == "fp8":  # fp8 matmuls over bf16 (transformer_config.py:587-611)
        args += ["--bf16", "--fp8-format", "hybrid", "--fp8-recipe", str(s.resolved_fp8_recipe)]
    if data is not None:
        args += ["--data-path", data]
    return args


def needs_single_connection(plan: Plan) -> bool:
    """Megatron-LM asserts ``CUDA_DEVICE_MAX_CONNECTIONS=1`` with tp or cp > 1 before Blackwell
    (``megatron/training/arguments.py:1453-1479``)."""
    return plan.settings.tp > 1 or plan.settings.cp > 1


def _megatron_recompute(s: RunSettings, layers_per_stage: int) -> list[str]:
    """Recomputation flags (``core/transformer/transformer_config.py:1901-1931``): full needs a method and a
    layer count; 1 layer in N is ``block`` with ⌊layers per (virtual) stage / N⌋ layers (Megatron takes the first
    ones of each stage, the plan every N-th: the same count); selective takes no count."""
    if s.recompute == "selective":
        return ["--recompute-granularity", "selective"]
    if s.recompute != "full":
        return []
    if s.recompute_every == 1:
        return ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    count = max(1, layers_per_stage // s.recompute_every)
    return ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", str(count)]


def megatron_export(plan: Plan, request: PlanRequest, options: ExportOptions) -> Exported:
    args = megatron_args(plan, request, options.data)
    notes = []
    if needs_single_connection(plan):
        notes.append("set CUDA_DEVICE_MAX_CONNECTIONS=1 in the environment (tensor or context parallelism on GPUs "
                     "before Blackwell: megatron/training/arguments.py:1453-1479); --export torchrun writes it")
    if options.data is None:
        notes.append("add --data-path (and the tokenizer arguments)")
    return Exported(text=render_shell(args), notes=tuple(notes))


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
