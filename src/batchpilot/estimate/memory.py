"""Analytic per-GPU training memory: model states, activations and overhead as explicit terms.

Examples::

    >>> from batchpilot.specs.model import load_model
    >>> from batchpilot.specs.settings import RunSettings
    >>> m = analytic_memory(load_model("tiny-llama-1m"), RunSettings(precision="fp32"),
    ...                     micro_batch=4, seq_len=256, overhead=OverheadModel.cpu())
    >>> m.total_bytes > m.activations_bytes > 0
    True

The step's peak is the largest of three moments (each total is in ``details``):

- ``backward_start`` (end of forward / start of backward): weights (plus 16-bit compute copies),
  optimizer states, the gradients alive then and every tensor saved for backward plus the logits/loss
  buffers (:func:`activation_terms`, :func:`logits_terms`).
- ``backward_end``: all gradients (activations freed), plus the tied input embedding's dense gradient
  before it is added into the head's.
- ``optimizer_step``: weights, all gradients, optimizer states and the step's temporaries
  (``torch.optim.AdamW(foreach=True)`` materialises one fp32 state-sized list, ``sqrt(v)``:
  :data:`OPTIMIZER_STEP_TRANSIENT_BYTES`, measured).

Categories of the returned :class:`MemoryBreakdown` are those *of the peak moment*, so they always sum
to the peak; ``details["activations_peak"]`` keeps the activation peak even when a later moment wins and
``details["peak_phase"]`` says which won (0 backward start, 1 backward end, 2 optimizer step).

Model states (``bytes_per_param``): an explicit table keyed by engine × precision × optimizer
(:data:`PARAM_BYTES`), sharded per ZeRO stage over the data-parallel group exactly as Rajbhandari et al.
2020 ("ZeRO", §3.1, §5, Figure 1, Table 1) count them: stage 1 shards optimizer states, 2 also gradients,
3 also parameters. With ``engine="deepspeed"`` and 16-bit mixed precision this reproduces the paper's
(2 + 2 + K)·Ψ with K = 12 exactly; the ZeRO-3 all-gather buffers and communication buckets are
overhead, not model state, as in the paper.

Activations per layer (:func:`activation_terms`): every tensor a transformer block saves for backward,
named, in bytes per token per GPU. For a GPT-2 block with dropout in 16-bit this is exactly Korthikanti
et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"), Table 2:
``s·b·h·(34 + 5·a·s/h)`` without parallelism, ``s·b·h·(10 + 24/t + 5·a·s/(h·t))`` with tensor
parallelism, ``/t`` everywhere with sequence parallelism, ``34·s·b·h/t`` with selective recomputation
and ``2·s·b·h`` with full recomputation (plus their 8-byte LayerNorm statistics per token, which the
paper ignores: < 0.01 %). Llama/MoE/MLA blocks are derived the same way from the ``transformers``
implementations (listed tensor by tensor in :func:`_llama_attention` and friends): GQA-sized K/V under
SDPA/flash, repeated K/V and an fp32 softmax under eager attention, four ``I``-sized SwiGLU tensors,
RMSNorm's normalised input and output (one 16-bit cast per consuming matmul under autocast), the fp32
log-softmax of the logits and two logits-sized gradients.
Known error: checked against measured CPU peaks of real steps (tests/estimate/test_memory_crosscheck.py,
within 10 %); kernels that fuse more (Megatron/TE fused norms, fused cross-entropy) save less.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from batchpilot.errors import SpecError
from batchpilot.estimate.breakdown import MemoryBreakdown
from batchpilot.specs.batch import MAX_BATCH_SEQUENCES, check_seq_len
from batchpilot.specs.hardware import MAX_DEVICES
from batchpilot.specs.model import ModelSpec
from batchpilot.specs.settings import RunSettings, check_interleaving, validate_for_model
from batchpilot.units import MIB

# ---------------------------------------------------------------------------------------------- tables
#: Bytes of one element by dtype name (the one dtype-size table of this module).
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "bool": 1}

#: Bytes per element of saved activations by precision. fp8 recipes (Transformer Engine) keep bf16
#: copies of most saved tensors for backward, so fp8 is counted like bf16 (an overestimate of ≤ ~25 %
#: of the matmul-input terms).
ACTIVATION_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 2}

#: Bytes per parameter of optimizer *state* (excluding any fp32 master copy), kept in fp32 unless noted.
#: AdamW: m and v (Kingma & Ba 2015). 8-bit Adam: two 1-byte states plus block-wise scales
#: (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization": ≈ 2 bytes/param).
#: SGD with momentum: one buffer. Adafactor (Shazeer & Stern 2018) keeps factored row/column second
#: moments, O(rows + cols) per matrix: counted as 0 per parameter (< 1 % for matrices wider than 200).
OPTIMIZER_STATE_BYTES: dict[str, int] = {"adamw": 8, "adamw-8bit": 2, "sgd-momentum": 4, "adafactor": 0}

#: Transient bytes per parameter at the peak of a ``foreach`` optimizer step (the CUDA default of
#: ``torch.optim``): ``_multi_tensor_adamw`` allocates ``torch._foreach_sqrt(exp_avg_sqs)``, one fp32
#: state-sized list, and updates everything else in place — measured 4 bytes/param on torch 2.13
#: (benchmarks/cpu_step.py, tests/estimate/test_memory_crosscheck.py). SGD with momentum updates in
#: place. Adafactor's factored update: one parameter-sized temporary (not measured). The per-tensor loop
#: (``foreach=False``, torch's CPU default) instead holds two temporaries of the largest parameter tensor
#: (``exp_avg_sq.sqrt() / bias_correction``): :data:`LOOP_STEP_TRANSIENT_TENSORS`. Fused kernels
#: (``fused=True``, DeepSpeed FusedAdam, Megatron's optimizer) update in place: 0.
OPTIMIZER_STEP_TRANSIENT_BYTES: dict[str, int] = {"adamw": 4, "adamw-8bit": 0, "sgd-momentum": 0, "adafactor": 4}

#: fp32 temporaries of the largest parameter tensor alive in a per-tensor-loop optimizer step (AdamW:
#: ``sqrt(v)`` and its bias-corrected quotient; measured: 25.2 MB = 2 × the 12.6 MB head of
#: ``tiny-llama-15m``).
LOOP_STEP_TRANSIENT_TENSORS: dict[str, int] = {"adamw": 2, "adamw-8bit": 0, "sgd-momentum": 0, "adafactor": 1}

Engine = Literal["torch", "fsdp2", "deepspeed", "megatron"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ParamBytes:
    """Model-state bytes per parameter before any sharding (one row of :data:`PARAM_BYTES`)."""

    weights: int
    """The parameters as the engine stores them for forward/backward."""
    gradients: int
    """Gradient (accumulation) buffer."""
    master: int
    """Separate fp32 master copy of the weights (mixed precision in DeepSpeed/Megatron); 0 when the
    stored weights already are fp32."""
    optimizer_state: int
    """Optimizer states proper (Adam m and v, momentum, ...)."""

    @property
    def optimizer(self) -> int:
        """ZeRO's K: master copy plus optimizer states."""
        return self.master + self.optimizer_state

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer


