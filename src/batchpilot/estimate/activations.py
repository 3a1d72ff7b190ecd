"""Activations per transformer layer: every tensor a block saves for backward, named, in bytes per token
per GPU, under each recomputation policy; the working set of one layer's backward; the output layer's
logits and loss buffers by loss path.

    >>> from batchpilot.specs.model import load_model
    >>> from batchpilot.specs.settings import RunSettings
    >>> terms = activation_terms(load_model("gpt2"), RunSettings(precision="bf16", engine="megatron",
    ...                          recompute="full"), seq_len=1024)
    >>> terms   # Korthikanti et al. 2022 Table 2, full recompute: 2·s·b·h bytes = 2·h per token
    {'layer_input': 1536.0}

For a GPT-2 block with dropout in 16-bit this is exactly Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models"), Table 2: ``s·b·h·(34 + 5·a·s/h)`` without parallelism,
``s·b·h·(10 + 24/t + 5·a·s/(h·t))`` with tensor parallelism, ``/t`` everywhere with sequence parallelism,
``34·s·b·h/t`` with selective recomputation and ``2·s·b·h`` with full recomputation (plus their 8-byte
LayerNorm statistics per token, which the paper ignores: < 0.01 %). Llama/MoE/MLA blocks are derived the
same way from each engine's block code (:class:`BlockStyle`):

- ``torch`` (Hugging Face ``transformers`` under ``torch.autocast``, fp32 parameters): the residual stream
  is fp32, ``LlamaRMSNorm`` saves its fp32 input, the fp32 normalised tensor and rstd, and each consuming
  matmul saves its own 16-bit cast of the output; GQA-sized K/V under SDPA (``enable_gqa``).
- 16-bit modules (``deepspeed``, ``--param-dtype bf16``, ``fsdp2``): ``LlamaRMSNorm`` upcasts
  (``hidden_states.to(torch.float32)``, ``transformers`` ``models/llama/modeling_llama.py``), so it saves an
  fp32 copy (4h), rstd, the bf16 normalised tensor and its output; the bf16 block input itself is saved by
  nothing. ``fsdp2`` follows torchtitan's Llama (``torchtitan/models/llama/model.py`` @ ``9dec370a``): the
  same fp32 RMSNorm, and ``repeat_kv`` copies K/V to every query head before SDPA, which saves the copies.
- ``megatron`` (Megatron-Core with Transformer Engine, ``megatron/core`` @ ``d98e8a64``, TE @ ``d0067d0d``):
  ``LayerNormLinear`` saves the norm input, ``ln_out`` and rsigma; the fused SwiGLU saves the 2I-wide fc1
  output and fc2 its input: ``(12h + 4kd + 6I + 4a + 8)/t`` per token with sequence parallelism; under
  TE fp8 ``ln_out`` and the fc2/projection inputs are saved in fp8: ``(11h + 4kd + 5I + 4a + 8)/t``
  (``transformer_engine/pytorch/module/layernorm_linear.py``, ``linear.py``).

Policies (:data:`batchpilot.specs.settings.Recompute`): ``none``; ``selective`` drops the s×s terms of eager
attention (Korthikanti §4); ``full`` keeps the layer input; ``op`` is torchtitan's per-op selective
checkpointing (``torchtitan/distributed/activation_checkpoint.py`` @ ``b5bcd76c``, ``SelectiveAC``; at the
benchmarks' commit ``_apply_ac_to_transformer_block`` in ``torchtitan/parallelisms/parallelize_llama.py`` @
``9dec370a``): the layer input plus the outputs of the odd-numbered ``mm`` ops of the layer (every second
``mm`` is recomputed), of every ``addmm``/``bmm`` (biased linears, eager attention's score matmuls), of the
attention kernel (output and fp32 log-sum-exp) and of the tensor/expert-parallel collectives
(``reduce_scatter_tensor``, ``all_to_all_single``); the selective-checkpoint cache keeps each of them
whether backward needs it or not (``torch/utils/checkpoint.py``, ``_CachingTorchDispatchMode``). For a
Llama block (q, k, v, o, gate, up, down): q, v, attention, gate and down are saved — eager
``8h + 2kd + 2I + 4a`` bytes per token. ``--compile``: inductor's min-cut partitioner stores only what
backward needs, so ``op`` loses the down-projection output (``6h + 2kd + 2I + 4a``); ``none`` keeps the
block input, both norm outputs, q, K/V, the attention output, the mid-block residual, rstd and gate, up and
their product (``12h + 4kd + 6I + 4a + 8``, measured on CPU: the norms' fp32 copies and the SiLU output are
recomputed); ``full`` the block input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from batchpilot.errors import SpecError
from batchpilot.estimate.dtypes import ACTIVATION_BYTES, DTYPE_BYTES
from batchpilot.estimate.finetune import adjust_layer_terms, adjust_logits_terms
from batchpilot.specs.model import ModelSpec
from batchpilot.specs.settings import RunSettings

Policy = Literal["none", "selective", "op", "full"]

#: Tokens an expert-parallel rank processes relative to the balanced share (k·T/E per expert). 1.0
#: assumes balanced routing, which drop-and-pad routing with capacity factor 1 enforces
#: (Megatron ``moe_utils.get_capacity``: ``ceil(T·k·cf/E)`` per expert); dropless routing has no bound (the
#: worst case is ``ep``×) and is calibrated through :class:`batchpilot.estimate.overhead.OverheadModel`.
MOE_TOKEN_IMBALANCE = 1.0


def dropout_enabled(model: ModelSpec) -> bool:
    """Whether the config trains with dropout (GPT-2: ``resid_pdrop``/``attn_pdrop`` default 0.1)."""
    if model.family == "gpt2":
        return max(_rate(model, k, 0.1) for k in ("resid_pdrop", "attn_pdrop", "embd_pdrop")) > 0.0
    return max(_rate(model, k, 0.0) for k in ("attention_dropout", "hidden_dropout")) > 0.0


def _rate(model: ModelSpec, key: str, default: float) -> float:
    value = model.hf_config.get(key, default)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise SpecError(f"{model.name}: field {key!r} must be a dropout probability in [0, 1), got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------------------------- block style
@dataclass(frozen=True, kw_only=True, slots=True)
class BlockStyle:
    """How one engine's transformer block stores what it saves (bytes per element, which norm code)."""

    act: int
    """Bytes of activations inside attention/MLP (the matmul dtype)."""
    resid: int
    """Bytes of the residual stream: fp32 under ``torch`` autocast with fp32 parameters (the embedding
    output is fp32 and ``x + attn(x)`` promotes to fp32), else the activation dtype."""
    norm_saves_input: bool
    """The norm saves its input, the residual stream itself (LayerNorm; HF RMSNorm on an fp32 stream; TE
    ``LayerNormLinear``'s ``inputmat``). False for an RMSNorm that upcasts a 16-bit input to fp32 and saves
    the fp32 copy instead (HF and torchtitan in a 16-bit module)."""
    norm_upcast: bool
    """The RMSNorm saves an fp32 copy of its 16-bit input (4 bytes per element)."""
    norm_normalized: int
    """Bytes per element of the normalised tensor the RMSNorm weight multiply saves (0: none, TE)."""
    norm_out: float
    """Bytes per element of a norm output as saved by the matmuls it feeds (TE fp8: 1)."""
    out_casts: bool
    """Autocast: each consuming matmul saves its own 16-bit cast of the (fp32) norm output."""
    kv_repeated: bool
    """K/V are copied to every query head before the attention kernel (torchtitan ``repeat_kv``)."""
    swiglu_widths: float
    """I-wide tensors a SwiGLU MLP saves, in units of ``I·act``: 4 (gate, up, SiLU, product) or
    Megatron's fused 3 (fc1's 2I-wide output + fc2's input); 2.5 under TE fp8 (fc2's input in fp8)."""
    proj_in_fp8_copy: bool
    """TE fp8: the attention projection keeps a 1-byte copy of its input next to attention's bf16 output."""
    compiled: bool
    """``torch.compile``: the partitioner saves only what backward needs."""


