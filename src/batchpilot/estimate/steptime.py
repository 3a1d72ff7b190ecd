"""Step-time model: FLOPs, compute time, communication, pipeline bubble and optimizer step per training step.

Example (CPU, instant)::

    >>> from batchpilot.specs.model import load_model
    >>> from batchpilot.specs.hardware import load_accelerator, ClusterSpec
    >>> from batchpilot.specs.settings import RunSettings
    >>> from batchpilot.specs.batch import BatchTriad
    >>> cluster = ClusterSpec(accelerator=load_accelerator("h100-sxm"), devices_per_node=8, num_nodes=8,
    ...                       inter_node_bandwidth_bytes_per_s=50e9)
    >>> model = StepTimeModel(load_model("llama-3-8b"), cluster, seq_len=8192)
    >>> triad = BatchTriad(micro_batch_sequences=1, grad_accum_steps=8, data_parallel_ranks=64, seq_len_tokens=8192)
    >>> step = model.estimate(RunSettings(zero_stage=1), triad)
    >>> round(step.mfu, 2), round(step.tokens_per_s / 1e6, 2)
    (0.54, 0.59)

Formulas (per optimizer step; b micro-batch sequences, s sequence length, m accumulation steps,
t/p/e tensor/pipeline/expert-parallel sizes, d data-parallel ranks, world = d·t·p GPUs):

- FLOPs. Model FLOPs per token are :meth:`ModelSpec.flops_per_token` (6·N_matmul + attention; for a GPT
  block Narayanan et al. 2021 Eq. 3 without recomputation: 72·l·h²·(1 + s/(6h) + V/(12·l·h)) per
  sequence-token — note the head term is V/(12lh) with the factor 72, so the head stays 6·V·h). Full
  recomputation repeats the forward of every transformer layer (not the head): + (6·N_layers + attn)/3,
  which gives exactly Eq. 3's 96·l·h²·(1 + s/(6h) + V/(16·l·h)). Selective recomputation repeats the
  attention core's forward: + attn/3 (Korthikanti et al. 2022 §5). Both sums are
  :func:`training_flops_per_token`, which the probe's calibration also divides by (one count).
- Compute time. Hardware FLOPs per GPU ÷ (dense peak at the run's precision × efficiency), efficiency
  from :mod:`batchpilot.estimate.calibration` for the GEMM shape one GPU runs: M = b·s rows (tensor
  parallelism does not shrink the rows, it splits every GEMM's N or K by t) at the per-GPU width h/t,
  on this accelerator's machine balance (peak ÷ DRAM bandwidth). A measured calibration is read at
  M = b·s. Routed-expert GEMMs (MoE) have the rows one expert receives, e·b·s·k/E (k of E experts per
  token, e-way expert parallelism gathers the tokens of e ranks): this is what expert parallelism buys.
  The slowest pipeline stage holds ⌈L/p⌉ of the L layers (uneven splits cost time).
- Tensor parallelism (Megatron, Narayanan et al. 2021 §3.3): per layer and micro-batch 2 all-reduces of
  b·s·h activations forward and 2 backward (+2 with full recompute); with sequence parallelism the
  all-reduce becomes reduce-scatter + all-gather, same bytes. Not overlapped.
- Expert parallelism: per MoE layer and micro-batch, dispatch and combine all-to-alls of b·s·k·h
  activations (k experts per token), forward and backward (+2 with full recompute), fraction (e−1)/e
  leaves the rank. Not overlapped (DeepSeek-V3's DualPipe hides it; we do not assume that).
- Data-parallel gradient reduction (ring: 2·(N−1)/N·G bytes per rank for an all-reduce of G bytes,
  (N−1)/N·G for a reduce-scatter or an all-gather): ZeRO-0 all-reduces once per step, ZeRO-1
  reduce-scatters once per step (together with the parameter all-gather the 2Ψ of plain data
  parallelism, ZeRO paper §7; the ``torch`` engine's ZeroRedundancyOptimizer all-reduces), both
  overlapped with the last micro-batch's backward; ZeRO-2 reduce-scatters every micro-batch
  (DeepSpeed keeps no full gradient) overlapped with that backward; ZeRO-3 gathers parameters forward and backward and
  reduce-scatters gradients every micro-batch, overlapped with that micro-batch's compute; ZeRO-1/2
  gather updated parameters after the step (overlapped with the first forward). Only what exceeds the
  overlap window counts. Expert gradients reduce over d/e ranks. A group spanning nodes runs at the
  per-GPU inter-node bandwidth, otherwise at the intra-node bandwidth. ``hybrid_shard`` shards within
  a node and all-reduces each shard's gradient slice across nodes once per step.
- Pipeline bubble (1F1B): the step takes (m + p − 1) stage-times instead of m, i.e. a fraction
  (p − 1)/(m + p − 1) is idle (Narayanan et al. 2021 §2.2.1); plus point-to-point sends of b·s·h
  activations between stages. With the interleaved schedule (settings ``vpp`` = v > 1, §2.2.2: each rank
  holds v model chunks) the bubble shrinks to (p − 1)/v stage-times and the sends grow v-fold.
- Optimizer step: memory-bound, bytes touched per parameter (:data:`OPTIMIZER_BYTES_PER_PARAM`) ÷ DRAM
  bandwidth over the parameters this rank updates (÷ d with ZeRO ≥ 1). With ``offload`` the update runs
  on the CPU (:data:`HOST_BANDWIDTH_BYTES_PER_S`, an assumption) after moving gradients down and
  parameters up over PCIe (:data:`PCIE_BANDWIDTH_BYTES_PER_S`, an assumption).
- Outputs: tokens/s = global tokens ÷ step time; TFLOP/s per GPU counts the FLOPs executed (with
  recomputation, as Narayanan et al. report); MFU (PaLM, Chowdhery et al. 2022 App. B) = tokens/s ×
  (6N + 12·L·H·Q·T) ÷ (world × peak), i.e. model FLOPs without recomputation.

Known error: the efficiency model dominates. Against published runs
(``benchmarks/results/steptime_vs_published.md``; constants fitted on Narayanan et al. 2021 Table 1 only)
it is within 4.6 % mean absolute error on that table, 6 % on Llama 3 405B (H100) if its interleaving is
v = 8 but 29 % low at v = 1, and 9–20 % high on MT-NLG 530B and BLOOM-176B (A100). Communication assumes
bus bandwidth equals the per-GPU link bandwidth (real NCCL reaches ~70–90 %) and no compute slowdown from
overlapped communication. Rank placement is Megatron's: tensor-parallel ranks adjacent, then data, then
pipeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, NamedTuple, get_args

from batchpilot.estimate.calibration import DEFAULT_CALIBRATION, Calibration, MatmulShape
from batchpilot.estimate.dtypes import (
    ACTIVATION_BYTES,  # also the bytes per element TP/EP/PP collectives send
)
from batchpilot.specs.batch import BatchTriad
from batchpilot.specs.hardware import ClusterSpec
from batchpilot.specs.model import ModelSpec
from batchpilot.specs.settings import Recompute, RunSettings

PEAK_DTYPE = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "fp8": "fp8"}
"""Which dense peak a precision's matmuls run at (fp32: no TF32, PyTorch's default)."""

GRADIENT_REDUCE_BYTES = {"torch": 4, "fsdp2": 4, "deepspeed": 2, "megatron": 4}
"""Bytes per gradient element in the data-parallel reduction under mixed precision: DDP on autocast
keeps fp32 gradients; FSDP2 as used by torchtitan reduces in fp32 (``reduce_dtype=torch.float32``);
DeepSpeed communicates in the training dtype; Megatron reduces its fp32 main gradients. fp32 runs: 4."""

OPTIMIZER_BYTES_PER_PARAM = {"adamw": 32, "adamw-8bit": 18, "sgd-momentum": 22, "adafactor": 20}
"""DRAM bytes read + written per parameter by one optimizer step with fp32 masters: AdamW reads master,
m, v (12) and the gradient (4), writes master, m, v (12) and the bf16 weight (2) ≈ 30, rounded up for
the gradient unscale/clip pass; 8-bit Adam has 1-byte m and v; SGD momentum one fp32 buffer;
Adafactor factored second moments (≈ no per-parameter state besides the master). Approximate (±20 %)."""

HOST_BANDWIDTH_BYTES_PER_S = 100e9
"""Assumed host DRAM bandwidth per node for CPU optimizer steps (offload); a two-socket DDR5 server
reaches 200–600 GB/s peak, CPU-Adam reaches a fraction. An assumption, not a measurement."""

PCIE_BANDWIDTH_BYTES_PER_S = 25e9
"""Assumed host↔GPU bandwidth per GPU for offload (PCIe Gen4 x16: 32 GB/s peak, ~25 GB/s achieved)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class StepTime:
    """Time and throughput of one optimizer step (all GPUs together)."""

    flops_per_step: float
    """FLOPs the cluster executes per step, recomputation included."""
    model_flops_per_step: float
    """Model FLOPs per step without recomputation (the MFU numerator)."""
    compute_s: float
    """Forward/backward time of the slowest pipeline stage for all micro-batches, without bubble."""
    bubble_s: float
    """Pipeline fill and drain: (p − 1) stage-times."""
    tp_comm_s: float
    """Tensor-parallel collectives per step (not overlapped)."""
    ep_comm_s: float
    """Expert-parallel all-to-alls per step (not overlapped)."""
    pp_comm_s: float
    """Pipeline point-to-point activation sends on the critical path."""
    dp_comm_s: float
    """Data-parallel traffic time per step (gradient reduction, ZeRO gathers), before overlap."""
    dp_exposed_s: float
    """The part of ``dp_comm_s`` not hidden behind compute."""
    optimizer_s: float
    """Optimizer update (plus offload transfers)."""
    step_time_s: float
    """Wall time of one optimizer step."""
    tokens_per_s: float
    tflops_per_gpu: float
    """Executed FLOP/s per GPU ÷ 1e12 (recomputation counted, as Narayanan et al.)."""
    mfu: float
    """Model FLOPs utilisation (PaLM App. B): model FLOPs per second ÷ (GPUs × dense peak)."""
    efficiency: float
    """Matmul efficiency used for the compute time (calibration or default curve)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, kw_only=True, slots=True)
class _Comm:
    """Traffic of one collective pattern: seconds on the critical path and seconds that may overlap."""

    exposed_s: float = 0.0
    total_s: float = 0.0


class _Terms(NamedTuple):
    """The pieces of one step estimate (seconds unless noted)."""

    micro_compute_s: float
    tp_micro_s: float
    ep_micro_s: float
    pp_micro_s: float
    bubble_s: float
    dp: _Comm
    optimizer_s: float
    step_s: float
    peak: float
    """Dense peak FLOP/s at the run's precision."""
    efficiency: float


