"""Step-time model: a per-op time model of the layers, communication at achieved bandwidth, bubble, optimizer.

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
    >>> step.kernel_profile, step.attention_kernel
    ('hopper', 'fa2')
    >>> round(step.mfu, 2), round(step.tokens_per_s / 1e6, 2)
    (0.49, 0.54)
    >>> sorted(step.compute_by_op_s, key=step.compute_by_op_s.get, reverse=True)[:3]
    ['gemm', 'attention', 'elementwise']

What a step is made of (per optimizer step; b micro-batch sequences, s sequence length, m accumulation
steps, t/cp/p/e tensor/context/pipeline/expert-parallel sizes, d data-parallel ranks, world = d·t·cp·p):

- Compute (:mod:`batchpilot.estimate.layer_time`): every GEMM, the attention kernel and every
  memory-bound op of the slowest pipeline stage's ⌈L/p⌉ layers plus the output head, forward, backward
  and what the recomputation policy repeats, timed with the GPU generation's published kernel speeds
  (:mod:`batchpilot.estimate.kernels`). A probe calibration replaces the total with the measured
  efficiency — executed FLOPs ÷ (dense peak × efficiency) — and keeps the per-op split as proportions.
- Tensor parallelism (Megatron, Narayanan et al. 2021 §3.3): per layer and micro-batch 2 all-reduces of
  b·s·h activations forward and 2 backward (+2 with full recompute); with sequence parallelism each is a
  reduce-scatter + all-gather of the same volume. Exposed (not overlapped).
- Context parallelism (ring attention): per layer each rank passes its K/V chunk around the ring, cp − 1
  sends forward and twice that backward (K/V and their gradients), overlapped with the attention kernel;
  what exceeds it is exposed. A ring of more than a node's GPUs (tp·cp) moves at the network's pace.
- Expert parallelism: per MoE layer and micro-batch, dispatch and combine all-to-alls of b·s·k·h/t
  activations (each tensor-parallel rank dispatches its sequence-parallel share; expert-parallel ranks are
  adjacent) forward and backward (+2 with full recompute); exposed, or overlapped with another micro-batch's
  compute (:class:`~batchpilot.estimate.layer_time.Implementation`). A deduplicating dispatcher (DeepEP) sends a
  token once per destination node.
- Data parallelism and ZeRO (gradients in :data:`GRADIENT_REDUCE_BYTES`, parameters in the activation
  dtype; groups of d·cp ranks, stride t): ZeRO-0 all-reduces once per step and ZeRO-1 reduce-scatters once
  per step, both overlapped with the last micro-batch's backward; ZeRO-1/2 all-gather the updated
  parameters once per step, overlapped with the first forward; ZeRO-2 reduce-scatters every micro-batch
  inside its backward; ZeRO-3 / FSDP all-gathers every layer's parameters forward and again backward and
  reduce-scatters its gradients, each prefetched one layer ahead: per layer only what exceeds that
  layer's compute is exposed, plus the first gather and the last reduce-scatter. Bucketed reductions
  expose their last bucket (one layer's worth). Expert parameters (not tensor-parallel) reduce over d·cp·t/e ranks.
  ``hybrid_shard`` shards within a node and all-reduces the shards' gradient slices across nodes once per
  step. All at achieved bus bandwidth (:mod:`batchpilot.estimate.collectives`).
- Pipeline (1F1B): (p − 1) stage-times of fill and drain, ÷ v with the interleaved schedule (settings
  ``vpp``, Narayanan et al. 2021 §2.2.2), plus point-to-point sends of b·s·h/t activations (v-fold when
  interleaved) on the critical path.
- Optimizer step: memory-bound, :data:`OPTIMIZER_BYTES_PER_PARAM` per parameter this rank updates ÷ the
  achieved DRAM bandwidth; with ``offload`` on the CPU (:data:`HOST_BANDWIDTH_BYTES_PER_S`) after PCIe
  transfers (:data:`PCIE_BANDWIDTH_BYTES_PER_S`).
- Outputs: tokens/s = global tokens ÷ step time; TFLOP/s per GPU counts the FLOPs executed (the
  recomputation convention of Narayanan et al., :func:`training_flops_per_token`); MFU (PaLM, Chowdhery
  et al. 2022 App. B) = tokens/s × (6N + 12·L·H·Q·T) ÷ (world × dense peak at the run's precision).

How it does: ``benchmarks/published_runs.py`` compares it with 271 published, measured GPU runs
(``benchmarks/results/published_runs.md``: tokens/s per GPU by source, split, precision). Known
errors: kernel speeds are those of published microbenchmarks on the reference GPU of each generation
(power limits, clocks and software versions move them); the implementation of each framework (fusion,
attention kernel, fp8 recipe) is a default per engine unless given (:class:`Implementation`); communication
hidden behind compute does not slow the compute down; load imbalance between experts is not modelled.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import NamedTuple

from batchpilot.estimate import finetune_time
from batchpilot.estimate.calibration import DEFAULT_CALIBRATION, Calibration
from batchpilot.estimate.collectives import Fabric
from batchpilot.estimate.dtypes import (
    ACTIVATION_BYTES,  # also the bytes per element TP/EP/PP collectives send
)
from batchpilot.estimate.fitted import FITTED, FittedConstants
from batchpilot.estimate.kernels import KernelProfile, profile_for
from batchpilot.estimate.layer_time import (
    Implementation,
    LayerTimes,
    Parts,
    Shape,
    dense_layer,
    head,
    layers_on_stage,
    moe_layer,
    recompute_parts,
)
from batchpilot.specs.batch import BatchTriad
from batchpilot.specs.hardware import ClusterSpec
from batchpilot.specs.model import ModelSpec
from batchpilot.specs.network import NetworkSpec
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


MIN_BUCKET_BYTES = 25 * 2**20
"""Smallest gradient bucket of a bucketed reduction: PyTorch DDP's default ``bucket_cap_mb=25``
(``torch/nn/parallel/distributed.py``); Megatron's (40M parameters) and DeepSpeed's buckets are larger. A
reduction goes out one layer at a time, never in buffers smaller than this."""

COLLECTIVES: tuple[str, ...] = ("tp", "cp", "ep", "pp", "dp")
"""Communication patterns the step reports its exposed time for."""

MICRO_IGNORED_SETTINGS = frozenset({"zero_stage", "vpp", "hybrid_shard", "optimizer", "offload", "fp8_all_gather",
                                    "reshard_after_forward", "param_dtype"})
"""Run settings one micro-batch's compute and TP/CP/EP communication (:meth:`StepTimeModel._compute_micro`) do not
read: they shape only the data-parallel traffic, the optimizer step and the pipeline schedule. The micro-batch
cache is keyed by every other field, so a new setting is part of the key until it is listed here."""

_micro_key = operator.attrgetter(*(f.name for f in fields(RunSettings) if f.name not in MICRO_IGNORED_SETTINGS))
_stage_key = operator.attrgetter(*(f.name for f in fields(RunSettings)
                                   if f.name not in MICRO_IGNORED_SETTINGS | {"recompute", "recompute_every"}))
"""The settings a stage's ops read before recomputation is added (:meth:`StepTimeModel._stage_ops`)."""
_implementation_key = operator.attrgetter("engine", "attention", "compile", "precision", "fp8_recipe", "loss", "tp")
"""The settings :func:`default_implementation` reads (``resolved_loss`` reads ``tp``)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class StepTime:
    """Time and throughput of one optimizer step (all GPUs together), and what the time is made of."""

    flops_per_step: float
    """FLOPs the cluster executes per step, recomputation included."""
    model_flops_per_step: float
    """Model FLOPs per step without recomputation (the MFU numerator)."""
    compute_s: float
    """Forward/backward (and recomputation) time of the slowest pipeline stage for all micro-batches."""
    bubble_s: float
    """Pipeline fill and drain: (p − 1)/v stage-times."""
    tp_comm_s: float
    """Tensor-parallel collectives per step (exposed)."""
    cp_comm_s: float
    """Context-parallel K/V exchange per step, before overlap with the attention kernel."""
    ep_comm_s: float
    """Expert-parallel all-to-alls per step (exposed)."""
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
    """Executed FLOPs ÷ (dense peak × compute time): the measured calibration's, or what the per-op model implies."""
    compute_by_op_s: MappingProxyType[str, float] = field(default_factory=lambda: MappingProxyType({}))
    """``compute_s`` by op class (:data:`batchpilot.estimate.layer_time.OP_CLASSES`)."""
    exposed_comm_s: MappingProxyType[str, float] = field(default_factory=lambda: MappingProxyType({}))
    """Communication on the critical path by pattern (:data:`COLLECTIVES`), seconds per step."""
    kernel_profile: str = ""
    """The GPU generation's kernel profile the compute was timed with (``generic``: no microbenchmarks)."""
    attention_kernel: str = ""
    """The attention kernel timed (``eager`` or a flash kernel)."""

    def to_dict(self) -> dict[str, float]:
        """Every time as a flat number (the ``plans[i].step`` object of ``plan --json``): the fields above, then
        ``compute_<op class>_s`` and ``exposed_<pattern>_s``."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), float)}
        out.update({f"compute_{k}_s": v for k, v in self.compute_by_op_s.items()})
        out.update({f"exposed_{k}_s": v for k, v in self.exposed_comm_s.items()})
        return out


class _Comm(NamedTuple):
    """Traffic of one collective pattern: seconds on the critical path and seconds in total."""

    exposed_s: float = 0.0
    total_s: float = 0.0


class _Micro(NamedTuple):
    """One micro-batch on the slowest stage (seconds)."""

    compute: Parts
    forward_s: float
    backward_s: float
    """Backward plus recomputation (what a gradient reduction can hide behind)."""
    layer_s: float
    """Average compute of one layer, forward + backward (the FSDP prefetch window)."""
    layers: int
    tp: _Comm
    cp: _Comm
    ep: _Comm
    stage_s: float
    """Compute plus exposed TP, CP and EP communication: one micro-batch's time on the stage."""