def _param_bytes(engine: str, precision: str, optimizer: str) -> ParamBytes:
    """One cell of the engine × precision × optimizer table (sources per engine in :data:`PARAM_BYTES`)."""
    state = OPTIMIZER_STATE_BYTES[optimizer]
    if precision == "fp32":
        return ParamBytes(weights=4, gradients=4, master=0, optimizer_state=state)
    if engine in ("torch", "fsdp2"):
        # autocast / FSDP2 MixedPrecisionPolicy: fp32 (sharded) parameters and fp32 gradients; the
        # 16-bit compute copies are transient and counted separately.
        return ParamBytes(weights=4, gradients=4, master=0, optimizer_state=state)
    if engine == "megatron":
        # Megatron-LM keeps fp32 "main" gradients (Korthikanti/Narayanan: 2 + 4 + 12).
        return ParamBytes(weights=2, gradients=4, master=4, optimizer_state=state)
    # DeepSpeed mixed precision (ZeRO paper §3.1): 16-bit weights and gradients, fp32 master + states.
    return ParamBytes(weights=2, gradients=2, master=4, optimizer_state=state)


#: The explicit bytes-per-parameter table, keyed by (engine, precision, optimizer). Rows for AdamW:
#: ``deepspeed`` bf16/fp16/fp8 2 + 2 + 12 (ZeRO paper §3.1, K = 12); ``megatron`` 2 + 4 + 12 (fp32 main
#: gradients; with the distributed optimizer, ``--zero 1``, 6 + 12/DP); ``torch``/``fsdp2`` mixed precision
#: 4 + 4 + 8 (fp32 parameters and gradients under autocast); every engine in fp32 4 + 4 + 8.
PARAM_BYTES: dict[tuple[str, str, str], ParamBytes] = {
    (e, p, o): _param_bytes(e, p, o)
    for e in ("torch", "fsdp2", "deepspeed", "megatron")
    for p in ("fp32", "bf16", "fp16", "fp8")
    for o in OPTIMIZER_STATE_BYTES
}