def block_style(settings: RunSettings) -> BlockStyle:
    """The :class:`BlockStyle` of ``settings`` (engine, precision, parameter dtype, compile)."""
    act = ACTIVATION_BYTES[settings.precision]
    autocast_fp32_stream = (settings.engine == "torch" and settings.precision != "fp32"
                            and settings.param_dtype == "fp32" and not settings.finetune.adapters)
    resid = 4 if autocast_fp32_stream else act
    megatron = settings.engine == "megatron"
    te_fp8 = megatron and settings.precision == "fp8"
    upcast = not megatron and resid < 4
    return BlockStyle(
        act=act, resid=resid, norm_saves_input=not upcast, norm_upcast=upcast,
        norm_normalized=0 if megatron else resid, norm_out=1.0 if te_fp8 else float(act),
        out_casts=autocast_fp32_stream, kv_repeated=settings.engine == "fsdp2",
        swiglu_widths=(2.5 if te_fp8 else 3.0) if megatron else 4.0, proj_in_fp8_copy=te_fp8,
        compiled=settings.compile,
    )


# ---------------------------------------------------------------------------------------------- none (all)
def _norm_terms(model: ModelSpec, d: BlockStyle, prefix: str, consumers: int) -> dict[str, float]:
    """One pre-norm feeding ``consumers`` matmuls (bytes per token, before sequence-parallel division).

    LayerNorm saves its input (the residual stream, counted there) and mean/rstd (2 fp32). HF
    ``LlamaRMSNorm`` computes ``w * (x.float() * rsqrt(mean(x²) + eps)).to(dtype)`` and saves rstd, the
    normalised tensor (for ``w``'s gradient) and — when ``x`` is 16-bit — the fp32 copy ``x.float()``. The
    output is saved by the matmuls it feeds: once when it already has the matmul dtype; under autocast
    with an fp32 residual stream each consuming matmul saves its *own* 16-bit cast (autocast caches casts
    of leaf weights only) — three for separate Q/K/V projections, two for SwiGLU's gate and up.
    """
    h = model.hidden_size
    terms: dict[str, float] = {}
    if model.norm_kind == "layernorm":
        terms[f"{prefix}_stats"] = 8.0
    else:
        if d.norm_upcast:
            terms[f"{prefix}_fp32_input"] = float(h * 4)
        if d.norm_normalized:
            terms[f"{prefix}_normalized"] = float(h * d.norm_normalized)
        terms[f"{prefix}_rstd"] = 4.0
    if d.out_casts:
        terms[f"{prefix}_out_casts"] = float(consumers * h * d.act)
    else:
        terms[f"{prefix}_out"] = h * d.norm_out
    return terms


def _norm_consumers(model: ModelSpec) -> tuple[int, int]:
    """Matmuls reading the attention norm's and the FFN norm's output (GPT-2: fused QKV, one fc)."""
    if model.family == "gpt2":
        return 1, 1
    attention = 2 if model.family == "mla" else 3
    ffn = 2 if model.mlp_kind == "swiglu" else 1
    return attention, ffn