class _Traffic(NamedTuple):
    """One data-parallel group's collectives per step, before the compute they hide behind is known (seconds)."""

    per: int
    """How often the main collective runs: 3 per layer and micro-batch (ZeRO-3), 2 per micro-batch (ZeRO-2),
    0 once per step."""
    seconds: float
    """The main collective (ZeRO-3: one layer's gathers and reduce-scatter)."""
    buckets: float
    """Buffers the main collective is issued in (ZeRO-3: unused)."""
    after: tuple[tuple[float, float, bool], ...]
    """Further once-per-step collectives: (seconds, buffers, hidden behind the forward rather than the backward)."""


class _Layout(NamedTuple):
    """What a step's time takes from one layout (settings and data-parallel ranks) whatever the micro-batch."""

    traffic: tuple[_Traffic, ...]
    """The data-parallel groups with more than one rank."""
    optimizer_s: float
    dualpipe: bool
    p2p_overlapped: bool
    """Pipeline sends hidden behind compute (interleaved schedule, DualPipe)."""
    micro_id: int
    """The settings' micro-batch cache key, interned (:meth:`StepTimeModel._micro_id`)."""


class _StageOps(NamedTuple):
    """The ops of one micro-batch on the slowest stage before recomputation: what every policy shares."""

    shape: Shape
    impl: Implementation
    layers: tuple[tuple[LayerTimes, float], ...]
    """(layer times, layers of that kind on the stage), fine-tuning applied."""
    moe_layers: float
    forward_body_s: float
    """The layers' forward."""
    forward: Parts
    """The layers' and the head's forward (read only)."""
    top: LayerTimes
    """The head (embedding, final norm, output layer, loss)."""