def bytes_per_param(settings: RunSettings) -> ParamBytes:
    """The :data:`PARAM_BYTES` row for these settings."""
    return PARAM_BYTES[(settings.engine, settings.precision, settings.optimizer)]


# ---------------------------------------------------------------------------------------------- overhead
@dataclass(frozen=True, kw_only=True, slots=True)
class OverheadModel:
    """Memory outside model states and activations; every term calibratable (the probe measures it).

    Defaults are for one NVIDIA GPU under PyTorch; :meth:`cpu` is for a CPU process (where the
    allocator returns memory to the system and there is no context) and :meth:`zero` counts nothing.
    """

    cuda_context_bytes: int = 512 * MIB
    """CUDA context + kernel images loaded by torch: 0.3–1.3 GiB depending on CUDA/torch version and lazy
    loading; 512 MiB is a mid-range H100/CUDA 12 figure (the same default as the traced
    estimate's ``CudaTerms``). Invisible to ``max_memory_allocated``, visible to OOM."""
    workspace_bytes: int = 32 * MIB
    """cuBLAS workspace: ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` = 8 × 4 MiB per stream (PyTorch
    reproducibility notes)."""
    fragmentation_fraction: float = 0.05
    """Caching-allocator slack (reserved − allocated) as a fraction of the allocated peak: blocks rounded
    to 512 B / 2 MiB and split 20 MiB segments. Typical 3–10 %; ``expandable_segments:True`` lowers it."""
    comm_buffer_bytes: int = 512 * MIB
    """Collective buffers when more than one GPU is involved: NCCL channels (``NCCL_BUFFSIZE`` 4 MiB per
    channel and peer) plus DDP/ZeRO gradient buckets (DDP ``bucket_cap_mb=25``, flattened copies)."""
    gather_layers: int = 2
    """ZeRO-3/FSDP full-shard: unsharded layers alive at once (the computing layer + one prefetched)."""
    optimizer_foreach: bool = True
    """``torch`` engine: the optimizer runs its ``foreach`` implementation (the default for CUDA tensors)
    rather than the per-tensor loop (the default for CPU tensors); see
    :data:`OPTIMIZER_STEP_TRANSIENT_BYTES`."""

    def __post_init__(self) -> None:
        for name in ("cuda_context_bytes", "workspace_bytes", "comm_buffer_bytes", "gather_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SpecError(f"overhead {name} {value!r} must be a non-negative integer")
        if not 0.0 <= self.fragmentation_fraction < 1.0:
            raise SpecError(
                f"overhead fragmentation_fraction {self.fragmentation_fraction!r} must be in [0, 1)"
            )

    @classmethod
    def cpu(cls, *, optimizer_foreach: bool = False) -> OverheadModel:
        """A CPU process: no CUDA context, workspace or fragmentation term, small (gloo) collectives, and
        torch's CPU default optimizer loop unless ``optimizer_foreach``."""
        return cls(cuda_context_bytes=0, workspace_bytes=0, fragmentation_fraction=0.0, comm_buffer_bytes=0,
                   optimizer_foreach=optimizer_foreach)

    @classmethod
    def zero(cls) -> OverheadModel:
        """Nothing but model states and activations (the ZeRO paper's and Korthikanti's accounting)."""
        return cls(cuda_context_bytes=0, workspace_bytes=0, fragmentation_fraction=0.0, comm_buffer_bytes=0,
                   gather_layers=0)


# ---------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True, kw_only=True, slots=True)
class _Layout:
    """How the run splits the model over GPUs, as far as one GPU's memory needs it."""

    tp: int
    pp: int
    ep: int
    sp: bool
    dp: int
    shard: int
    """Ranks one dense parameter's states are sharded over (ZeRO/FSDP group)."""
    expert_shard: int
    """Ranks one routed expert's states are sharded over (the expert data-parallel group)."""
    layers_per_stage: int
    in_flight: float
    """Micro-batches' worth of a whole stage's activations the first pipeline stage holds at its peak
    (:func:`first_stage_in_flight`)."""


def _layout(model: ModelSpec, settings: RunSettings, dp: int, grad_accum: int, gpus_per_node: int) -> _Layout:
    shard = min(dp, gpus_per_node) if settings.hybrid_shard else dp
    if settings.ep > dp or dp % settings.ep:
        raise SpecError(
            f"--ep {settings.ep} must divide the {dp} data-parallel ranks experts are spread over; "
            f"use a divisor of {dp} or more GPUs"
        )
    return _Layout(
        tp=settings.tp, pp=settings.pp, ep=settings.ep, sp=settings.sp and settings.tp > 1, dp=dp,
        shard=max(1, shard), expert_shard=max(1, shard // settings.ep),
        layers_per_stage=math.ceil(model.num_layers / settings.pp),
        in_flight=first_stage_in_flight(settings.pp, settings.vpp, grad_accum),
    )


def first_stage_in_flight(pp: int, vpp: int, grad_accum: int) -> float:
    """Micro-batches of activations (in units of one micro-batch through all of a stage's layers) that the
    first pipeline stage holds at its peak.

    Plain 1F1B (Narayanan et al. 2021 §2.2.1): the first stage runs ``pp − 1`` warm-up forwards, then one
    more before its first backward: min(pp, m) micro-batches of m per step. Interleaved (``vpp`` = v > 1,
    §2.2.2): Megatron's warm-up on the first rank is 2·(p − 1) + (v − 1)·p chunk forwards, +1 in the steady
    state (``megatron/core/pipeline_parallel/schedules.py``), of v·m in all, each chunk L/(p·v) layers:
    min(v·m, v·p + p − 1) / v = min(m, p + (p − 1)/v) — at m ≥ p + 1 the 1F1B memory times
    1 + (p − 1)/(p·v) (Korthikanti et al. 2022 §4.2.3)."""
    if pp == 1:
        return 1.0
    if vpp == 1:
        return float(min(pp, grad_accum))
    return min(float(grad_accum), pp + (pp - 1) / vpp)


# ---------------------------------------------------------------------------------------------- activations
def _dropout(model: ModelSpec) -> bool:
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
    dropout = _dropout(model)
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


# ---------------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True, kw_only=True, slots=True)
class _StageParams:
    """Parameters one GPU of a pipeline stage holds (before ZeRO sharding)."""

    dense: float
    """Parameters replicated across data-parallel ranks (attention, dense FFNs, shared experts, router,
    norms, embeddings), already divided by tp."""
    expert: float
    """Routed-expert parameters on this GPU (divided by ep and tp)."""
    largest_layer: float
    """The largest layer's parameters on this GPU (ZeRO-3 gathers one at a time)."""
    matmul: float
    """Parameters that are matmul weights (autocast keeps 16-bit copies of these)."""


def _stage_params(model: ModelSpec, lay: _Layout, first: bool, last: bool) -> _StageParams:
    t, layers = lay.tp, lay.layers_per_stage
    norms = model.params_norms_per_layer
    moe_share = model.num_moe_layers / model.num_layers
    routed = model.num_experts * model.params_expert
    dense_layer = (model.params_dense_layer - norms) / t + norms
    moe_layer = (model.params_moe_layer - routed - norms) / t + norms if model.is_moe else 0.0
    routed_here = routed / (lay.ep * t)
    layers_dense = layers * ((1 - moe_share) * dense_layer + moe_share * moe_layer)
    expert = layers * moe_share * routed_here
    table = model.vocab_size * model.hidden_size / t
    positions = model.max_position_embeddings * model.hidden_size if model.learned_positions else 0
    embed = 0.0
    if lay.pp == 1:
        embed = (model.params_embedding - positions) / t + positions + model.params_final_norm
    else:
        if first:
            embed += table + positions
        if last:
            embed += table + model.params_final_norm
    largest = max(dense_layer, moe_layer + routed_here if model.is_moe else 0.0)
    return _StageParams(dense=layers_dense + embed, expert=expert, largest_layer=largest,
                        matmul=layers_dense + expert - layers * norms + embed)


# ---------------------------------------------------------------------------------------------- assembly
@dataclass(frozen=True, kw_only=True, slots=True)
class ModelStates:
    """Model-state bytes on one GPU (Rajbhandari et al. 2020's "model states")."""

    weights_bytes: float
    gradients_bytes: float
    optimizer_bytes: float
    """Optimizer states including fp32 master weights (ZeRO's K·Ψ); 0 when offloaded to CPU."""
    compute_copies_bytes: float = 0.0
    """Transient 16-bit weight copies alive during forward/backward (autocast's cast cache; FSDP's
    unsharded parameters between forward and backward when not resharded): not model state."""

    @property
    def total_bytes(self) -> float:
        return self.weights_bytes + self.gradients_bytes + self.optimizer_bytes


def model_state_bytes(settings: RunSettings, *, params: float, dp: int, expert_params: float = 0.0,
                      matmul_params: float | None = None, shard: int | None = None) -> ModelStates:
    """Weights, gradients and optimizer states of ``params`` dense (+ ``expert_params`` routed-expert)
    parameters held by one GPU, sharded per ZeRO stage (Rajbhandari et al. 2020 §5.1–5.3).

    Stage 1 divides optimizer states by the shard group (``dp``, or ``shard`` for hybrid sharding),
    stage 2 also gradients, stage 3 also weights: 16-bit DeepSpeed AdamW gives (2 + 2 + 12)·Ψ,
    4Ψ + 12Ψ/N, 2Ψ + 14Ψ/N and 16Ψ/N (the paper's Figure 1 and Table 1). Routed experts are sharded over
    the expert data-parallel group ``shard / ep``. Megatron's distributed optimizer (``--zero`` ≥ 1)
    shards only optimizer states (6 + 12/DP bytes/param). FSDP2 (``engine="fsdp2"``) always shards its
    fp32 parameters; at ``--zero`` 1/2 (``reshard_after_forward=False``) it keeps the unsharded
    compute-dtype copies between forward and backward (``compute_copies_bytes``).
    """
    pb = bytes_per_param(settings)
    group = max(1, dp if shard is None else shard)
    expert_group = max(1, group // settings.ep)
    zero = settings.zero_stage
    megatron = settings.engine == "megatron"

    def per_gpu(bytes_each: float, sharded: bool) -> float:
        if not sharded:
            return bytes_each * (params + expert_params)
        return bytes_each * (params / group + expert_params / expert_group)

    fsdp_unsharded = settings.engine == "fsdp2" and zero in (1, 2)
    copies = 0.0
    if fsdp_unsharded:
        # fully_shard(reshard_after_forward=False): parameters stay sharded in fp32, and the unsharded
        # compute-dtype copies all-gathered in forward are kept until backward has used them.
        copies = ACTIVATION_BYTES[settings.precision] * (params + expert_params)
    elif settings.engine in ("torch", "fsdp2") and settings.precision != "fp32" and zero < 3:
        # autocast's cast cache: 16-bit copies of the matmul weights, saved for backward.
        matmul = params + expert_params if matmul_params is None else matmul_params
        copies = ACTIVATION_BYTES[settings.precision] * matmul
    return ModelStates(
        weights_bytes=per_gpu(pb.weights, (zero >= 3 or fsdp_unsharded) and not megatron),
        gradients_bytes=per_gpu(pb.gradients, zero >= 2 and not megatron),
        optimizer_bytes=0.0 if settings.offload else per_gpu(pb.optimizer, zero >= 1),
        compute_copies_bytes=copies,
    )


def _layer_bytes_per_token(model: ModelSpec, settings: RunSettings, seq_len: int, moe_layer: bool) -> float:
    """Sum of :func:`activation_terms`, cached (the planner evaluates thousands of micro-batch sizes).

    ``ModelSpec`` equality ignores ``hf_config``, so the config fields the terms read (dropout rates, the
    GELU variant) are part of the cache key.
    """
    config_key = (_dropout(model), str(model.hf_config.get("activation_function")))
    return _cached_layer_bytes(model, settings, seq_len, moe_layer, config_key)


@functools.lru_cache(maxsize=4096)
def _cached_layer_bytes(model: ModelSpec, settings: RunSettings, seq_len: int, moe_layer: bool,
                        config_key: tuple[bool, str]) -> float:
    return sum(activation_terms(model, settings, seq_len=seq_len, moe_layer=moe_layer).values())


def _activation_bytes(model: ModelSpec, settings: RunSettings, lay: _Layout, *, micro_batch: int,
                      seq_len: int, first: bool, last: bool) -> dict[str, float]:
    """Activation terms (bytes) of one GPU of a pipeline stage at the fwd/bwd peak."""
    tokens = float(micro_batch * seq_len)
    moe_share = model.num_moe_layers / model.num_layers
    in_flight = lay.in_flight if first else 1
    dense = _layer_bytes_per_token(model, settings, seq_len, False)
    moe = _layer_bytes_per_token(model, settings, seq_len, True) if model.is_moe else 0.0
    per_layer = (1 - moe_share) * dense + moe_share * moe
    out: dict[str, float] = {"layers": per_layer * lay.layers_per_stage * tokens * in_flight}
    if settings.recompute == "full":
        none = dataclasses.replace(settings, recompute="none")
        working = max(_layer_bytes_per_token(model, none, seq_len, m)
                      for m in ((False, True) if model.is_moe else (False,)))
        out["recompute_working_layer"] = working * tokens
    if last:
        out["logits_loss"] = sum(logits_terms(model, settings).values()) * tokens
    if first and _dropout(model):
        out["embedding_dropout_mask"] = model.hidden_size * tokens
    return out


def _check_sizes(micro_batch: int, seq_len: int, dp: int, grad_accum: int) -> None:
    """Positive whole numbers within the plausibility limits (:mod:`batchpilot.specs.batch`, ``hardware``)."""
    check_seq_len(seq_len)
    for name, value, limit in (("micro-batch", micro_batch, MAX_BATCH_SEQUENCES), ("dp", dp, MAX_DEVICES),
                               ("grad-accum", grad_accum, MAX_BATCH_SEQUENCES)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecError(f"--{name} {value!r} must be a positive integer")
        if value > limit:
            raise SpecError(f"--{name} {value} is above the limit of 2^{limit.bit_length() - 1} = {limit}; "
                            f"use a realistic value")


def analytic_memory(model: ModelSpec, settings: RunSettings, *, micro_batch: int, seq_len: int, dp: int = 1,
                    grad_accum: int = 1, overhead: OverheadModel | None = None,
                    gpus_per_node: int = 8) -> MemoryBreakdown:
    """Peak memory of the busiest GPU during one training step (bytes, per category of the peak phase).

    ``dp`` data-parallel ranks (ZeRO/FSDP shard over them; with ``hybrid_shard`` over
    ``min(dp, gpus_per_node)``), ``grad_accum`` micro-batches per step (the first pipeline stage holds
    :func:`first_stage_in_flight` of them). With pipeline parallelism the first and the last stage
    are both evaluated and the larger is returned.
    """
    _check_sizes(micro_batch, seq_len, dp, grad_accum)
    validate_for_model(settings, model)
    check_interleaving(settings, grad_accum)
    overhead = OverheadModel() if overhead is None else overhead
    lay = _layout(model, settings, dp, grad_accum, gpus_per_node)
    stages = [(True, True)] if settings.pp == 1 else [(True, False), (False, True)]
    results = [_stage_memory(model, settings, lay, overhead, micro_batch, seq_len, first, last)
               for first, last in stages]
    return max(results, key=lambda r: r.total_bytes)


@dataclass(frozen=True, kw_only=True, slots=True)
class _Phase:
    """What one GPU holds at one moment of the step (bytes per category)."""

    weights: float
    gradients: float
    activations: float
    extra: float
    """Transient buffers counted as overhead (ZeRO-3 gathers, optimizer temporaries, embedding gradient)."""

    def total(self, optimizer: float) -> float:
        return self.weights + self.gradients + self.activations + self.extra + optimizer


def _phases(model: ModelSpec, settings: RunSettings, lay: _Layout, overhead: OverheadModel,
            params: _StageParams, states: ModelStates, activations: float) -> dict[str, _Phase]:
    """The three candidate peaks of a step (see the module docstring).

    ``backward_start``: activations and loss buffers, plus the gradients that exist already — persistent
    buffers (DDP buckets, DeepSpeed/Megatron/FSDP reduce buffers) hold them all; a single-process torch
    step with ``zero_grad(set_to_none=True)`` has none yet. ``backward_end``: every gradient, plus — with
    tied embeddings on one stage — the input embedding's dense gradient before it is added into the
    output head's (V·h). ``optimizer``: every gradient plus the optimizer step's temporaries.
    """
    grads_early = 0.0 if (settings.engine == "torch" and lay.dp == 1) else states.gradients_bytes
    gather = 0.0
    if settings.zero_stage >= 3 and settings.engine != "megatron":
        gather = overhead.gather_layers * params.largest_layer * ACTIVATION_BYTES[settings.precision]
    tied = 0.0
    if model.tie_word_embeddings and lay.pp == 1 and grads_early == 0.0:
        tied = model.vocab_size * model.hidden_size / lay.tp * bytes_per_param(settings).gradients
    transient = 0.0 if settings.offload else _optimizer_transient(model, settings, params, lay, overhead)
    weights = states.weights_bytes
    return {
        "backward_start": _Phase(weights=weights + states.compute_copies_bytes, gradients=grads_early,
                                 activations=activations, extra=gather),
        "backward_end": _Phase(weights=weights, gradients=states.gradients_bytes, activations=0.0, extra=tied),
        "optimizer_step": _Phase(weights=weights, gradients=states.gradients_bytes, activations=0.0,
                                 extra=transient),
    }


def _stage_memory(model: ModelSpec, settings: RunSettings, lay: _Layout, overhead: OverheadModel,
                  micro_batch: int, seq_len: int, first: bool, last: bool) -> MemoryBreakdown:
    params = _stage_params(model, lay, first, last)
    states = model_state_bytes(settings, params=params.dense, expert_params=params.expert, dp=lay.dp,
                               matmul_params=params.matmul, shard=lay.shard)
    acts = _activation_bytes(model, settings, lay, micro_batch=micro_batch, seq_len=seq_len,
                             first=first, last=last)
    activations = sum(acts.values())
    phases = _phases(model, settings, lay, overhead, params, states, activations)
    optimizer = states.optimizer_bytes
    name, peak_phase = max(phases.items(), key=lambda item: item[1].total(optimizer))
    peak = peak_phase.total(optimizer)
    fixed = overhead.cuda_context_bytes + overhead.workspace_bytes
    if lay.dp * lay.tp * lay.pp > 1:
        fixed += overhead.comm_buffer_bytes
    frag = overhead.fragmentation_fraction * peak
    details = {f"activations_{k}": round(v) for k, v in acts.items()}
    details.update({f"{phase}_peak": round(p.total(optimizer)) for phase, p in phases.items()})
    details.update(
        resident_states=round(states.weights_bytes + optimizer), activations_peak=round(activations),
        fwd_bwd_peak=round(max(phases["backward_start"].total(optimizer), phases["backward_end"].total(optimizer))),
        compute_weight_copies=round(states.compute_copies_bytes), zero3_gather_buffer=round(phases["backward_start"].extra),
        optimizer_step_transient=round(phases["optimizer_step"].extra), fixed_overhead=round(fixed),
        fragmentation=round(frag), peak_phase=list(phases).index(name),
    )
    return MemoryBreakdown(
        weights_bytes=round(peak_phase.weights), gradients_bytes=round(peak_phase.gradients),
        optimizer_bytes=round(optimizer), activations_bytes=round(peak_phase.activations),
        overhead_bytes=round(peak_phase.extra + frag + fixed), details=details,
    )


def _optimizer_transient(model: ModelSpec, settings: RunSettings, params: _StageParams, lay: _Layout,
                         overhead: OverheadModel) -> float:
    """The optimizer step's temporary buffers for unfused ``torch`` optimizers (other engines' fused
    kernels update in place): :data:`OPTIMIZER_STEP_TRANSIENT_BYTES` per parameter this GPU updates for
    ``foreach``, :data:`LOOP_STEP_TRANSIENT_TENSORS` × its largest fp32 parameter tensor for the loop."""
    if settings.engine != "torch":
        return 0.0
    sharded = settings.zero_stage >= 1
    local = params.dense / (lay.shard if sharded else 1) + params.expert / (lay.expert_shard if sharded else 1)
    if overhead.optimizer_foreach:
        return OPTIMIZER_STEP_TRANSIENT_BYTES[settings.optimizer] * local
    widths = (model.vocab_size, model.intermediate_size, model.moe_intermediate_size,
              model.num_heads * model.head_dim_qk)
    largest = model.hidden_size * max(widths) / lay.tp
    return LOOP_STEP_TRANSIENT_TENSORS[settings.optimizer] * 4 * min(largest, local)


# ---------------------------------------------------------------------------------------------- search
def max_micro_batch(model: ModelSpec, settings: RunSettings, *, seq_len: int, dp: int = 1,
                    budget_bytes: int, grad_accum: int = 1, overhead: OverheadModel | None = None,
                    limit: int = 1 << 20) -> int:
    """Largest micro-batch whose :func:`analytic_memory` total is ≤ ``budget_bytes``; 0 if none fits.

    Memory is non-decreasing in the micro-batch, so a doubling search then bisection finds it in
    O(log B) evaluations. ``limit`` caps the answer (returned when even that fits).
    """
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 1:
        raise SpecError(f"budget {budget_bytes!r} must be a positive number of bytes")

    def fits(b: int) -> bool:
        return analytic_memory(model, settings, micro_batch=b, seq_len=seq_len, dp=dp, grad_accum=grad_accum,
                               overhead=overhead).total_bytes <= budget_bytes

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        return limit if fits(limit) else _bisect(fits, lo, limit)
    return _bisect(fits, lo, hi)


def _bisect(fits: Callable[[int], bool], lo: int, hi: int) -> int:
    """Largest b in [lo, hi) with fits(b), given fits(lo) and not fits(hi)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


__all__ = [
    "ACTIVATION_BYTES", "LOOP_STEP_TRANSIENT_TENSORS", "OPTIMIZER_STATE_BYTES", "OPTIMIZER_STEP_TRANSIENT_BYTES", "PARAM_BYTES", "ModelStates", "OverheadModel",
    "ParamBytes", "activation_terms", "analytic_memory", "bytes_per_param", "logits_terms", "max_micro_batch", "model_state_bytes",
]
