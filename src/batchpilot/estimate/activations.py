"""Activations per transformer layer: every tensor a block saves for backward, named, in bytes per token
per GPU, and the output layer's logits and loss buffers.

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
same way from the ``transformers`` implementations: GQA-sized K/V under SDPA/flash, repeated K/V and an
fp32 softmax under eager attention, four ``I``-sized SwiGLU tensors, RMSNorm's normalised input and output
(one 16-bit cast per consuming matmul under autocast), the fp32 log-softmax of the logits and two
logits-sized gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

from batchpilot.errors import SpecError
from batchpilot.estimate.dtypes import ACTIVATION_BYTES, DTYPE_BYTES
from batchpilot.specs.model import ModelSpec
from batchpilot.specs.settings import RunSettings


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


@dataclass(frozen=True, kw_only=True, slots=True)
class _Dtypes:
    act: int
    """Bytes of activations inside attention/MLP (the matmul dtype)."""
    resid: int
    """Bytes of the residual stream and norm internals: fp32 under ``torch`` autocast with fp32
    parameters (the embedding output is fp32 and ``x + attn(x)`` promotes to fp32), else the activation
    dtype (FSDP2's MixedPrecisionPolicy, DeepSpeed and Megatron run the module in 16 bits)."""

    @property
    def cast_copy(self) -> int:
        """Bytes of the 16-bit copy autocast makes of an fp32 norm output before a matmul (0 if none)."""
        return self.act if self.resid != self.act else 0


def _dtypes(settings: RunSettings) -> _Dtypes:
    act = ACTIVATION_BYTES[settings.precision]
    autocast_fp32_stream = settings.engine == "torch" and settings.precision != "fp32"
    return _Dtypes(act=act, resid=4 if autocast_fp32_stream else act)


def _norm_terms(model: ModelSpec, d: _Dtypes, prefix: str, consumers: int) -> dict[str, float]:
    """One pre-norm feeding ``consumers`` matmuls (bytes per token, before sequence-parallel division).

    LayerNorm saves its input (the residual stream, counted there) and mean/rstd (2 fp32). HF
    ``LlamaRMSNorm`` computes ``w * (x * rsqrt(mean(x²) + eps))`` and saves rsqrt (1 fp32) and the
    normalised ``x·rsqrt`` (for ``w``'s gradient). The output is saved by the matmuls it feeds: once when
    it already has the matmul dtype; under autocast with an fp32 residual stream each consuming matmul
    saves its *own* 16-bit cast (autocast caches casts of leaf weights only) — three for separate Q/K/V
    projections, two for SwiGLU's gate and up.
    """
    h = model.hidden_size
    terms: dict[str, float] = {}
    if model.norm_kind == "layernorm":
        terms[f"{prefix}_stats"] = 8.0
    else:
        terms[f"{prefix}_normalized"] = float(h * d.resid)
        terms[f"{prefix}_rstd"] = 4.0
    if d.cast_copy:
        terms[f"{prefix}_out_casts"] = float(consumers * h * d.cast_copy)
    else:
        terms[f"{prefix}_out"] = float(h * d.act)
    return terms


def _norm_consumers(model: ModelSpec) -> tuple[int, int]:
    """Matmuls reading the attention norm's and the FFN norm's output (GPT-2: fused QKV, one fc)."""
    if model.family == "gpt2":
        return 1, 1
    attention = 2 if model.family == "mla" else 3
    ffn = 2 if model.mlp_kind == "swiglu" else 1
    return attention, ffn


def _core_attention(model: ModelSpec, settings: RunSettings, d: _Dtypes, seq_len: int, heads: int,
                    kv_heads: int, dropout: bool) -> dict[str, float]:
    """Q·Kᵀ, softmax, dropout and attention over V, per token, for ``heads`` query heads on this GPU.

    Eager (``attention="eager"``): the s×s probabilities are materialised. HF Llama-style code repeats
    K/V to all heads (``repeat_kv`` copies) and runs softmax in fp32 (then casts); Korthikanti's GPT block
    keeps 16-bit scores: softmax output 2as, dropout mask as, dropout output 2as (bytes per token).
    Flash/SDPA: Q, K, V (GQA-sized: ``enable_gqa``), the fp32 log-sum-exp per head and the output (in
    ``(b, s, heads, d)`` layout, so it is also the output projection's saved input); no s² term. Selective recomputation (Korthikanti §4) drops the s² terms.
    """
    dqk, dv = model.head_dim_qk, model.head_dim_v
    terms: dict[str, float] = {"attn_q": float(heads * dqk * d.act)}
    if settings.attention == "flash":
        terms["attn_k"] = float(kv_heads * dqk * d.act)
        terms["attn_v"] = float(kv_heads * dv * d.act)
        terms["attn_lse"] = float(heads * 4)
        return terms
    hf_style = model.family != "gpt2"
    kv_saved = heads if hf_style else kv_heads
    terms["attn_k"] = float(kv_saved * dqk * d.act)
    terms["attn_v"] = float(kv_saved * dv * d.act)
    if settings.recompute == "selective":
        return terms
    scores = heads * seq_len
    if hf_style:
        terms["attn_softmax_fp32"] = float(scores * 4)
        if d.act != 4:
            terms["attn_probs_cast"] = float(scores * d.act)
    else:
        terms["attn_softmax"] = float(scores * d.act)
    if dropout:
        terms["attn_dropout_mask"] = float(scores * DTYPE_BYTES["bool"])
        terms["attn_dropout_out"] = float(scores * d.act)
    return terms


def _attention(model: ModelSpec, settings: RunSettings, d: _Dtypes, seq_len: int, tp: int,
               dropout: bool) -> dict[str, float]:
    """Attention block (without its norm) per token on one tensor-parallel rank."""
    heads = model.num_heads // tp
    kv_heads = max(1, model.num_kv_heads // tp)
    terms: dict[str, float] = {}
    if model.family == "mla":
        terms.update(_mla_projections(model, d, heads))
        kv_heads = heads  # K/V are decompressed to every head for training
    terms.update(_core_attention(model, settings, d, seq_len, heads, kv_heads, dropout))
    terms["attn_proj_in"] = float(heads * model.head_dim_v * d.act)
    return terms


def _mla_projections(model: ModelSpec, d: _Dtypes, heads: int) -> dict[str, float]:
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


def _ffn(model: ModelSpec, settings: RunSettings, d: _Dtypes, width: int, prefix: str) -> dict[str, float]:
    """One FFN of ``width`` (already divided by tp) per token it processes.

    SwiGLU ``down(silu(gate(x)) * up(x))``: gate output (SiLU input), up output, SiLU output, the product
    (the down-projection input): 4·I. GELU MLP with a fused GELU (Korthikanti; Megatron): fc1 output
    (GELU input, 8sbh) and GELU output (fc2 input, 8sbh): 2·I. GPT-2's ``gelu_new`` in ``transformers``
    is elementwise Python, ``0.5·x·(1 + tanh(c·(x + 0.044715·x³)))``, and also saves ``0.5·x``, the
    tanh output and ``1 + tanh``: 5·I (every engine but ``megatron``).
    """
    count = 4 if model.mlp_kind == "swiglu" else 2
    if model.mlp_kind == "gelu" and settings.engine != "megatron" \
            and model.hf_config.get("activation_function") == "gelu_new":
        count = 5
    return {f"{prefix}": float(count * width * d.act)}


def _moe(model: ModelSpec, settings: RunSettings, d: _Dtypes, tp: int) -> dict[str, float]:
    """MoE FFN per token (Mixtral/DeepSeek in ``transformers``): router logits (16-bit) and their fp32
    softmax, per routed copy the gathered expert input and the expert output (for the routing-weight
    product), each expert's FFN; shared experts see every token. Balanced routing assumed (capacity
    factor 1); expert parallelism moves tokens, it does not change the per-rank count on average."""
    k, e, h = model.num_experts_per_token, model.num_experts, model.hidden_size
    terms = {"moe_router": float(e * (d.act + 4))}
    terms["moe_dispatch"] = float(k * 2 * h * d.act)
    width = max(1, model.moe_intermediate_size // tp)
    terms["moe_experts"] = k * _ffn(model, settings, d, width, "x")["x"]
    if model.num_shared_experts:
        terms["moe_shared"] = model.num_shared_experts * _ffn(model, settings, d, width, "x")["x"]
    return terms


def activation_terms(model: ModelSpec, settings: RunSettings, *, seq_len: int, moe_layer: bool = False,
                     tp: int | None = None) -> dict[str, float]:
    """Bytes per token saved for backward by one transformer layer on one GPU, by named tensor.

    Residual-stream tensors (layer input, post-attention residual), norm outputs and dropout masks after
    the projections live outside the tensor-parallel regions: replicated over tp, divided by tp only with
    sequence parallelism (Korthikanti §4.2). Everything inside attention/MLP is divided by tp. Full
    recomputation keeps only the layer input (Korthikanti Table 2: 2sbh).
    """
    t = settings.tp if tp is None else tp
    d = _dtypes(settings)
    sp_div = t if (settings.sp and t > 1) else 1
    h = model.hidden_size
    if settings.recompute == "full":
        return {"layer_input": h * d.resid / sp_div}
    dropout = dropout_enabled(model)
    outside: dict[str, float] = {"layer_input": float(h * d.resid), "attn_residual": float(h * d.resid)}
    attn_consumers, ffn_consumers = _norm_consumers(model)
    outside.update(_norm_terms(model, d, "norm1", attn_consumers))
    outside.update(_norm_terms(model, d, "norm2", ffn_consumers))
    if dropout:
        outside["attn_proj_dropout_mask"] = float(h)
        outside["mlp_dropout_mask"] = float(h)
    inside = _attention(model, settings, d, seq_len, t, dropout)
    if moe_layer:
        inside.update(_moe(model, settings, d, t))
    else:
        inside.update(_ffn(model, settings, d, max(1, model.intermediate_size // t), "mlp"))
    terms = {name: value / sp_div for name, value in outside.items()}
    terms.update(inside)
    return terms


def logits_terms(model: ModelSpec, settings: RunSettings, *, tp: int | None = None) -> dict[str, float]:
    """Bytes per token of the output layer and loss on the last stage (vocabulary split over tp).

    The final norm (as any norm) and the unfused cross-entropy of PyTorch/HF (``logits.float()`` then
    ``log_softmax`` + ``nll_loss``) at its peak, the start of the backward pass: the saved fp32
    log-softmax output, ``nll_loss``'s V-wide gradient and ``log_softmax``'s gradient — 12 bytes per token
    per vocabulary entry whatever the precision. The logits themselves (16-bit or fp32) are saved by
    nothing and freed once the loss is computed. These are the "logits and their gradient" that dominate
    at 128k+ vocabularies; fused/chunked cross-entropy kernels (Liger, Megatron's vocab-parallel loss)
    keep less.
    """
    t = settings.tp if tp is None else tp
    d = _dtypes(settings)
    v = model.vocab_size / t
    terms = {f"final_{k}": val for k, val in _norm_terms(model, d, "norm", 1).items()}
    terms["loss_log_softmax"] = v * 4
    terms["loss_nll_grad"] = v * 4
    terms["loss_log_softmax_grad"] = v * 4
    return terms
