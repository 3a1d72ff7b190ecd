"""Per-op compute time of one micro-batch on one GPU: every GEMM, the attention kernel, every memory-bound op.

A transformer layer is listed op by op (:func:`dense_layer`, :func:`moe_layer`, :func:`head`) with the
shape one GPU runs — M = b·s/cp rows (context parallelism splits the sequence; tensor parallelism t splits
each GEMM's N or K, never M), heads ÷ t, experts ÷ ep — and each op is timed with the generation's
kernel profile (:mod:`batchpilot.estimate.kernels`):

- GEMM (M×N×K): ``max(2MNK / (peak × e_gemm), (MK + KN + MN)·bytes / (HBM × e_mem))`` forward; the
  backward runs two GEMMs of the same FLOPs (input and weight gradients). FP8 runs the layers' linear
  GEMMs at the fp8 peak and fp8 efficiency and pays the casts (below); attention, the router and the
  output head stay in bf16 (Transformer Engine and torchao both leave them out).
- Attention: FLOPs as the FlashAttention benchmarks count them — 2·s²·heads·(d_qk + d_v) per sequence
  forward, halved under the causal mask, backward 2.5× — at the profile's published speed for the
  kernel and the sequence length (a flash kernel skips the masked half). ``eager`` attention
  materialises the s×s scores: two batched GEMMs over the whole square plus the softmax's bytes.
- Memory-bound ops: bytes moved ÷ (HBM × e_mem). Bytes per element (2-byte activations; fp32 runs
  twice that), eager PyTorch ↔ fused (Transformer Engine / Megatron kernels or ``torch.compile``):

  ============================  ================  ===============  ===========================
  op (width per token)          eager fwd / bwd   fused fwd / bwd  eager: why
  ============================  ================  ===============  ===========================
  RMSNorm (h)                   36 / 72           4 / 6            upcast, pow, mean, mul, cast, weight: 6 kernels
  LayerNorm (h)                 4 / 6             4 / 6            one native kernel either way
  residual add (h), ×2          6 / 6             4 / 4            read two, write one; fused into the norm
  rotary on q and k             24 / 24           4 / 4            cos/sin products, rotate_half (slice, neg, cat)
  attention output copy (q)     4 / 4             0 / 0            transpose(1, 2).contiguous()
  SwiGLU (I)                    10 / 16           6 / 10           silu then mul (2 kernels) vs one
  GELU (I)                      4 / 6             4 / 6            one kernel either way
  cross-entropy (V/t)           18 / 18           4 / 4            fp32 upcast, log-softmax, its backward, cast
  MoE permute + unpermute (k·h) 8 / 8             8 / 8            gather tokens to experts and back
  embedding (h)                 4 / 12            4 / 12           gather; sorted scatter-add backward
  ============================  ================  ===============  ===========================

  Norms and residual adds run on b·s/t rows with sequence parallelism, on b·s rows otherwise (every
  tensor-parallel rank repeats them). These byte counts are derived from the op definitions (read +
  write of each kernel), not fitted; their known error is the fusion a framework adds on its own.
- FP8 casts: every linear GEMM quantises its input and, in backward, its output gradient; Hopper's fp8
  GEMMs need the transposed copy too. Bytes per quantised element: :data:`FP8_CAST_BYTES` by recipe.
  Weights are cast once per micro-batch (a K×N tensor, amortised over the tokens).
- Launch overhead: :data:`KERNEL_GAP_S` of idle GPU between consecutive kernels, and in eager mode the
  host must issue every kernel (:data:`HOST_LAUNCH_S` each): a layer takes
  ``max(GPU time + kernels × gap, kernels × host time)``. CUDA graphs remove the host bound.

The recomputation policies repeat forward parts (:func:`recompute_parts`). Everything here is a pure
function of specs; :class:`batchpilot.estimate.steptime.StepTimeModel` assembles it into a step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from batchpilot.estimate.kernels import KernelProfile
from batchpilot.specs.hardware import AcceleratorSpec
from batchpilot.specs.model import ModelSpec

OpClass = Literal["gemm", "attention", "elementwise", "loss", "fp8_cast", "moe_routing", "launch"]
OP_CLASSES: tuple[OpClass, ...] = ("gemm", "attention", "elementwise", "loss", "fp8_cast", "moe_routing", "launch")

FP8_CAST_BYTES: dict[str, float] = {"tensorwise": 6.0, "rowwise": 10.0, "delayed": 4.0, "mxfp8": 4.0,
                                    "blockwise": 4.0}
"""DRAM bytes per quantised element (fwd input, bwd output gradient) by the settings' fp8 recipe: read bf16 (2)
+ write fp8 (1) + the transposed fp8 copy Hopper's fp8 GEMMs need (1) = 4 (Transformer Engine's fused
cast-transpose with ``delayed`` scaling; MX and block scaling quantise both layouts in one pass); dynamic
per-tensor scaling (torchao ``tensorwise``, Transformer Engine's current scaling) first reads the tensor once
more for its amax (+2) = 6; ``rowwise`` scales along the axis each GEMM reduces over, so every operand is
quantised twice from bf16 (rows for one GEMM, columns for the other; an fp8 copy cannot be transposed to the other
scaling), each an amax read, a read and an fp8 write: 2 × 5 = 10. Derived from what the kernels read and write."""

FP8_GEMM_FRACTION: dict[str, float] = {"rowwise": 0.9}
"""fp8 GEMM speed of a recipe ÷ the tensor-wise cuBLAS GEMM the profile's fp8 efficiency measures (others: 1).
Row-wise scaling runs a CUTLASS kernel in PyTorch: 'Most shapes are within 90-100% of tensor-wise efficiency,
but there's a long tail going down to 50%' (pytorch/pytorch issue 147971, H100, fast accumulation): 0.9.
Block-wise (1×128 / 128×128) scaling: DeepGEMM 'achieves up to 1550 TFLOPS on H800' (deepseek-ai/DeepGEMM
README at 54e2261, 2025-04-18 news), 78 % of the fp8 peak against 70.9 % for tensor-wise cuBLAS (the profile's
figure): not slower, 1 (FBGEMM's 2024 CUTLASS block kernel ran 0.77 of its row-wise one, pytorch/FBGEMM PR 2546;
newer kernels closed that gap). MX block scaling is native to Blackwell's tensor cores: 1."""

FP8_COMPILED_CAST_FRACTION = 0.5
"""Under ``torch.compile`` torchao's amax and cast fuse into the producing op (the norm, the activation):
half the standalone bytes is assumed (the write of the fp8 copy stays)."""

KERNEL_GAP_S = 2e-6
"""Idle GPU time between two back-to-back kernels of one stream (launch latency the queue does not hide).
An assumption of the order NVIDIA's CUDA Graphs post reports for short kernels, not a measurement."""

HOST_LAUNCH_S = 8e-6
"""Host (Python + dispatcher + launch) time per kernel in eager PyTorch: the GPU starves when its
kernels are shorter. An assumption (order of magnitude), not a measurement; CUDA graphs remove it."""

FLASH_BACKWARD_FLOPS_RATIO = 2.5
"""Backward FLOPs of a flash attention kernel ÷ forward FLOPs (five matmuls against two; the FlashAttention
benchmarks' convention, benchmarks/benchmark_flash_attention.py)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Implementation:
    """How the step's kernels are implemented: what its time depends on beyond shapes and hardware."""

    fused: bool
    """Fused memory-bound kernels (Transformer Engine / Megatron, or ``torch.compile``) instead of eager ops."""
    attention_kernel: str
    """``eager`` or a flash kernel of :data:`batchpilot.estimate.kernels.ATTENTION_KERNELS`."""
    fp8_recipe: str = "tensorwise"
    """Scaling recipe of fp8 runs (:data:`FP8_CAST_BYTES`)."""
    compiled: bool = False
    """``torch.compile``: fused elementwise ops and fp8 casts fused into their producers."""
    fused_loss: bool = False
    """A fused cross-entropy (Megatron's vocab-parallel one, or compiled) instead of the fp32 eager one."""
    cuda_graphs: bool = False
    """Whole-layer CUDA graphs: no host launch bound."""
    tp_comm_overlap: bool = False
    """Tensor-parallel collectives overlapped with the GEMMs they feed (Transformer Engine's userbuffers,
    torchtitan's async TP): only what exceeds the layers' GEMM time is exposed."""
    ep_comm_overlap: bool = False
    """Expert-parallel all-to-alls overlapped with another micro-batch's compute (Megatron's
    ``overlap_moe_expert_parallel_comm``, DeepSeek-V3's DualPipe): only what exceeds the compute is exposed."""
    deduplicated_dispatch: bool = False
    """Expert dispatch that sends each token once per destination node and forwards it over NVLink there, in fp8
    for fp8 runs (DeepEP, Megatron's ``flex`` dispatcher; DeepSeek-V3 §3.2.2), instead of one copy per expert."""
    dualpipe: bool = False
    """DeepSeek-V3's DualPipe schedule (arXiv:2412.19437 §3.2.1): micro-batches fed from both pipeline ends, a
    forward and a backward chunk overlapped so that all-to-all and pipeline sends hide behind compute; bubble
    (p/2 − 1)·(F&B + B − 3W) (its Table 2) instead of 1F1B's (p − 1)·(F + B)."""

    def __post_init__(self) -> None:
        if self.fp8_recipe not in FP8_CAST_BYTES:
            raise ValueError(f"unknown fp8 recipe {self.fp8_recipe!r}; use one of {', '.join(FP8_CAST_BYTES)}")


@dataclass(kw_only=True, slots=True)
class Parts:
    """Seconds by op class (:data:`OP_CLASSES`) of one pass over some ops."""

    gemm: float = 0.0
    attention: float = 0.0
    elementwise: float = 0.0
    loss: float = 0.0
    fp8_cast: float = 0.0
    moe_routing: float = 0.0
    launch: float = 0.0
    kernels: float = 0.0
    """Kernels launched (a count, not seconds)."""
    gemm_flops: float = 0.0
    """FLOPs of the GEMMs timed (2·M·N·K each; a count, not seconds)."""

    @property
    def total_s(self) -> float:
        """Seconds over :data:`OP_CLASSES`, summed in their order (as ``sum`` would, written out: the planner
        reads it hundreds of thousands of times)."""
        return (0.0 + self.gemm + self.attention + self.elementwise + self.loss + self.fp8_cast + self.moe_routing
                + self.launch)

    def add(self, other: Parts, scale: float = 1.0) -> Parts:
        """Add ``scale`` × ``other`` field by field (every field, :data:`_PARTS_FIELDS` order)."""
        self.gemm += scale * other.gemm
        self.attention += scale * other.attention
        self.elementwise += scale * other.elementwise
        self.loss += scale * other.loss
        self.fp8_cast += scale * other.fp8_cast
        self.moe_routing += scale * other.moe_routing
        self.launch += scale * other.launch
        self.kernels += scale * other.kernels
        self.gemm_flops += scale * other.gemm_flops
        return self

    def scaled(self, scale: float) -> Parts:
        return Parts().add(self, scale)

    def as_dict(self) -> dict[str, float]:
        return {c: getattr(self, c) for c in OP_CLASSES}


_PARTS_FIELDS = ("gemm", "attention", "elementwise", "loss", "fp8_cast", "moe_routing", "launch", "kernels",
                 "gemm_flops")
"""Every field of :class:`Parts` in declaration order (:meth:`Parts.add` writes them out; a test checks the list)."""


@dataclass(kw_only=True, slots=True)
class LayerTimes:
    """One layer's (or the head's) forward and backward for one micro-batch, and what recomputation repeats."""

    forward: Parts
    backward: Parts
    attention_forward: Parts
    """The attention core's forward alone (what Megatron's selective recomputation repeats)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Shape:
    """What one GPU runs for one micro-batch (module docstring)."""

    tokens: float
    """M: rows of every GEMM, b·s/cp."""
    seq: int
    """Sequence length the attention kernel sees per query chunk: s/cp."""
    sequences: float
    """Micro-batch sequences b."""
    tp: int
    sp: bool
    ep: int
    cp: int
    precision: str


class _Timer:
    """Times ops on one accelerator with one profile and implementation; collects :class:`Parts`."""

    def __init__(self, accelerator: AcceleratorSpec, profile: KernelProfile, impl: Implementation,
                 precision: str, sustained: float) -> None:
        self.profile, self.impl, self.precision = profile, impl, precision
        dtype = "fp32" if precision == "fp32" else "bf16"
        self.peak = accelerator.peak_flops_per_s(dtype)
        self.fp8_peak = accelerator.peak_flops_per_s("fp8") if precision == "fp8" else 0.0
        self.hbm = accelerator.memory_bandwidth_bytes_per_s * profile.memory_efficiency
        self.act_bytes = 4.0 if precision == "fp32" else 2.0
        self.sustained = sustained
        self.gemm_rate = self.peak * profile.gemm_fraction(dtype) * sustained
        recipe = FP8_GEMM_FRACTION.get(impl.fp8_recipe, 1.0)
        self.fp8_rate = self.fp8_peak * profile.gemm_fraction("fp8") * recipe * sustained if self.fp8_peak else 0.0

    def gemm(self, parts_fwd: Parts, parts_bwd: Parts, m: float, n: float, k: float, *, count: float = 1.0,
             fp8: bool = False) -> None:
        """``count`` GEMMs of m×n×k forward (and their two backward GEMMs)."""
        if m <= 0 or n <= 0 or k <= 0:
            return
        fp8 = fp8 and self.fp8_rate > 0
        rate, in_bytes = (self.fp8_rate, 1.0) if fp8 else (self.gemm_rate, self.act_bytes)
        flops = 2.0 * m * n * k
        fwd = max(flops / rate, ((m * k + k * n) * in_bytes + m * n * self.act_bytes) / self.hbm)
        dgrad = max(flops / rate, ((m * n + k * n) * in_bytes + m * k * self.act_bytes) / self.hbm)
        wgrad = max(flops / rate, ((m * n + m * k) * in_bytes + k * n * 4.0) / self.hbm)
        parts_fwd.gemm += count * fwd
        parts_bwd.gemm += count * (dgrad + wgrad)
        parts_fwd.gemm_flops += count * flops
        parts_bwd.gemm_flops += 2 * count * flops
        parts_fwd.kernels += count
        parts_bwd.kernels += 2 * count
        if fp8:
            self._casts(parts_fwd, parts_bwd, m, n, k, count)

    def _casts(self, fwd: Parts, bwd: Parts, m: float, n: float, k: float, count: float) -> None:
        per_element = FP8_CAST_BYTES[self.impl.fp8_recipe]
        if self.impl.compiled:
            per_element *= FP8_COMPILED_CAST_FRACTION
        fwd.fp8_cast += count * (m * k + k * n) * per_element / self.hbm
        bwd.fp8_cast += count * m * n * per_element / self.hbm
        fwd.kernels += 2 * count
        bwd.kernels += count

    def memory(self, parts: Parts, cls: OpClass, elements: float, bytes_per_element: float, kernels: float) -> None:
        """A memory-bound op over ``elements`` 2-byte elements (fp32 runs: twice the bytes)."""
        parts_value = getattr(parts, cls) + elements * bytes_per_element * self.act_bytes / 2.0 / self.hbm
        setattr(parts, cls, parts_value)
        parts.kernels += kernels

    def elementwise(self, fwd: Parts, bwd: Parts, cls: OpClass, elements: float, eager: tuple[float, float, int, int],
                    fused: tuple[float, float, int, int]) -> None:
        fb, bb, fk, bk = fused if self.impl.fused else eager
        self.memory(fwd, cls, elements, fb, fk)
        self.memory(bwd, cls, elements, bb, bk)

    def attention(self, fwd: Parts, bwd: Parts, core: Parts, sh: Shape, heads: float, d_qk: int, d_v: int) -> None:
        """The attention core of one layer: ``heads`` heads on this GPU (module docstring)."""
        if self.impl.attention_kernel == "eager":
            self._eager_attention(fwd, bwd, core, sh, heads, d_qk, d_v)
            return
        _, curve = self.profile.attention_curve(self.impl.attention_kernel)
        chunk = sh.seq
        full_flops = 2.0 * chunk * chunk * heads * (d_qk + d_v) * sh.sequences * sh.cp  # this rank's query chunk
        flops = full_flops / 2.0  # causal: the masked half is skipped
        rate = self.peak
        forward = flops / (rate * curve.forward_fraction(chunk, causal=True))
        backward = FLASH_BACKWARD_FLOPS_RATIO * flops / (rate * curve.backward_fraction(chunk, causal=True))
        for parts, seconds, kernels in ((fwd, forward, 1), (core, forward, 1), (bwd, backward, 2)):
            parts.attention += seconds
            parts.kernels += kernels

    def _eager_attention(self, fwd: Parts, bwd: Parts, core: Parts, sh: Shape, heads: float, d_qk: int,
                         d_v: int) -> None:
        """Scores and weighted values as batched GEMMs over the whole s×s square, plus the softmax's bytes
        (fused scale-mask-softmax: 4 / 6 bytes per score element; eager: scale, mask, fp32 softmax, cast
        12 / 16)."""
        s, b = sh.seq * sh.cp, sh.sequences
        queries = s / sh.cp
        a_f, a_b = Parts(), Parts()
        self.gemm(a_f, a_b, queries, s, d_qk, count=b * heads)
        self.gemm(a_f, a_b, queries, d_v, s, count=b * heads)
        softmax = (4.0, 6.0, 1, 1) if self.impl.fused else (12.0, 16.0, 4, 4)
        scores = b * heads * queries * s
        self.memory(a_f, "attention", scores, softmax[0], softmax[2])
        self.memory(a_b, "attention", scores, softmax[1], softmax[3])
        for src, dst in ((a_f, fwd), (a_f, core), (a_b, bwd)):
            dst.attention += src.gemm + src.attention
            dst.kernels += src.kernels


def _rows(sh: Shape) -> float:
    """Rows of the norms and residual adds: b·s/cp/t with sequence parallelism, b·s/cp otherwise."""
    return sh.tokens / sh.tp if sh.sp and sh.tp > 1 else sh.tokens


def _norm(timer: _Timer, fwd: Parts, bwd: Parts, model: ModelSpec, rows: float, width: float) -> None:
    if model.norm_kind == "rmsnorm":
        timer.elementwise(fwd, bwd, "elementwise", rows * width, (36.0, 72.0, 6, 10), (4.0, 6.0, 1, 1))
    else:
        timer.elementwise(fwd, bwd, "elementwise", rows * width, (4.0, 6.0, 1, 2), (4.0, 6.0, 1, 2))


def _attention_block(timer: _Timer, fwd: Parts, bwd: Parts, core: Parts, model: ModelSpec, sh: Shape) -> None:
    """Norm, projections, rotary, attention core, output projection, residual add."""
    h, t, m = model.hidden_size, sh.tp, sh.tokens
    fp8 = sh.precision == "fp8"
    heads = model.num_heads / t
    _norm(timer, fwd, bwd, model, _rows(sh), h)
    if model.family == "mla":
        q_out = model.num_heads * model.head_dim_qk / t
        if model.q_lora_rank:
            timer.gemm(fwd, bwd, m, model.q_lora_rank, h, fp8=fp8)
            timer.gemm(fwd, bwd, m, q_out, model.q_lora_rank, fp8=fp8)
        else:
            timer.gemm(fwd, bwd, m, q_out, h, fp8=fp8)
        timer.gemm(fwd, bwd, m, model.kv_lora_rank + model.qk_rope_head_dim, h, fp8=fp8)
        kv_b = model.num_heads * (model.head_dim_qk - model.qk_rope_head_dim + model.head_dim_v) / t
        timer.gemm(fwd, bwd, m, kv_b, model.kv_lora_rank, fp8=fp8)
        rotary = m * (heads + 1) * model.qk_rope_head_dim
    else:
        kv_heads = model.num_kv_heads / min(t, model.num_kv_heads)  # replicated when t > kv heads
        timer.gemm(fwd, bwd, m, heads * model.head_dim_qk + kv_heads * (model.head_dim_qk + model.head_dim_v), h,
                   fp8=fp8)
        rotary = 0.0 if model.learned_positions else m * (heads + kv_heads) * model.head_dim_qk
    if rotary:
        timer.elementwise(fwd, bwd, "elementwise", rotary, (24.0, 24.0, 6, 6), (4.0, 4.0, 1, 1))
    timer.attention(fwd, bwd, core, sh, heads, model.head_dim_qk, model.head_dim_v)
    timer.elementwise(fwd, bwd, "elementwise", m * heads * model.head_dim_v, (4.0, 4.0, 1, 1), (0.0, 0.0, 0, 0))
    timer.gemm(fwd, bwd, m, h, heads * model.head_dim_v, fp8=fp8)
    timer.elementwise(fwd, bwd, "elementwise", _rows(sh) * h, (6.0, 6.0, 1, 1), (4.0, 4.0, 0, 0))


def _mlp(timer: _Timer, fwd: Parts, bwd: Parts, model: ModelSpec, rows: float, width: float, *, count: float = 1.0,
         fp8: bool) -> None:
    """One FFN of inner width ``width`` (already ÷ t) over ``rows`` tokens, ``count`` times (experts)."""
    h = model.hidden_size
    if model.mlp_kind == "swiglu":
        timer.gemm(fwd, bwd, rows, 2 * width, h, count=count, fp8=fp8)
        timer.elementwise(fwd, bwd, "elementwise", count * rows * width, (10.0, 16.0, 2, 4), (6.0, 10.0, 1, 1))
    else:
        timer.gemm(fwd, bwd, rows, width, h, count=count, fp8=fp8)
        timer.elementwise(fwd, bwd, "elementwise", count * rows * width, (4.0, 6.0, 1, 1), (4.0, 6.0, 1, 1))
    timer.gemm(fwd, bwd, rows, h, width, count=count, fp8=fp8)


def _layer(timer: _Timer, model: ModelSpec, sh: Shape, *, moe: bool) -> LayerTimes:
    fwd, bwd, core = Parts(), Parts(), Parts()
    _attention_block(timer, fwd, bwd, core, model, sh)
    h, t, m = model.hidden_size, sh.tp, sh.tokens
    fp8 = sh.precision == "fp8"
    _norm(timer, fwd, bwd, model, _rows(sh), h)
    if not moe:
        _mlp(timer, fwd, bwd, model, m, model.intermediate_size / t, fp8=fp8)
    else:
        k, experts = model.num_experts_per_token, model.num_experts
        router_f, router_b = Parts(), Parts()
        routed = m / t  # each tensor-parallel rank routes its sequence-parallel share (experts are not TP-split)
        timer.gemm(router_f, router_b, routed, experts, h)
        local = experts / sh.ep
        per_expert = routed * k / local  # the tokens of ep ranks, spread over this rank's experts
        timer.memory(router_f, "moe_routing", routed * k * h, 8.0, 4)
        timer.memory(router_b, "moe_routing", routed * k * h, 8.0, 4)
        for src, dst in ((router_f, fwd), (router_b, bwd)):
            dst.moe_routing += src.gemm + src.moe_routing
            dst.kernels += src.kernels
            dst.gemm_flops += src.gemm_flops
        _mlp(timer, fwd, bwd, model, per_expert, model.moe_intermediate_size, count=local, fp8=fp8)
        if model.num_shared_experts:
            _mlp(timer, fwd, bwd, model, m, model.moe_intermediate_size * model.num_shared_experts / t, fp8=fp8)
    timer.elementwise(fwd, bwd, "elementwise", _rows(sh) * h, (6.0, 6.0, 1, 1), (4.0, 4.0, 0, 0))
    return LayerTimes(forward=fwd, backward=bwd, attention_forward=core)


def dense_layer(accelerator: AcceleratorSpec, profile: KernelProfile, impl: Implementation, model: ModelSpec,
                sh: Shape, *, sustained: float = 1.0) -> LayerTimes:
    """One dense transformer layer (module docstring)."""
    return _finish(_layer(_Timer(accelerator, profile, impl, sh.precision, sustained), model, sh, moe=False), impl)


def moe_layer(accelerator: AcceleratorSpec, profile: KernelProfile, impl: Implementation, model: ModelSpec,
              sh: Shape, *, sustained: float = 1.0) -> LayerTimes:
    """One mixture-of-experts layer: router GEMM (bf16), permute/unpermute, the local experts' grouped GEMMs
    at the tokens each receives (b·s·k·ep/(E·t), balanced routing), shared experts (tensor-parallel like a dense
    MLP). Routed experts are not tensor-parallel (Megatron-Core's expert tensor parallelism 1, its default): with
    t > 1 each rank routes the b·s/t tokens of its sequence-parallel share (Megatron requires sequence
    parallelism for MoE with tensor parallelism)."""
    return _finish(_layer(_Timer(accelerator, profile, impl, sh.precision, sustained), model, sh, moe=True), impl)


def head(accelerator: AcceleratorSpec, profile: KernelProfile, impl: Implementation, model: ModelSpec,
         sh: Shape, *, sustained: float = 1.0) -> LayerTimes:
    """Embedding, final norm, output GEMM (bf16, vocabulary ÷ t) and cross-entropy."""
    timer = _Timer(accelerator, profile, impl, sh.precision, sustained)
    fwd, bwd = Parts(), Parts()
    h, m = model.hidden_size, sh.tokens
    timer.elementwise(fwd, bwd, "elementwise", m * h, (4.0, 12.0, 1, 3), (4.0, 12.0, 1, 3))
    _norm(timer, fwd, bwd, model, _rows(sh), h)
    timer.gemm(fwd, bwd, m, model.vocab_size / sh.tp, h)
    loss = (4.0, 4.0, 1, 1) if impl.fused_loss else (18.0, 18.0, 3, 3)
    timer.memory(fwd, "loss", m * model.vocab_size / sh.tp, loss[0], loss[2])
    timer.memory(bwd, "loss", m * model.vocab_size / sh.tp, loss[1], loss[3])
    return _finish(LayerTimes(forward=fwd, backward=bwd, attention_forward=Parts()), impl)


def _finish(times: LayerTimes, impl: Implementation) -> LayerTimes:
    """Add launch overhead: gaps between kernels, and in eager mode the host's issue rate as a floor."""
    for parts in (times.forward, times.backward, times.attention_forward):
        gpu = parts.total_s
        parts.launch = parts.kernels * KERNEL_GAP_S
        if not impl.cuda_graphs:
            parts.launch = max(parts.launch, parts.kernels * HOST_LAUNCH_S - gpu)
    return times


def recompute_parts(times: LayerTimes, policy: str) -> Parts:
    """What one checkpointed layer's recomputation repeats: ``full`` its whole forward; ``selective`` the
    attention core (Megatron, Korthikanti et al. 2022 §5); ``op`` (torchtitan's per-op policy, which saves
    the outputs of matmuls, attention and collectives except every second matmul) half the forward GEMMs
    and their casts, and every memory-bound op (norms, activations, rotary, routing are not saved); ``none``
    nothing."""
    if policy == "full":
        return times.forward.scaled(1.0)
    if policy == "selective":
        return times.attention_forward.scaled(1.0)
    if policy == "op":
        f = times.forward
        return Parts(gemm=f.gemm / 2, elementwise=f.elementwise, fp8_cast=f.fp8_cast / 2, moe_routing=f.moe_routing,
                     launch=f.launch * (f.kernels - times.attention_forward.kernels) / max(f.kernels, 1.0),
                     kernels=f.kernels - times.attention_forward.kernels)
    if policy == "none":
        return Parts()
    raise ValueError(f"recomputation policy {policy!r} has no time model; use none, selective, op or full")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def layers_on_stage(model: ModelSpec, pp: int) -> tuple[float, float]:
    """(dense, MoE) layers on the slowest pipeline stage: ⌈L/p⌉ layers in the model's dense/MoE proportion."""
    per_stage = ceil_div(model.num_layers, pp)
    moe_share = model.num_moe_layers / model.num_layers
    return per_stage * (1 - moe_share), per_stage * moe_share


def check_finite(value: float, what: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} is not a finite non-negative time: {value!r}")
    return value