def ring_all_reduce_bytes(size_bytes: float, ranks: int) -> float:
    """Bytes each rank sends in a ring all-reduce of ``size_bytes``: 2·(N−1)/N·G (Patarasuk & Yuan 2009)."""
    return 2.0 * (ranks - 1) / ranks * size_bytes if ranks > 1 else 0.0


def ring_gather_bytes(size_bytes: float, ranks: int) -> float:
    """Bytes each rank sends in a ring reduce-scatter or all-gather of ``size_bytes``: (N−1)/N·G."""
    return (ranks - 1) / ranks * size_bytes if ranks > 1 else 0.0


def pipeline_bubble_fraction(pp: int, micro_batches: int) -> float:
    """Idle fraction of a 1F1B/GPipe step: (p − 1)/(m + p − 1) (Narayanan et al. 2021 §2.2.1)."""
    return (pp - 1) / (micro_batches + pp - 1)


def recompute_flops_per_token(model: ModelSpec, seq_len: int, recompute: Recompute) -> int:
    """Extra training FLOPs per token from activation recomputation: one more forward of what is recomputed.

    ``full`` repeats the forward of every transformer layer — its matmuls (2·N_layers, N_layers = the
    matmul weights a token passes through minus the output head's V·h) and its attention core
    (attention ÷ 3) — but not the output head or the embedding, which sit outside the checkpointed
    layers: (6·N_layers + attention) / 3. For a GPT block this turns Narayanan et al. 2021 Eq. 3 without
    recomputation, 72·l·h²·(1 + s/(6h) + V/(12·l·h)) per token, into Eq. 3 with it,
    96·l·h²·(1 + s/(6h) + V/(16·l·h)): the head term stays 6·V·h (96/16 = 72/12 = 6). ``selective``
    repeats only the attention core's forward, attention / 3 (Korthikanti et al. 2022 §5).
    Both are exact integers (every term is a multiple of 3).

    Known error: this is the convention of Narayanan et al. (the whole layer forward). PyTorch's
    non-reentrant checkpointing stops recomputing once every tensor backward needs exists, so it skips
    each layer's last matmul (``down_proj``/``c_proj``, 2·h·I per token and layer; measured in
    tests/estimate/test_traced.py) — 5.7 % of the full-recompute count for tiny-llama-1m at s = 64,
    4.9 % for llama-3-8b at s = 8192. The probe and the step-time model share this function, so a
    calibration's efficiency converts back into the same seconds whatever the convention.
    """
    if recompute == "none":
        return 0
    attention = model.attention_flops_per_token(seq_len)
    if recompute == "selective":
        return attention // 3
    layers = model.matmul_params_per_token - model.vocab_size * model.hidden_size
    return (6 * layers + attention) // 3