def _core_attention(model: ModelSpec, policy: Policy, d: BlockStyle, seq_len: int, heads: int,
                    kv_heads: int, dropout: bool, eager: bool) -> dict[str, float]:
    """Q·Kᵀ, softmax, dropout and attention over V, per token, for ``heads`` query heads on this GPU.

    Eager (``attention="eager"``): the s×s probabilities are materialised. HF Llama-style code repeats
    K/V to all heads (``repeat_kv`` copies) and runs softmax in fp32 (then casts); Korthikanti's GPT block
    keeps 16-bit scores: softmax output 2as, dropout mask as, dropout output 2as (bytes per token).
    Flash/SDPA: Q, K, V (GQA-sized under ``enable_gqa``; repeated to every head by torchtitan), the fp32
    log-sum-exp per head and the output (in ``(b, s, heads, d)`` layout, so it is also the output
    projection's saved input); no s² term. Selective recomputation (Korthikanti §4) drops the s² terms.
    """
    dqk, dv = model.head_dim_qk, model.head_dim_v
    terms: dict[str, float] = {"attn_q": float(heads * dqk * d.act)}
    if not eager:
        kv_saved = heads if d.kv_repeated else kv_heads
        terms["attn_k"] = float(kv_saved * dqk * d.act)
        terms["attn_v"] = float(kv_saved * dv * d.act)
        terms["attn_lse"] = float(heads * 4)
        return terms
    hf_style = model.family != "gpt2"
    kv_saved = heads if hf_style else kv_heads
    terms["attn_k"] = float(kv_saved * dqk * d.act)
    terms["attn_v"] = float(kv_saved * dv * d.act)
    if policy == "selective":
        return terms
    scores = heads * seq_len
    # torch autocast (fp32 residual stream, 16-bit matmuls) runs softmax in fp32 (it is on autocast's fp32 op
    # list), so HF's GPT-2 saves fp32 probabilities too (measured, CPU autocast, gpt2 eager: 4 bytes per score)
    if hf_style or (d.resid == 4 and d.act != 4):
        terms["attn_softmax_fp32"] = float(scores * 4)
        if d.act != 4 and not dropout:  # with dropout the matmul saves dropout's output instead of the cast
            terms["attn_probs_cast"] = float(scores * d.act)
    else:
        terms["attn_softmax"] = float(scores * d.act)
    if dropout:
        terms["attn_dropout_mask"] = float(scores * DTYPE_BYTES["bool"])
        terms["attn_dropout_out"] = float(scores * d.act)
    return terms


def _mla_projections(model: ModelSpec, d: BlockStyle, heads: int) -> dict[str, float]:
    """MLA (DeepSeek-V2 §2.1): the low-rank query path and the latent K/V c_kv (``kv_lora_rank``).

    Saved: the query LoRA output, its RMSNorm (normalised + output), ``kv_a`` output (latent + RoPE key),
    the latent's RMSNorm (normalised + output, the ``kv_b`` input), and ``kv_b``'s decompressed per-head
    K_nope/V (kept as one tensor whose V slice feeds attention).
    """
    terms: dict[str, float] = {}
    if model.q_lora_rank:
        terms["mla_q_latent"] = float(3 * model.q_lora_rank * d.act + 4)
    terms["mla_kv_a_out"] = float((model.kv_lora_rank + model.qk_rope_head_dim) * d.act)
    terms["mla_kv_latent_norm"] = float(2 * model.kv_lora_rank * d.act + 4)
    nope = model.head_dim_qk - model.qk_rope_head_dim
    terms["mla_kv_b_out"] = float(heads * (nope + model.head_dim_v) * d.act)
    return terms


def _ffn_widths(model: ModelSpec, settings: RunSettings, d: BlockStyle) -> float:
    """Saved I-wide tensors of one FFN, in units of ``width·act``.

    SwiGLU ``down(silu(gate(x)) * up(x))``: gate output (SiLU input), up output, SiLU output, the product
    (the down-projection input): 4 (:attr:`BlockStyle.swiglu_widths` for Megatron's fused kernel). GELU
    MLP with a fused GELU (Korthikanti; Megatron): fc1 output (GELU input, 8sbh) and GELU output (fc2
    input, 8sbh): 2. GPT-2's ``gelu_new`` in ``transformers`` is elementwise Python,
    ``0.5·x·(1 + tanh(c·(x + 0.044715·x³)))``, and also saves ``0.5·x``, the tanh output and
    ``1 + tanh``: 5 (every engine but ``megatron``).
    """
    if model.mlp_kind == "swiglu":
        return d.swiglu_widths
    if settings.engine != "megatron" and model.hf_config.get("activation_function") == "gelu_new":
        return 5.0
    return 2.0