class _Terms(NamedTuple):
    """The pieces of one step estimate (seconds)."""

    micro: _Micro
    pp_s: float
    """Pipeline sends on the critical path per micro-batch."""
    bubble_s: float
    dp: _Comm
    optimizer_s: float
    step_s: float


def ring_all_reduce_bytes(size_bytes: float, ranks: int) -> float:
    """Bytes each rank sends in a ring all-reduce of ``size_bytes``: 2·(N−1)/N·G (Patarasuk & Yuan 2009)."""
    return 2.0 * (ranks - 1) / ranks * size_bytes if ranks > 1 else 0.0


def ring_gather_bytes(size_bytes: float, ranks: int) -> float:
    """Bytes each rank sends in a ring reduce-scatter or all-gather of ``size_bytes``: (N−1)/N·G."""
    return (ranks - 1) / ranks * size_bytes if ranks > 1 else 0.0


def pipeline_bubble_fraction(pp: int, micro_batches: int) -> float:
    """Idle fraction of a 1F1B/GPipe step: (p − 1)/(m + p − 1) (Narayanan et al. 2021 §2.2.1)."""
    return (pp - 1) / (micro_batches + pp - 1)


def recompute_flops_per_token(model: ModelSpec, seq_len: int, recompute: Recompute, every: int = 1) -> int:
    """Extra training FLOPs per token from activation recomputation: one more forward of what is recomputed.

    ``full`` repeats the forward of every transformer layer — its matmuls (2·N_layers, N_layers = the
    matmul weights a token passes through minus the output head's V·h) and its attention core
    (attention ÷ 3) — but not the output head or the embedding, which sit outside the checkpointed
    layers: (6·N_layers + attention) / 3. For a GPT block this turns Narayanan et al. 2021 Eq. 3 without
    recomputation, 72·l·h²·(1 + s/(6h) + V/(12·l·h)) per token, into Eq. 3 with it,
    96·l·h²·(1 + s/(6h) + V/(16·l·h)): the head term stays 6·V·h (96/16 = 72/12 = 6). ``selective``
    repeats only the attention core's forward, attention / 3 (Korthikanti et al. 2022 §5). ``op``
    (torchtitan's per-op policy: every second matmul of a layer is recomputed, attention is saved) repeats
    half the layers' matmul forward, N_layers. With ``every`` = N only one layer in N is checkpointed:
    ⌊L/N⌋/L of the above (floored to an integer).

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
    layers = model.matmul_params_per_token - model.vocab_size * model.hidden_size
    if recompute == "selective":
        extra = attention // 3
    elif recompute == "op":
        extra = layers
    else:
        extra = (6 * layers + attention) // 3
    if every == 1:
        return extra
    return extra * (model.num_layers // every) // model.num_layers


def training_flops_per_token(model: ModelSpec, seq_len: int, recompute: Recompute, every: int = 1) -> int:
    """FLOPs a device executes per trained token: model FLOPs (:meth:`ModelSpec.flops_per_token`) plus
    :func:`recompute_flops_per_token`. The one count that both the step-time model's compute time and the
    probe's measured efficiency (:func:`batchpilot.measure.probe.calibration_from_probe`) use."""
    return model.flops_per_token(seq_len) + recompute_flops_per_token(model, seq_len, recompute, every)


def default_implementation(settings: RunSettings, profile: KernelProfile) -> Implementation:
    """What the settings imply about the kernels: Megatron's fused kernels (Transformer Engine), or eager
    PyTorch ops fused only under ``--compile``; the settings' fp8 recipe (or the engine's default); a fused
    loss where the settings' loss path is Megatron's or compiled; the profile's attention kernel for the
    engine (``eager`` when the settings ask for it)."""
    megatron = settings.engine == "megatron"
    kernel = "eager" if settings.attention == "eager" else profile.default_attention_kernel(settings.engine)
    return Implementation(fused=megatron or settings.compile, attention_kernel=kernel,
                          fp8_recipe=settings.resolved_fp8_recipe or "tensorwise", compiled=settings.compile,
                          fused_loss=settings.resolved_loss in ("fused", "compiled"))