def training_flops_per_token(model: ModelSpec, seq_len: int, recompute: Recompute) -> int:
    """FLOPs a device executes per trained token: model FLOPs (:meth:`ModelSpec.flops_per_token`) plus
    :func:`recompute_flops_per_token`. The one count that both the step-time model's compute time and the
    probe's measured efficiency (:func:`batchpilot.measure.probe.calibration_from_probe`) use."""
    return model.flops_per_token(seq_len) + recompute_flops_per_token(model, seq_len, recompute)


class StepTimeModel:
    """Step-time estimates for one model on one cluster at one sequence length.

    Model-dependent quantities are computed once here, so :meth:`estimate` is cheap enough for the
    planner to call thousands of times. The interleaved schedule's v (model chunks per pipeline rank,
    Narayanan et al. 2021 §2.2.2) is the settings' ``vpp``; 1 is plain 1F1B.
    """

    def __init__(self, model: ModelSpec, cluster: ClusterSpec, *, seq_len: int,
                 calibration: Calibration = DEFAULT_CALIBRATION) -> None:
        self.model, self.cluster, self.seq_len, self.calibration = model, cluster, seq_len, calibration
        self.flops_per_token = model.flops_per_token(seq_len)
        self._hw_flops_per_token = {r: training_flops_per_token(model, seq_len, r) for r in get_args(Recompute)}
        routed = model.num_moe_layers * model.num_experts * model.params_expert
        self.expert_params = routed
        routed_per_token = 6 * model.num_moe_layers * model.num_experts_per_token * model.params_expert
        self._routed_flops_per_token = {"none": routed_per_token, "selective": routed_per_token,
                                        "full": routed_per_token * 4 // 3}
        self.dense_params = model.params_total - routed
        self._peak: dict[str, float] = {}
        self.intra_bw = cluster.accelerator.intra_node_bandwidth_bytes_per_s
        self.inter_bw = cluster.inter_node_bandwidth_bytes_per_s or self.intra_bw

    # ------------------------------------------------------------------ helpers
    def _bandwidth(self, group: int, stride: int) -> float:
        """Per-GPU bandwidth of a group of ``group`` ranks spaced ``stride`` apart in rank order."""
        within_node = group * stride <= self.cluster.devices_per_node
        return self.intra_bw if within_node else self.inter_bw

    def peak_flops_per_s(self, settings: RunSettings) -> float:
        """Dense peak FLOP/s of the run's precision (unsupported precision → one-line SpecError)."""
        peak = self._peak.get(settings.precision)
        if peak is None:
            peak = self._peak[settings.precision] = self.cluster.accelerator.peak_flops_per_s(
                PEAK_DTYPE[settings.precision])
        return peak

    # ------------------------------------------------------------------ the estimate
    def estimate(self, settings: RunSettings, triad: BatchTriad) -> StepTime:
        """Step time and throughput of ``settings`` (layout, ZeRO, recompute) at ``triad``."""
        m, b, dp = triad.grad_accum_steps, triad.micro_batch_sequences, triad.data_parallel_ranks
        t = self._terms(settings, b, m, dp)
        world = dp * settings.tp * settings.pp
        tokens = triad.global_batch_tokens
        flops = float(tokens * self._hw_flops_per_token[settings.recompute])
        model_flops = float(tokens * self.flops_per_token)
        return StepTime(
            flops_per_step=flops, model_flops_per_step=model_flops, compute_s=m * t.micro_compute_s,
            bubble_s=t.bubble_s, tp_comm_s=m * t.tp_micro_s, ep_comm_s=m * t.ep_micro_s, pp_comm_s=m * t.pp_micro_s,
            dp_comm_s=t.dp.total_s, dp_exposed_s=t.dp.exposed_s, optimizer_s=t.optimizer_s, step_time_s=t.step_s,
            tokens_per_s=tokens / t.step_s, tflops_per_gpu=flops / t.step_s / world / 1e12,
            mfu=model_flops / t.step_s / (world * t.peak), efficiency=t.efficiency,
        )

    def tokens_per_s(self, settings: RunSettings, *, micro_batch: int, grad_accum: int, dp: int) -> float:
        """Only the throughput of :meth:`estimate` (the planner's bound; no records built)."""
        return micro_batch * grad_accum * dp * self.seq_len / self._terms(settings, micro_batch, grad_accum, dp).step_s

    def _terms(self, settings: RunSettings, b: int, m: int, dp: int) -> _Terms:
        s = self.seq_len
        peak = self.peak_flops_per_s(settings)
        efficiency = self._efficiency(settings, b * s)
        # the slowest stage holds ceil(L/p) layers; the head and embedding sit on the end stages
        stage_share = math.ceil(self.model.num_layers / settings.pp) / self.model.num_layers if settings.pp > 1 else 1.0
        routed = self._routed_flops_per_token[settings.recompute]
        hw_flops_per_token = self._hw_flops_per_token[settings.recompute]
        dense_s = b * s * (hw_flops_per_token - routed) / (peak * efficiency)
        routed_s = b * s * routed / (peak * self._expert_efficiency(settings, b)) if routed else 0.0
        micro_compute_s = (dense_s + routed_s) / settings.tp * stage_share
        tp_s, ep_s, pp_s = self._tp_micro_s(settings, b), self._ep_micro_s(settings, b), self._pp_micro_s(settings, b)
        micro_stage_s = micro_compute_s + tp_s + ep_s
        dp_comm = self._dp_comm(settings, m, dp, micro_compute_s)
        optimizer_s = self._optimizer_s(settings, dp)
        bubble_s = (settings.pp - 1) * micro_stage_s / settings.vpp
        step = m * micro_stage_s + bubble_s + m * pp_s + dp_comm.exposed_s + optimizer_s
        return _Terms(micro_compute_s=micro_compute_s, tp_micro_s=tp_s, ep_micro_s=ep_s, pp_micro_s=pp_s,
                      bubble_s=bubble_s, dp=dp_comm, optimizer_s=optimizer_s, step_s=step, peak=peak,
                      efficiency=efficiency)

    def _efficiency(self, settings: RunSettings, tokens: float) -> float:
        """Efficiency of GEMMs with ``tokens`` rows at this layout's per-GPU width h/t (calibration module)."""
        peak = self.peak_flops_per_s(settings)
        shape = MatmulShape(tokens=max(tokens, 1.0), width=self.model.hidden_size / settings.tp,
                            flops_per_byte=peak / self.cluster.accelerator.memory_bandwidth_bytes_per_s)
        return self.calibration.efficiency_at(shape)

    def _expert_efficiency(self, settings: RunSettings, b: int) -> float:
        """Efficiency of the routed-expert GEMMs: each local expert sees ep·b·s·k/E tokens on average."""
        m = self.model
        return self._efficiency(settings, settings.ep * b * self.seq_len * m.num_experts_per_token / m.num_experts)

    def _activation_bytes(self, settings: RunSettings, b: int) -> float:
        return b * self.seq_len * self.model.hidden_size * ACTIVATION_BYTES[settings.precision]

    def _tp_micro_s(self, settings: RunSettings, b: int) -> float:
        if settings.tp == 1:
            return 0.0
        per_layer = 6 if settings.recompute == "full" else 4
        layers = math.ceil(self.model.num_layers / settings.pp)
        volume = per_layer * layers * ring_all_reduce_bytes(self._activation_bytes(settings, b), settings.tp)
        return volume / self._bandwidth(settings.tp, 1)

    def _ep_micro_s(self, settings: RunSettings, b: int) -> float:
        if settings.ep == 1 or not self.model.is_moe:
            return 0.0
        per_layer = 6 if settings.recompute == "full" else 4
        layers = math.ceil(self.model.num_moe_layers / settings.pp)
        routed = self._activation_bytes(settings, b) * self.model.num_experts_per_token
        volume = per_layer * layers * routed * (settings.ep - 1) / settings.ep
        return volume / self._bandwidth(settings.ep, settings.tp)

    def _pp_micro_s(self, settings: RunSettings, b: int) -> float:
        if settings.pp == 1:
            return 0.0
        stride = settings.tp * (self.cluster.total_devices // (settings.tp * settings.pp))
        sends = 2 * settings.vpp  # interleaving multiplies the stage boundaries by v (§2.2.2)
        return sends * self._activation_bytes(settings, b) / settings.tp / self._bandwidth(2, stride)

    def _dp_comm(self, settings: RunSettings, m: int, dp: int, micro_compute_s: float) -> _Comm:
        """Gradient reduction and ZeRO gathers of dense and expert parameters (module docstring)."""
        ep, tp = settings.ep, settings.tp
        shard = settings.tp * settings.pp
        groups = [(self.dense_params / shard, dp, tp)]
        if self.expert_params:
            groups.append((self.expert_params / (shard * ep), dp // ep, tp * ep))
        exposed = total = 0.0
        for params, ranks, stride in groups:
            if ranks <= 1:
                continue
            comm = self._group_comm(settings, m, micro_compute_s, params, ranks, stride)
            exposed, total = exposed + comm.exposed_s, total + comm.total_s
        return _Comm(exposed_s=exposed, total_s=total)

    def _group_comm(self, settings: RunSettings, m: int, micro_compute_s: float, params: float, ranks: int,
                    stride: int) -> _Comm:
        """One data-parallel group of ``ranks`` ranks, ``stride`` apart, holding ``params`` per model shard.

        With ``hybrid_shard`` ZeRO shards within a node (intra-node bandwidth) and the shards all-reduce
        their gradient slice across nodes once per step (FSDP HYBRID_SHARD, ZeRO++ hpZ)."""
        z = settings.zero_stage
        grad_bytes = 4 if settings.precision == "fp32" else GRADIENT_REDUCE_BYTES[settings.engine]
        g, w = params * grad_bytes, params * ACTIVATION_BYTES[settings.precision]
        shard_ranks, replicas = ranks, 1
        if settings.hybrid_shard and z >= 1:
            shard_ranks = max(1, min(ranks, self.cluster.devices_per_node // stride))
            replicas = ranks // shard_ranks
        bw = self._bandwidth(shard_ranks, stride)
        backward_s, forward_s = micro_compute_s * 2 / 3, micro_compute_s / 3
        if z == 0 or (z == 1 and settings.engine == "torch"):  # DDP all-reduce (ZeroRedundancyOptimizer too)
            per_step, per_micro = ring_all_reduce_bytes(g, shard_ranks) / bw, 0.0
        elif z == 1:  # reduce-scatter once per step (ZeRO paper §7: same 2Ψ volume as DP with the gather)
            per_step, per_micro = ring_gather_bytes(g, shard_ranks) / bw, 0.0
        elif z == 2:
            per_step, per_micro = 0.0, ring_gather_bytes(g, shard_ranks) / bw
        else:
            per_step, per_micro = 0.0, (2 * ring_gather_bytes(w, shard_ranks) + ring_gather_bytes(g, shard_ranks)) / bw
        gather_s = ring_gather_bytes(w, shard_ranks) / bw if z in (1, 2) else 0.0
        if replicas > 1:  # hybrid: all-reduce of this rank's gradient slice across the replicas
            slice_bytes = g / shard_ranks
            per_step += ring_all_reduce_bytes(slice_bytes, replicas) / self._bandwidth(replicas, stride * shard_ranks)
        window = micro_compute_s if z == 3 else backward_s
        exposed = (max(0.0, per_step - backward_s) + m * max(0.0, per_micro - window)
                   + max(0.0, gather_s - forward_s))
        return _Comm(exposed_s=exposed, total_s=per_step + m * per_micro + gather_s)

    def _optimizer_s(self, settings: RunSettings, dp: int) -> float:
        shard = settings.tp * settings.pp
        dense = self.dense_params / shard
        experts = self.expert_params / (shard * settings.ep)
        if settings.zero_stage >= 1:
            dense /= dp
            experts /= max(1, dp // settings.ep)
        params = dense + experts
        touched = params * OPTIMIZER_BYTES_PER_PARAM[settings.optimizer]
        if not settings.offload:
            return touched / self.cluster.accelerator.memory_bandwidth_bytes_per_s
        host_bw = HOST_BANDWIDTH_BYTES_PER_S / self.cluster.devices_per_node
        transfer = params * (4 + ACTIVATION_BYTES[settings.precision]) / PCIE_BANDWIDTH_BYTES_PER_S
        return touched / host_bw + transfer