def _attention(model: ModelSpec, settings: RunSettings, policy: Policy, d: BlockStyle, seq_len: int, tp: int,
               dropout: bool) -> dict[str, float]:
    """Attention block (without its norm) per token on one tensor-parallel rank."""
    heads = model.num_heads // tp
    kv_heads = max(1, model.num_kv_heads // tp)
    terms: dict[str, float] = {}
    if model.family == "mla":
        terms.update(_mla_projections(model, d, heads))
        kv_heads = heads  # K/V are decompressed to every head for training
    terms.update(_core_attention(model, policy, d, seq_len, heads, kv_heads, dropout,
                                 settings.attention == "eager"))
    terms["attn_proj_in"] = float(heads * model.head_dim_v * d.act)
    if d.proj_in_fp8_copy:
        terms["attn_proj_in_fp8"] = float(heads * model.head_dim_v)
    return terms


def _moe(model: ModelSpec, settings: RunSettings, d: BlockStyle, tp: int, imbalance: float) -> dict[str, float]:
    """MoE FFN per token (Mixtral/DeepSeek in ``transformers``): router logits (16-bit) and their fp32
    softmax, per routed copy the gathered expert input and the expert output (for the routing-weight
    product), each expert's FFN; shared experts see every token. Routed terms × ``imbalance`` (tokens this
    expert-parallel rank processes relative to the balanced share, :data:`MOE_TOKEN_IMBALANCE`); expert
    parallelism moves tokens, it does not change the balanced per-rank count."""
    k, e, h = model.num_experts_per_token, model.num_experts, model.hidden_size
    terms = {"moe_router": float(e * (d.act + 4))}
    terms["moe_dispatch"] = k * 2 * h * d.act * imbalance
    width = max(1, model.moe_intermediate_size // tp)
    per_expert = _ffn_widths(model, settings, d) * width * d.act
    terms["moe_experts"] = k * per_expert * imbalance
    if model.num_shared_experts:
        terms["moe_shared"] = model.num_shared_experts * per_expert
    return terms


def _outside_terms(model: ModelSpec, d: BlockStyle, dropout: bool) -> dict[str, float]:
    """Residual-stream-side terms (replicated over tp; ÷ tp only with sequence parallelism)."""
    h = model.hidden_size
    outside: dict[str, float] = {}
    if d.norm_saves_input:
        outside.update(layer_input=float(h * d.resid), attn_residual=float(h * d.resid))
    attn_consumers, ffn_consumers = _norm_consumers(model)
    outside.update(_norm_terms(model, d, "norm1", attn_consumers))
    outside.update(_norm_terms(model, d, "norm2", ffn_consumers))
    if dropout:
        outside["attn_proj_dropout_mask"] = float(h)
        outside["mlp_dropout_mask"] = float(h)
    return outside


def _gathers_full_inputs(settings: RunSettings, sp_div: int) -> bool:
    """torchtitan's sequence parallelism (DTensor ``PrepareModuleInput`` to ``Replicate()``, ``apply_tp`` in
    ``torchtitan/parallelisms/parallelize_llama.py`` @ ``9dec370a``) all-gathers each norm output to the full
    sequence before the column-parallel matmuls, which save that full-size tensor (Megatron/TE save the
    local shard and gather it again in backward, ``ln_out_needs_gather``)."""
    return settings.engine == "fsdp2" and sp_div > 1


def _none_terms(model: ModelSpec, settings: RunSettings, policy: Policy, d: BlockStyle, seq_len: int, t: int,
                sp_div: int, moe_layer: bool, imbalance: float) -> dict[str, float]:
    """Every tensor an eager layer saves (``none``; ``selective`` drops eager attention's s² terms)."""
    dropout = dropout_enabled(model)
    terms = {name: value / sp_div for name, value in _outside_terms(model, d, dropout).items()}
    if _gathers_full_inputs(settings, sp_div):
        for name in ("norm1_out", "norm2_out"):
            terms[name] *= sp_div
    terms.update(_attention(model, settings, policy, d, seq_len, t, dropout))
    if moe_layer:
        terms.update(_moe(model, settings, d, t, imbalance))
    else:
        width = max(1, model.intermediate_size // t)
        terms["mlp"] = _ffn_widths(model, settings, d) * width * d.act
    return terms


# ---------------------------------------------------------------------------------------------- op, compile
@dataclass(frozen=True, kw_only=True, slots=True)
class _Matmul:
    """One matmul of a block in forward order, as the selective-checkpoint policy sees it."""

    name: str
    out_bytes: float
    """Bytes per token of its output on this GPU."""
    addmm: bool = False
    """A biased linear (``aten.addmm``): always saved, does not advance the every-second-``mm`` counter."""
    row_parallel: bool = False
    """Its output goes straight into the residual add (attention output / down projection): under tensor
    parallelism a full-size partial sum, then reduce-scattered (sequence parallel) or all-reduced."""
    forced_recompute: bool = False
    """torchtitan's ``force_recompute_mm_shapes_by_fqns`` (default ``moe.router.gate``)."""


def _attention_matmuls(model: ModelSpec, d: BlockStyle, t: int) -> list[_Matmul]:
    heads, kv = model.num_heads // t, max(1, model.num_kv_heads // t)
    a, _h = d.act, model.hidden_size
    if model.family == "gpt2":
        return [_Matmul(name="qkv", out_bytes=(heads * model.head_dim_qk * 2 + heads * model.head_dim_v) * a, addmm=True)]
    if model.family == "mla":
        out: list[_Matmul] = []
        if model.q_lora_rank:
            out.append(_Matmul(name="q_a", out_bytes=model.q_lora_rank * a, addmm=model.qkv_bias))
        out.append(_Matmul(name="q_b" if model.q_lora_rank else "q", out_bytes=heads * model.head_dim_qk * a))
        out.append(_Matmul(name="kv_a", out_bytes=(model.kv_lora_rank + model.qk_rope_head_dim) * a,
                           addmm=model.qkv_bias))
        nope = model.head_dim_qk - model.qk_rope_head_dim
        out.append(_Matmul(name="kv_b", out_bytes=heads * (nope + model.head_dim_v) * a))
        return out
    bias = model.qkv_bias
    return [_Matmul(name="q", out_bytes=heads * model.head_dim_qk * a, addmm=bias),
            _Matmul(name="k", out_bytes=kv * model.head_dim_qk * a, addmm=bias),
            _Matmul(name="v", out_bytes=kv * model.head_dim_v * a, addmm=bias)]


def _ffn_matmuls(model: ModelSpec, d: BlockStyle, width: int, prefix: str, bias: bool) -> list[_Matmul]:
    a, h = d.act, model.hidden_size
    if model.mlp_kind == "swiglu":
        return [_Matmul(name=f"{prefix}gate", out_bytes=width * a, addmm=bias),
                _Matmul(name=f"{prefix}up", out_bytes=width * a, addmm=bias),
                _Matmul(name=f"{prefix}down", out_bytes=h * a, addmm=bias, row_parallel=True)]
    return [_Matmul(name=f"{prefix}fc", out_bytes=width * a, addmm=bias or model.family == "gpt2"),
            _Matmul(name=f"{prefix}proj", out_bytes=h * a, addmm=bias or model.family == "gpt2", row_parallel=True)]


def _op_terms(model: ModelSpec, settings: RunSettings, d: BlockStyle, seq_len: int, t: int, sp_div: int,
              moe_layer: bool, imbalance: float) -> dict[str, float]:
    """torchtitan's per-op policy (see the module docstring) over the block's matmuls in forward order."""
    h = model.hidden_size
    terms: dict[str, float] = {"layer_input": h * d.resid / sp_div}
    o_gpt2 = model.family == "gpt2"
    before = _attention_matmuls(model, d, t)
    after = [_Matmul(name="o", out_bytes=h * d.act, addmm=model.o_bias or o_gpt2, row_parallel=True)]
    if moe_layer:
        if settings.ep > 1:  # all_to_all_single outputs (dispatch and combine) are in the save list
            terms["moe_a2a_dispatch"] = model.num_experts_per_token * h * d.act * imbalance
            terms["moe_a2a_combine"] = model.num_experts_per_token * h * d.act * imbalance
        if model.num_shared_experts:
            width = max(1, model.num_shared_experts * model.moe_intermediate_size // t)
            after += _ffn_matmuls(model, d, width, "shared_", model.mlp_bias)
    else:
        after += _ffn_matmuls(model, d, max(1, model.intermediate_size // t), "", model.mlp_bias)
    count = 0
    for mm in before:
        count = _op_save(terms, mm, count, settings, d, t)
    terms.update(_op_attention(model, settings, d, seq_len, t))
    for mm in after:
        count = _op_save(terms, mm, count, settings, d, t)
    return terms


def _op_save(terms: dict[str, float], mm: _Matmul, count: int, settings: RunSettings, d: BlockStyle,
             t: int) -> int:
    """Add what the per-op policy saves of ``mm`` to ``terms``; return the ``mm`` counter after it.

    Odd-numbered ``mm`` outputs and every ``addmm`` output are saved. A row-parallel projection under
    tensor parallelism outputs a full-size partial sum (saved when its parity says so); with sequence
    parallelism its ``reduce_scatter_tensor`` output (``h/t``) is saved whatever the parity. Under
    ``--compile`` the down projection's output and reduce-scatter are dropped (backward does not need
    them); the attention projection's reduce-scatter output stays (the residual is recomputed from it).
    """
    if mm.forced_recompute:
        return count
    if not mm.addmm:
        count += 1
    parity_saves = mm.addmm or count % 2 == 1
    needed = not (mm.row_parallel and d.compiled)
    if parity_saves and needed:
        terms[f"op_{mm.name}_out"] = mm.out_bytes  # row-parallel: h-wide, not divided by t
    if mm.row_parallel and t > 1 and settings.sp and (needed or mm.name == "o"):
        terms[f"op_{mm.name}_reduce_scatter"] = mm.out_bytes / t
    return count


def _op_attention(model: ModelSpec, settings: RunSettings, d: BlockStyle, seq_len: int, t: int) -> dict[str, float]:
    heads = model.num_heads // t
    if settings.attention == "eager":  # bmm outputs: Q·Kᵀ scores and probs·V (always saved)
        return {"op_attn_scores": float(heads * seq_len * d.act),
                "op_attn_out": float(heads * model.head_dim_v * d.act)}
    return {"op_attn_out": float(heads * model.head_dim_v * d.act), "op_attn_lse": float(heads * 4)}


def _compiled_none_terms(model: ModelSpec, settings: RunSettings, d: BlockStyle, seq_len: int, t: int,
                         sp_div: int, moe_layer: bool, imbalance: float) -> dict[str, float]:
    """What inductor's partitioner keeps for a compiled block without checkpointing.

    Measured (torch 2.13 inductor, a ``transformers`` Llama decoder layer compiled whole, pure bf16 and
    fp32, tiny-llama-1m and tiny-llama-15m: the saved tensors of the compiled autograd function, read with
    ``torch.autograd.graph.saved_tensors_hooks``): the block input, five h-wide tensors (both norm outputs,
    q, the attention output, the mid-block residual), the GQA-sized K and V, the log-sum-exp, both rstd and
    three I-wide tensors (gate, up and their product, the down projection's input): ``12h + 4kd + 6I + 4a +
    8`` bytes per token in bf16. The eager layer's fp32 norm copies, the normalised tensors and the SiLU
    output are recomputed. GELU MLPs keep their two I-wide tensors; MoE experts keep their eager count.
    """
    h = model.hidden_size
    heads, kv = model.num_heads // t, max(1, model.num_kv_heads // t)
    norm_out = h * d.act * (1 if _gathers_full_inputs(settings, sp_div) else 1 / sp_div)
    terms = {"layer_input": h * d.resid / sp_div, "attn_residual": h * d.resid / sp_div,
             "norm1_out": norm_out, "norm2_out": norm_out,
             "norm_stats": (16.0 if model.norm_kind == "layernorm" else 8.0) / sp_div}
    if dropout_enabled(model):
        terms["dropout_masks"] = 2.0 * h / sp_div
    terms["attn_q"] = float(heads * model.head_dim_qk * d.act)
    terms["attn_kv"] = float(kv * (model.head_dim_qk + model.head_dim_v) * d.act)
    terms["attn_out"] = float(heads * model.head_dim_v * d.act)
    terms["attn_lse"] = float(heads * 4)
    if settings.attention == "eager":
        terms["attn_probs"] = float(heads * seq_len * d.act)
    if model.family == "mla":
        terms.update(_mla_projections(model, d, heads))
    if moe_layer:
        terms.update(_moe(model, settings, d, t, imbalance))
    else:
        widths = 3 if model.mlp_kind == "swiglu" else 2
        terms["mlp_inputs"] = float(widths * max(1, model.intermediate_size // t) * d.act)
    return terms


# ---------------------------------------------------------------------------------------------- public
def activation_terms(model: ModelSpec, settings: RunSettings, *, seq_len: int, moe_layer: bool = False,
                     tp: int | None = None, policy: Policy | None = None,
                     imbalance: float = MOE_TOKEN_IMBALANCE) -> dict[str, float]:
    """Bytes per token saved for backward by one transformer layer on one GPU, by named tensor, under
    ``policy`` (default: ``settings.recompute``; layers outside ``recompute_every`` use ``none``).

    Residual-stream tensors (layer input, post-attention residual), norm outputs and dropout masks after
    the projections live outside the tensor-parallel regions: replicated over tp, divided by tp only with
    sequence parallelism (Korthikanti §4.2). Everything inside attention/MLP is divided by tp. Full
    recomputation keeps only the layer input (Korthikanti Table 2: 2sbh).
    """
    t = settings.tp if tp is None else tp
    policy = settings.recompute if policy is None else policy
    d = block_style(settings)
    sp_div = t if (settings.sp and t > 1) else 1
    h = model.hidden_size
    if policy == "full":
        return {"layer_input": h * d.resid / sp_div}
    if policy == "op":
        return _op_terms(model, settings, d, seq_len, t, sp_div, moe_layer, imbalance)
    if d.compiled:
        return _compiled_none_terms(model, settings, d, seq_len, t, sp_div, moe_layer, imbalance)
    return adjust_layer_terms(_none_terms(model, settings, policy, d, seq_len, t, sp_div, moe_layer, imbalance),
                              model, settings, policy, t)  # fine-tuning: frozen linears save no input


@dataclass(frozen=True, kw_only=True, slots=True)
class LayerBytes:
    """Bytes per token of one layer under its policy, for the phases of a step."""

    saved: float
    """Kept from the layer's forward until its backward (:func:`activation_terms`)."""
    backward: float
    """Live while this layer's backward runs, in place of :attr:`saved`: everything its backward needs
    (recomputed if checkpointed), what the selective cache holds besides, the incoming gradient of the
    residual stream and the largest gradient temporaries (:func:`backward_working_terms`)."""
    forward_transient: float
    """Freed at the end of the layer's forward: the largest group of unsaved intermediates alive at once
    (a hole the caching allocator keeps reserved, :func:`forward_transient_bytes`)."""


def layer_bytes(model: ModelSpec, settings: RunSettings, *, seq_len: int, moe_layer: bool, policy: Policy,
                imbalance: float = MOE_TOKEN_IMBALANCE) -> LayerBytes:
    """:class:`LayerBytes` of one layer under ``policy``."""
    saved = sum(activation_terms(model, settings, seq_len=seq_len, moe_layer=moe_layer, policy=policy,
                                 imbalance=imbalance).values())
    backward = sum(backward_working_terms(model, settings, seq_len=seq_len, moe_layer=moe_layer, policy=policy,
                                          imbalance=imbalance).values())
    return LayerBytes(saved=saved, backward=max(saved, backward),
                      forward_transient=forward_transient_bytes(model, settings, seq_len=seq_len,
                                                                moe_layer=moe_layer, policy=policy,
                                                                imbalance=imbalance))


def backward_working_terms(model: ModelSpec, settings: RunSettings, *, seq_len: int, moe_layer: bool,
                           policy: Policy, imbalance: float = MOE_TOKEN_IMBALANCE) -> dict[str, float]:
    """Bytes per token live while one layer's backward runs (in place of what it saved).

    - its whole saved set as an uncheckpointed layer holds it (a checkpointed layer recomputes it first;
      compiled blocks recompute into the compiled set);
    - ``op``: the cached outputs its backward does not need (e.g. the down projection's), still held;
    - the incoming gradient of the residual stream (``h`` in the stream's dtype);
    - the gradient temporaries at the MLP's peak: the backward of SwiGLU's product ``silu(g)·u`` holds the
      incoming I-wide gradient and both new I-wide gradients while SiLU's and up's outputs are still
      saved and the product (down's input) is already freed: ``+2·I`` elements over the saved set (measured
      on tiny Llamas: the CPU step's peak inside ``MulBackward0``, tests/estimate/test_memory_crosscheck.py);
      ``+I`` for a GELU MLP; ``k×`` per routed expert;
    - context parallelism: the ring's all-gathered K/V (``cp ×`` the local K and V) while attention's
      backward runs, or expert parallelism's all-to-all send and receive buffers, when larger.
    """
    t = settings.tp
    d = block_style(settings)
    sp_div = t if (settings.sp and t > 1) else 1
    full = activation_terms(model, settings, seq_len=seq_len, moe_layer=moe_layer, policy="none",
                            imbalance=imbalance)
    terms = {f"recomputed_{k}": v for k, v in full.items()}
    if policy == "op":
        cached = activation_terms(model, settings, seq_len=seq_len, moe_layer=moe_layer, policy="op",
                                  imbalance=imbalance)
        extra = {k: v for k, v in cached.items() if k.endswith(("down_out", "proj_out", "reduce_scatter"))
                 or k.startswith("op_o_")}
        terms.update({f"cached_{k}": v for k, v in extra.items()})
    terms["grad_residual"] = model.hidden_size * d.resid / sp_div
    terms["grad_temporaries"] = max(_mlp_grad_temporaries(model, settings, d, t, moe_layer, imbalance),
                                    _ring_kv_bytes(model, settings, d),
                                    _a2a_bytes(model, settings, d, moe_layer, imbalance))
    return terms


def _a2a_bytes(model: ModelSpec, settings: RunSettings, d: BlockStyle, moe_layer: bool, imbalance: float) -> float:
    """Expert parallelism's all-to-all buffers per local token of an MoE layer: the permuted tokens sent (k copies
    of h) and those received (× the token imbalance), alive together around each dispatch and combine
    (Megatron ``token_dispatcher.py`` ``MoEAlltoAllTokenDispatcher``; torchtitan ``all_to_all_single``)."""
    if not moe_layer or settings.ep == 1:
        return 0.0
    return model.num_experts_per_token * model.hidden_size * d.act * (1 + imbalance)


def _mlp_grad_temporaries(model: ModelSpec, settings: RunSettings, d: BlockStyle, t: int, moe_layer: bool,
                          imbalance: float) -> float:
    per_width = 2.0 if model.mlp_kind == "swiglu" else 1.0
    if moe_layer:
        width = max(1, model.moe_intermediate_size // t)
        return per_width * width * d.act * max(model.num_experts_per_token * imbalance, 1.0)
    return per_width * max(1, model.intermediate_size // t) * d.act


def _ring_kv_bytes(model: ModelSpec, settings: RunSettings, d: BlockStyle) -> float:
    """Context parallelism's all-gathered K and V per local token (torch's ring attention with the default
    ``ALL_GATHER`` rotater, ``torch/distributed/tensor/experimental/_context_parallel/_attention.py``): cp ×
    the local K and V, plus the fp32 output/log-sum-exp merger (``_SDPAMerger``)."""
    if settings.cp == 1:
        return 0.0
    t = settings.tp
    heads, kv = model.num_heads // t, max(1, model.num_kv_heads // t)
    kv_bytes = kv * (model.head_dim_qk + model.head_dim_v) * d.act
    return settings.cp * kv_bytes + heads * (model.head_dim_v + 1) * 4


def forward_transient_bytes(model: ModelSpec, settings: RunSettings, *, seq_len: int, moe_layer: bool,
                            policy: Policy, imbalance: float = MOE_TOKEN_IMBALANCE) -> float:
    """Bytes per token of the largest group of intermediates of one layer's forward that the layer does not
    keep: the MLP's (gate, up, SiLU and product outputs; compiled: gate, up and the fused product) plus the
    FFN norm's output (torchtitan's sequence parallelism: all-gathered to the full sequence, and the down
    projection's full-size partial sum before its reduce-scatter), minus what ``policy`` saves of them — or
    context parallelism's gathered K/V when larger. Freed when the layer ends and refilled by the next layer's, the region is left as a hole in
    the caching allocator once the last layer's forward is over (allocations that follow are larger)."""
    d = block_style(settings)
    t = settings.tp
    sp_div = t if (settings.sp and t > 1) else 1
    if moe_layer:
        width = max(1, model.moe_intermediate_size // t) * max(model.num_experts_per_token * imbalance, 1.0)
    else:
        width = max(1, model.intermediate_size // t)
    group = (3.0 if d.compiled else 4.0) if model.mlp_kind == "swiglu" else 2.0
    mlp = group * width * d.act + model.hidden_size * d.act / sp_div
    if _gathers_full_inputs(settings, sp_div):
        # the all-gathered (full-sequence) FFN input and the down projection's full-size partial sum
        # before its reduce-scatter
        mlp += model.hidden_size * d.act * (2 - 1 / sp_div)
    saved = activation_terms(model, settings, seq_len=seq_len, moe_layer=moe_layer, policy=policy,
                             imbalance=imbalance)
    kept = sum(v for k, v in saved.items() if k in ("mlp", "mlp_inputs", "op_gate_out", "op_fc_out", "moe_experts")
               or k.startswith("norm2_out"))
    return max(0.0, mlp - kept, _ring_kv_bytes(model, settings, d), _a2a_bytes(model, settings, d, moe_layer, imbalance))


def layer_policies(settings: RunSettings, layers: int) -> list[Policy]:
    """The policy of each of ``layers`` layers in forward order: ``recompute`` on layers N, 2N, … (1-based,
    ``N = recompute_every``), ``none`` on the others (torchtitan's ``count % N == 0``)."""
    every = settings.recompute_every
    return [settings.recompute if (i + 1) % every == 0 else "none" for i in range(layers)]


# ---------------------------------------------------------------------------------------------- loss
def cpu_dropout_noise_bytes(model: ModelSpec, settings: RunSettings, *, seq_len: int) -> float:
    """Bytes per token per layer a CPU step saves beyond the layer terms' 1-byte dropout masks (0 without dropout).

    On a GPU dropout saves a 1-byte mask (ATen's fused ``native_dropout``); on a CPU the unfused path saves its
    noise tensor in the dropped tensor's dtype (``aten/src/ATen/native/Dropout.cpp`` ``_dropout_impl``:
    ``noise = empty_like(input).bernoulli_(1 − p)``, ``input * noise``): the attention probabilities and the
    two residual-branch outputs are in the matmul dtype, so each mask costs ``act − 1`` bytes more per element.
    Measured (torch 2.13 CPU, gpt2 eager, sequence 256, micro-batch 1 and 4): the analytic peak goes from
    −2.8 / −4.1 % (bf16) of the traced allocator peak to within 0.5 % with it.
    """
    if not dropout_enabled(model) or settings.recompute != "none":
        return 0.0
    terms = activation_terms(model, settings, seq_len=seq_len)
    masks = sum(terms.get(k, 0.0) for k in ("attn_dropout_mask", "attn_proj_dropout_mask", "mlp_dropout_mask"))
    return masks * (block_style(settings).act - DTYPE_BYTES["bool"])


def logits_terms(model: ModelSpec, settings: RunSettings, *, tp: int | None = None) -> dict[str, float]:
    """Bytes per token live on the last stage at the start of the loss's backward: the final norm's saved
    tensors — its input too, the last layer's output, which no layer's terms count (measured: the
    ``pow``/``native_layer_norm`` of HF's final norm saves it; 1 KiB per token of bench-llama-3m in fp32) —
    and the loss path's buffers (vocabulary split over tp for ``parallel``/``fused``).

    Loss paths (:attr:`RunSettings.resolved_loss`), bytes per token per vocabulary entry ``V_l``:

    - ``eager`` — ``cross_entropy(logits.float())`` (PyTorch/HF; torchtitan ``train.py`` @ ``9dec370a``): the
      saved fp32 log-softmax output, ``nll_loss``'s gradient and ``log_softmax``'s gradient: 12, whatever
      the precision. The logits are saved by nothing and freed once the loss is computed.
    - ``compiled`` — ``torch.compile(cross_entropy)`` (torchtitan ``components/loss.py`` @ ``e7c0cae9``):
      the fused kernel saves the 16-bit logits and writes a 16-bit gradient: ``2·act``.
    - ``parallel`` — ``loss_parallel()`` (torch ``distributed/tensor/parallel/loss.py``): ``_log_softmax``
      keeps ``x − max`` and ``exp`` as separate fp32 tensors; its backward holds the saved result, the
      gradient, ``exp`` and a sum: 16.
    - ``fused`` — Megatron's ``vocab_parallel_cross_entropy`` (``tensor_parallel/cross_entropy.py``): one
      fp32 exp-logits tensor computed and differentiated in place, plus the 16-bit gradient: 6.
    - ``chunked`` — torchtune's ``CEWithChunkedOutputLoss``: every chunk's saved fp32 log-softmax (4) plus
      one chunk's two fp32 gradients (8/n); compiled, the chunks' 16-bit logits plus one chunk's gradient.

    With tensor + sequence parallelism torchtitan's output layer (``ColwiseParallel(input_layouts=Shard(1))``)
    all-gathers its input and saves it full size.
    """
    t = settings.tp if tp is None else tp
    d = block_style(settings)
    sp_div = t if (settings.sp and t > 1) else 1
    terms = {f"final_{k}": val / sp_div for k, val in _norm_terms(model, d, "norm", 1).items()}
    if not d.norm_upcast:  # the last layer's output, saved by the final norm (every layer's input is counted there)
        terms["final_norm_input"] = model.hidden_size * d.resid / sp_div
    if sp_div > 1 and settings.engine == "fsdp2":
        terms["output_input_gathered"] = float(model.hidden_size * d.act)
    v = model.vocab_size / t
    loss = settings.resolved_loss
    if loss == "eager":
        terms.update(loss_log_softmax=v * 4, loss_nll_grad=v * 4, loss_log_softmax_grad=v * 4)
    elif loss == "compiled":
        terms.update(loss_logits_saved=v * d.act, loss_logits_grad=v * d.act)
    elif loss == "parallel":
        terms.update(loss_parallel_buffers=v * 16)
    elif loss == "fused":
        terms.update(loss_exp_logits=v * 4, loss_logits_grad=v * 2)
    else:
        n = settings.loss_chunks
        if settings.compile:
            terms.update(loss_chunk_logits_saved=v * d.act, loss_chunk_grad=v * d.act / n)
        else:
            terms.update(loss_chunk_log_softmax=v * 4, loss_chunk_grads=v * 8 / n)
    return adjust_logits_terms(terms, settings)


def loss_hole_bytes(model: ModelSpec, settings: RunSettings, *, tp: int | None = None) -> float:
    """Bytes per token the caching allocator keeps reserved but cannot reuse at the loss's peak: the 16-bit
    logits, freed before the larger fp32 loss buffers are allocated (``eager``, ``parallel`` and ``chunked``
    eager; torchtitan ``train.py`` @ ``9dec370a``: ``del pred`` before ``loss.backward()``). The fp32 copy
    ``logits.float()`` is freed too, but the first fp32 gradient of the same size reuses it."""
    t = settings.tp if tp is None else tp
    loss = settings.resolved_loss
    if loss in ("eager", "parallel") or (loss == "chunked" and not settings.compile):
        return model.vocab_size / t * block_style(settings).act
    return 0.0