class StepTimeModel:
    """Step-time estimates for one model on one cluster at one sequence length.

    Per-layer times are computed once per (settings, micro-batch) and cached, so :meth:`estimate` is cheap
    enough for the planner to call thousands of times. ``implementation`` pins how the kernels are
    implemented (fusion, attention kernel, fp8 recipe) for every estimate; by default it follows the
    engine (:func:`default_implementation`). ``network`` is the scale-out fabric whose measured achieved
    fraction applies between nodes (default: the cluster's, else 400 Gb/s InfiniBand's); ``profile`` overrides the kernel
    profile chosen from the accelerator.
    """

    def __init__(self, model: ModelSpec, cluster: ClusterSpec, *, seq_len: int,
                 calibration: Calibration = DEFAULT_CALIBRATION, implementation: Implementation | None = None,
                 network: NetworkSpec | None = None, profile: KernelProfile | None = None,
                 fitted: FittedConstants = FITTED) -> None:
        self.model, self.cluster, self.seq_len, self.calibration = model, cluster, seq_len, calibration
        self.implementation, self.fitted = implementation, fitted
        self.profile = profile or profile_for(cluster.accelerator)
        self.fabric = Fabric.of(cluster, self.profile, network)
        self.flops_per_token = model.flops_per_token(seq_len)
        self._hw_flops: dict[tuple[str, int], int] = {}
        self.expert_params = model.num_moe_layers * model.num_experts * model.params_expert
        self.dense_params = model.params_total - self.expert_params
        self._peak: dict[str, float] = {}
        self._micro_ids: dict[tuple[object, ...], int] = {}
        self._stage_cache: dict[tuple[tuple[object, ...], int], _StageOps] = {}
        self._last_layout: tuple[RunSettings, int, _Layout] | None = None
        self._micro_cache: dict[tuple[int, int], _Micro] = {}
        self._layouts: dict[tuple[RunSettings, int], _Layout] = {}
        self._shapes: dict[tuple[object, ...], tuple[Shape, Implementation]] = {}
        self._layer_cache: dict[tuple[str, tuple[object, ...]], LayerTimes] = {}
        self._implementations: dict[tuple[object, ...], Implementation] = {}

    def hw_flops_per_token(self, settings: RunSettings) -> int:
        """:func:`training_flops_per_token` of the settings' recomputation (cached)."""
        key = (settings.recompute, settings.recompute_every)
        if key not in self._hw_flops:
            self._hw_flops[key] = training_flops_per_token(self.model, self.seq_len, settings.recompute,
                                                           settings.recompute_every)
        return self._hw_flops[key]

    def peak_flops_per_s(self, settings: RunSettings) -> float:
        """Dense peak FLOP/s of the run's precision (unsupported precision → one-line SpecError)."""
        peak = self._peak.get(settings.precision)
        if peak is None:
            peak = self._peak[settings.precision] = self.cluster.accelerator.peak_flops_per_s(
                PEAK_DTYPE[settings.precision])
        return peak

    def implementation_for(self, settings: RunSettings) -> Implementation:
        if self.implementation is not None:
            return self.implementation
        key = _implementation_key(settings)
        impl = self._implementations.get(key)
        if impl is None:
            impl = self._implementations[key] = default_implementation(settings, self.profile)
        return impl

    # ------------------------------------------------------------------ the estimate
    def estimate(self, settings: RunSettings, triad: BatchTriad) -> StepTime:
        """Step time and throughput of ``settings`` (layout, ZeRO, recompute) at ``triad``."""
        m, b, dp = triad.grad_accum_steps, triad.micro_batch_sequences, triad.data_parallel_ranks
        t = self._terms(settings, b, m, dp)
        world = dp * settings.tp * settings.pp * settings.cp
        tokens = triad.global_batch_tokens
        flops = float(tokens * self.hw_flops_per_token(settings))
        model_flops = float(tokens * self.flops_per_token)
        micro = t.micro
        peak = self.peak_flops_per_s(settings)
        if self.calibration.is_default:
            efficiency = self._micro_flops(settings, b) / (peak * micro.compute.total_s)
        else:
            efficiency = self.calibration.efficiency(b * self.seq_len)
        exposed = {"tp": m * micro.tp.exposed_s, "cp": m * micro.cp.exposed_s, "ep": m * micro.ep.exposed_s,
                   "pp": m * t.pp_s, "dp": t.dp.exposed_s}
        return StepTime(
            flops_per_step=flops, model_flops_per_step=model_flops, compute_s=m * micro.compute.total_s,
            bubble_s=t.bubble_s, tp_comm_s=m * micro.tp.total_s, cp_comm_s=m * micro.cp.total_s,
            ep_comm_s=m * micro.ep.total_s,
            pp_comm_s=m * t.pp_s, dp_comm_s=t.dp.total_s, dp_exposed_s=t.dp.exposed_s, optimizer_s=t.optimizer_s,
            step_time_s=t.step_s, tokens_per_s=tokens / t.step_s, tflops_per_gpu=flops / t.step_s / world / 1e12,
            mfu=model_flops / t.step_s / (world * peak), efficiency=efficiency,
            compute_by_op_s=MappingProxyType({k: m * v for k, v in micro.compute.as_dict().items()}),
            exposed_comm_s=MappingProxyType(exposed), kernel_profile=self.profile.name,
            attention_kernel=self._attention_kernel(settings),
        )

    def tokens_per_s(self, settings: RunSettings, *, micro_batch: int, grad_accum: int, dp: int) -> float:
        """Only the throughput of :meth:`estimate` (the planner's bound; no records built)."""
        return micro_batch * grad_accum * dp * self.seq_len / self._terms(settings, micro_batch, grad_accum, dp).step_s

    def _attention_kernel(self, settings: RunSettings) -> str:
        kernel = self.implementation_for(settings).attention_kernel
        return kernel if kernel == "eager" else self.profile.attention_curve(kernel)[0]

    def _terms(self, settings: RunSettings, b: int, m: int, dp: int) -> _Terms:
        layout = self._layout(settings, dp)
        micro = self._micro_cache.get((layout.micro_id, b))
        if micro is None:
            micro = self._micro_cache[(layout.micro_id, b)] = self._compute_micro(settings, b)
        stage_s = micro.stage_s
        pp = self._pp_s(settings, b, dp)
        pp_s = self.fitted.overlap_interference * pp if layout.p2p_overlapped else pp
        bubble_s = self._bubble_s(settings, micro, stage_s, layout.dualpipe)
        dp_comm = self._dp_comm(layout, m, micro)
        optimizer_s = layout.optimizer_s
        step = m * (stage_s + pp_s) + bubble_s + dp_comm.exposed_s + optimizer_s
        return _Terms(micro=micro, pp_s=pp_s, bubble_s=bubble_s, dp=dp_comm, optimizer_s=optimizer_s, step_s=step)

    def _layout(self, settings: RunSettings, dp: int) -> _Layout:
        """What the step takes from the layout alone (:class:`_Layout`), cached per (settings, dp); the last one is
        kept by identity (the planner asks for every micro-batch of one layout in turn)."""
        last = self._last_layout
        if last is not None and last[0] is settings and last[1] == dp:
            return last[2]
        key = (settings, dp)
        layout = self._layouts.get(key)
        self._last_layout = (settings, dp, layout) if layout is not None else None
        if layout is None:
            dualpipe = self.implementation_for(settings).dualpipe
            layout = self._layouts[key] = _Layout(
                traffic=self._dp_traffic(settings, dp), optimizer_s=self._optimizer_s(settings, dp), dualpipe=dualpipe,
                p2p_overlapped=settings.vpp > 1 or dualpipe,  # Megatron overlap_p2p_comm, DualPipe
                micro_id=self._micro_id(settings))
            self._last_layout = (settings, dp, layout)
        return layout

    @staticmethod
    def _bubble_s(settings: RunSettings, micro: _Micro, stage_s: float, dualpipe: bool) -> float:
        """1F1B: (p − 1)/v stage-times. DualPipe: (p/2 − 1)·(F&B + B − 3W) (DeepSeek-V3 Table 2) with F&B the
        overlapped forward and backward chunks' compute F + B and the weight-gradient half of the backward W = B/2,
        i.e. (p/2 − 1)·(F + B/2), the stage's exposed communication scaled alike."""
        if settings.pp == 1:
            return 0.0
        if not dualpipe:
            return (settings.pp - 1) * stage_s / settings.vpp
        compute = micro.forward_s + micro.backward_s
        per_stage = (micro.forward_s + micro.backward_s / 2) * stage_s / compute
        return max(0.0, settings.pp / 2 - 1) * per_stage

    # ------------------------------------------------------------------ one micro-batch
    def _micro_flops(self, settings: RunSettings, b: int) -> float:
        """FLOPs one GPU of the slowest stage executes per micro-batch (the calibration's convention)."""
        model = self.model
        share = math.ceil(model.num_layers / settings.pp) / model.num_layers if settings.pp > 1 else 1.0
        per_gpu = settings.tp * settings.cp
        return b * self.seq_len * self.hw_flops_per_token(settings) * share / per_gpu

    def _shape(self, settings: RunSettings, b: int) -> Shape:
        cp = settings.cp
        return Shape(tokens=b * self.seq_len / cp, seq=max(1, self.seq_len // cp), sequences=b, tp=settings.tp,
                     sp=settings.sp, ep=settings.ep, cp=cp, precision=settings.precision)

    def _micro_id(self, settings: RunSettings) -> int:
        """A small integer per distinct micro-batch cache key: the settings :meth:`_compute_micro` reads (all but
        :data:`MICRO_IGNORED_SETTINGS`)."""
        return self._micro_ids.setdefault(_micro_key(settings), len(self._micro_ids))

    def _micro(self, settings: RunSettings, b: int) -> _Micro:
        """:meth:`_compute_micro`, cached by :meth:`_micro_id` and ``b``."""
        key = (self._micro_id(settings), b)
        cached = self._micro_cache.get(key)
        if cached is None:
            cached = self._micro_cache[key] = self._compute_micro(settings, b)
        return cached

    def _shape_of(self, settings: RunSettings, b: int) -> tuple[Shape, Implementation, tuple[object, ...]]:
        """(:meth:`_shape`, :meth:`implementation_for`, a key of both), cached: the key holds every setting they
        read (:data:`_implementation_key` covers tp and precision), ep last."""
        key = (_implementation_key(settings), b, settings.cp, settings.sp, settings.ep)
        found = self._shapes.get(key)
        if found is None:
            found = self._shapes[key] = (self._shape(settings, b), self.implementation_for(settings))
        return found[0], found[1], key

    def _stage_ops(self, settings: RunSettings, b: int) -> _StageOps:
        """:class:`_StageOps`, cached by the settings they read (:data:`_stage_key`: all but the recomputation policy
        and :data:`MICRO_IGNORED_SETTINGS`) and ``b``."""
        key = (_stage_key(settings), b)
        ops = self._stage_cache.get(key)
        if ops is not None:
            return ops
        model = self.model
        sh, impl, shape_key = self._shape_of(settings, b)
        n_dense, n_moe = layers_on_stage(model, settings.pp)
        layers: list[tuple[LayerTimes, float]] = []
        if n_dense:
            layers.append((self._layer_times(dense_layer, shape_key, sh, impl), n_dense))
        if n_moe:
            layers.append((self._layer_times(moe_layer, shape_key, sh, impl), n_moe))
        layers = finetune_time.step_layers(layers, model, settings, sh, self.cluster.accelerator, self.profile)
        forward = Parts()
        for times, n in layers:
            forward.add(times.forward, n)
        forward_body_s = forward.total_s
        top = self._layer_times(head, shape_key, sh, impl)
        top = finetune_time.step_head(top, settings)
        forward.add(top.forward)
        ops = self._stage_cache[key] = _StageOps(shape=sh, impl=impl, layers=tuple(layers), moe_layers=n_moe,
                                                 forward_body_s=forward_body_s, forward=forward, top=top)
        return ops

    def _compute_micro(self, settings: RunSettings, b: int) -> _Micro:
        model = self.model
        ops = self._stage_ops(settings, b)
        sh, impl, layers, forward = ops.shape, ops.impl, ops.layers, ops.forward
        backward = Parts()
        checkpointed = (math.ceil(model.num_layers / settings.pp) // settings.recompute_every) / math.ceil(
            model.num_layers / settings.pp)
        for times, n in layers:
            backward.add(times.backward, n).add(recompute_parts(times, settings.recompute), n * checkpointed)
        body_s = ops.forward_body_s + backward.total_s
        backward.add(ops.top.backward)
        compute = Parts().add(forward).add(backward)
        if not self.calibration.is_default:
            measured = self._micro_flops(settings, b) / (
                self.peak_flops_per_s(settings) * self.calibration.efficiency(b * self.seq_len))
            compute = compute.scaled(measured / compute.total_s)
        scale = compute.total_s / (forward.total_s + backward.total_s)
        n_layers = math.ceil(model.num_layers / settings.pp)
        tp = self._overlapped(self._tp_s(settings, sh, n_layers), compute.gemm, impl.tp_comm_overlap)
        ep = self._overlapped(self._ep_s(settings, sh, ops.moe_layers), compute.total_s,
                              impl.ep_comm_overlap or impl.dualpipe)
        cp = self._cp_comm(settings, sh, layers)
        cp = _Comm(exposed_s=cp.exposed_s + self.fitted.overlap_interference * (cp.total_s - cp.exposed_s),
                   total_s=cp.total_s)
        return _Micro(compute=compute, forward_s=forward.total_s * scale, backward_s=backward.total_s * scale,
                      layer_s=body_s * scale / n_layers, layers=n_layers, tp=tp, cp=cp, ep=ep,
                      stage_s=compute.total_s + tp.exposed_s + cp.exposed_s + ep.exposed_s)

    def _layer_times(self, kind: Callable[..., LayerTimes], shape_key: tuple[object, ...], sh: Shape,
                     impl: Implementation) -> LayerTimes:
        """``kind`` (:func:`dense_layer`, :func:`moe_layer` or :func:`head`) of this model on this accelerator,
        cached by what it depends on beyond them: the shape and the implementation (``shape_key`` of
        :meth:`_shape_of`; its last entry, the expert-parallel size, only for :func:`moe_layer`: a dense layer and
        the head run no experts). Read only, never mutated."""
        key = (kind.__name__, shape_key if kind is moe_layer else shape_key[:-1])
        times = self._layer_cache.get(key)
        if times is None:
            times = self._layer_cache[key] = kind(self.cluster.accelerator, self.profile, impl, self.model, sh,
                                                  sustained=self.fitted.sustained_fraction)
        return times

    def _overlapped(self, seconds: float, window: float, overlap: bool) -> _Comm:
        """Communication exposed in full, or (``overlap``) what exceeds ``window`` of compute plus the fitted
        interference of the hidden part (:mod:`batchpilot.estimate.fitted`)."""
        if not overlap:
            return _Comm(exposed_s=seconds, total_s=seconds)
        exposed = max(0.0, seconds - window)
        return _Comm(exposed_s=exposed + self.fitted.overlap_interference * (seconds - exposed), total_s=seconds)

    def _activation_bytes(self, settings: RunSettings, sh: Shape) -> float:
        return sh.tokens * self.model.hidden_size * ACTIVATION_BYTES[settings.precision]

    def _tp_s(self, settings: RunSettings, sh: Shape, layers: int) -> float:
        if settings.tp == 1:
            return 0.0
        per_layer = 6 if settings.recompute == "full" else 4
        size = self._activation_bytes(settings, sh)
        if settings.sp:
            one = 2 * self.fabric.gather_s(size, settings.tp, 1)
        else:
            one = self.fabric.all_reduce_s(size, settings.tp, 1)
        return per_layer * layers * one

    def _cp_comm(self, settings: RunSettings, sh: Shape, layers: Sequence[tuple[LayerTimes, float]]) -> _Comm:
        """Ring attention: cp − 1 K/V sends per layer forward (twice that backward), hidden behind the kernel."""
        if sh.cp == 1:
            return _Comm()
        model = self.model
        kv_heads = model.num_kv_heads / min(settings.tp, model.num_kv_heads)
        if model.family == "mla":
            kv_heads = model.num_heads / settings.tp
        kv = sh.tokens * kv_heads * (model.head_dim_qk + model.head_dim_v) * ACTIVATION_BYTES[settings.precision]
        # The ring's ranks are tp apart (tensor parallelism innermost); once tp·cp GPUs exceed a node, a hop of
        # every ring crosses the network and sets the pace of each of its cp − 1 steps.
        inside = settings.tp * sh.cp <= self.fabric.gpus_per_node
        send = (sh.cp - 1) * self.fabric.p2p_s(kv, settings.tp if inside else self.fabric.gpus_per_node)
        passes = 2 if settings.recompute == "full" else 1
        exposed = total = 0.0
        for times, n in layers:
            attention_f = times.attention_forward.attention
            attention_b = times.backward.attention
            total += n * (passes * send + 2 * send)
            exposed += n * (passes * max(0.0, send - attention_f) + max(0.0, 2 * send - attention_b))
        return _Comm(exposed_s=exposed, total_s=total)

    def _ep_s(self, settings: RunSettings, sh: Shape, moe_layers: float) -> float:
        """Dispatch and combine all-to-alls of b·s·k·h activations, forward and backward (+2 with full recompute).
        With a deduplicating dispatcher each token crosses the network once per remote node it is routed to —
        E[nodes hit] = N·(1 − (1 − 1/N)^k) of N nodes for k uniformly routed experts, at most the model's
        node-limited routing (``topk_group`` of DeepSeek-V3) — and is dispatched in fp8 in fp8 runs."""
        if settings.ep == 1 or not self.model.is_moe:
            return 0.0
        per_layer = 6 if settings.recompute == "full" else 4
        k = self.model.num_experts_per_token
        size = self._activation_bytes(settings, sh) * k / settings.tp  # each TP rank dispatches its share
        stride = 1  # expert-parallel ranks are adjacent (expert tensor parallelism 1: Megatron-Core's expert grid)
        if not self.implementation_for(settings).deduplicated_dispatch:
            return per_layer * moe_layers * self.fabric.all_to_all_s(size, settings.ep, stride)
        _, nodes = self.fabric.placement(settings.ep, stride)
        hit = nodes * (1 - (1 - 1 / nodes) ** k)
        limit = self.model.hf_config.get("topk_group")
        if isinstance(limit, int) and limit > 0:
            hit = min(hit, float(limit))
        remote = hit * (nodes - 1) / nodes * sh.tokens / settings.tp * self.model.hidden_size
        token_bytes = ACTIVATION_BYTES[settings.precision]
        dispatch_bytes = 1 if settings.precision == "fp8" else token_bytes
        one_way = (self.fabric.all_to_all_s(size * dispatch_bytes / token_bytes, settings.ep, stride,
                                            remote_bytes=remote * dispatch_bytes)
                   + self.fabric.all_to_all_s(size, settings.ep, stride, remote_bytes=remote * token_bytes))
        return per_layer / 2 * moe_layers * one_way

    def _pp_s(self, settings: RunSettings, b: int, dp: int) -> float:
        """Point-to-point sends of b·s/cp·h activations ÷ t (:meth:`_activation_bytes` of the micro-batch's shape)."""
        if settings.pp == 1:
            return 0.0
        cp = settings.cp
        stride = settings.tp * cp * dp
        sends = 2 * settings.vpp  # interleaving multiplies the stage boundaries by v (§2.2.2)
        size = b * self.seq_len / cp * self.model.hidden_size * ACTIVATION_BYTES[settings.precision]
        return sends * self.fabric.p2p_s(size / settings.tp, stride)

    # ------------------------------------------------------------------ data parallelism and the optimizer
    def _stage_share(self, settings: RunSettings) -> float:
        return math.ceil(self.model.num_layers / settings.pp) / self.model.num_layers if settings.pp > 1 else 1.0

    def _dp_traffic(self, settings: RunSettings, dp: int) -> tuple[_Traffic, ...]:
        """Gradient reduction and ZeRO gathers of dense and expert parameters (module docstring): the groups of more
        than one rank, each :meth:`_group_traffic`."""
        ep, tp, cp = settings.ep, settings.tp, settings.cp
        share = self._stage_share(settings)
        groups = [(finetune_time.reduced_params(self.model, settings, self.dense_params) * share / tp, dp * cp, tp)]
        if self.expert_params:
            groups.append((self.expert_params * share / ep, dp * cp * tp // ep, ep))
        layers = math.ceil(self.model.num_layers / settings.pp)  # _Micro.layers
        return tuple(self._group_traffic(settings, params, ranks, stride, layers)
                     for params, ranks, stride in groups if ranks > 1)

    def _dp_comm(self, layout: _Layout, m: int, micro: _Micro) -> _Comm:
        """The layout's data-parallel traffic over ``m`` micro-batches, hidden behind ``micro``'s compute where it
        can be (:meth:`_group_comm`), plus the fitted interference of the hidden part."""
        exposed = total = 0.0
        for traffic in layout.traffic:
            group_exposed, group_total = self._group_comm(traffic, m, micro)
            exposed, total = exposed + group_exposed, total + group_total
        hidden = total - exposed
        return _Comm(exposed_s=exposed + self.fitted.overlap_interference * hidden, total_s=total)

    def _group_traffic(self, settings: RunSettings, params: float, ranks: int, stride: int, layers: int) -> _Traffic:
        """One data-parallel group of ``ranks`` ranks, ``stride`` apart, holding ``params`` per model shard: ZeRO-3
        gathers every layer's parameters forward and (unless never resharded) backward and reduce-scatters its
        gradients; ZeRO-2 reduce-scatters every micro-batch; ZeRO-0 (and DDP) all-reduces and ZeRO-1 reduce-scatters
        once per step; ZeRO-1/2 gather the updated parameters once; hybrid sharding all-reduces the gradient slice
        across the replicas."""
        z, fabric = settings.zero_stage, self.fabric
        grad_bytes = 4 if settings.precision == "fp32" else GRADIENT_REDUCE_BYTES[settings.engine]
        if settings.param_dtype == "bf16":
            grad_bytes = 2
        weight_bytes = 1 if settings.fp8_all_gather else ACTIVATION_BYTES[settings.precision]
        g, w = params * grad_bytes, params * weight_bytes
        shard, replicas = ranks, 1
        if settings.hybrid_shard and z >= 1:
            shard = max(1, min(ranks, self.cluster.devices_per_node // stride))
            replicas = ranks // shard

        def buckets(size: float) -> float:
            """How many buckets a bucketed reduction of ``size`` bytes issues: one per layer, none below
            :data:`MIN_BUCKET_BYTES`."""
            return max(1.0, min(float(layers), size / MIN_BUCKET_BYTES))

        def gather(size: float, count: float) -> float:
            """All-gather or reduce-scatter of ``size`` bytes issued in ``count`` equal buffers."""
            return count * fabric.gather_s(size / count, shard, stride)

        after: list[tuple[float, float, bool]] = []
        if z == 3:  # per layer: gather forward, gather backward, reduce-scatter; prefetched one layer ahead
            gathers = 1 if settings.reshard_after_forward == "never" else 2
            per, seconds, count = 3, gathers * gather(w, layers) / layers + gather(g, layers) / layers, float(layers)
        elif z == 2:
            per, seconds, count = 2, gather(g, buckets(g)), buckets(g)
        elif z == 0 or settings.engine == "torch":  # DDP all-reduce (ZeroRedundancyOptimizer too)
            per, seconds, count = 0, buckets(g) * fabric.all_reduce_s(g / buckets(g), shard, stride), buckets(g)
        else:
            per, seconds, count = 0, gather(g, buckets(g)), buckets(g)
        if z in (1, 2):  # updated parameters gathered once, behind the first forward
            after.append((gather(w, buckets(w)), buckets(w), True))
        if replicas > 1:  # hybrid: all-reduce of this rank's gradient slice across the replicas
            part = g / shard
            ar = buckets(part) * fabric.all_reduce_s(part / buckets(part), replicas, stride * shard)
            after.append((ar, buckets(part), False))
        return _Traffic(per=per, seconds=seconds, buckets=count, after=tuple(after))

    @staticmethod
    def _group_comm(traffic: _Traffic, m: int, micro: _Micro) -> tuple[float, float]:
        """One group's (exposed, total) seconds over ``m`` micro-batches: per layer only what exceeds that layer's
        compute is exposed, plus the first gather and the last reduce-scatter (ZeRO-3); a collective issued bucket
        by bucket behind a window of compute exposes what exceeds the window and its last bucket."""
        seconds = traffic.seconds
        if traffic.per == 3:
            layers = micro.layers
            exposed = m * (layers * max(0.0, seconds - micro.layer_s) + seconds)
            total = m * layers * seconds
        elif traffic.per == 2:
            exposed = m * (max(0.0, seconds - micro.backward_s) + seconds / traffic.buckets)
            total = m * seconds
        else:
            exposed, total = max(0.0, seconds - micro.backward_s) + seconds / traffic.buckets, seconds
        for after_s, count, forward in traffic.after:
            window = micro.forward_s if forward else micro.backward_s
            exposed, total = exposed + (max(0.0, after_s - window) + after_s / count), total + after_s
        return exposed, total

    def _optimizer_s(self, settings: RunSettings, dp: int) -> float:
        share, cp = self._stage_share(settings), settings.cp
        dense = finetune_time.reduced_params(self.model, settings, self.dense_params) * share / settings.tp
        experts = self.expert_params * share / settings.ep  # routed experts are not tensor-parallel
        if settings.zero_stage >= 1:
            dense /= dp * cp
            experts /= max(1, dp * cp * settings.tp // settings.ep)
        params = dense + experts
        touched = params * OPTIMIZER_BYTES_PER_PARAM[settings.optimizer]
        accelerator = self.cluster.accelerator
        if not settings.offload:
            return touched / (accelerator.memory_bandwidth_bytes_per_s * self.profile.memory_efficiency)
        host_bw = HOST_BANDWIDTH_BYTES_PER_S / self.cluster.devices_per_node
        transfer = params * (4 + ACTIVATION_BYTES[settings.precision]) / PCIE_BANDWIDTH_BYTES_PER_S
        return touched / host_bw + transfer
