"""The planner: the fastest feasible batch triad and parallel layout for a model, a cluster and a target batch.

Example (CPU, about a second for the largest presets)::

    >>> from batchpilot.specs.model import load_model
    >>> from batchpilot.specs.hardware import ClusterSpec, load_accelerator
    >>> cluster = ClusterSpec(accelerator=load_accelerator("h100-sxm"), devices_per_node=8, num_nodes=8,
    ...                       inter_node_bandwidth_bytes_per_s=50e9)
    >>> result = plan(PlanRequest(model=load_model("llama-3-8b"), cluster=cluster, seq_len=8192,
    ...                           global_batch_sequences=512))
    >>> best = result.plans[0]
    >>> best.triad.global_batch_sequences
    512

    batchpilot plan --model llama-3-8b --gpu h100-sxm --gpus 64 --seq-len 8192 --global-batch-tokens 4Mi

Search space: tensor-parallel sizes that divide the attention heads (and the key/value heads' rule)
and stay inside one node; pipeline stages up to the layer count (uneven splits allowed: the slowest
stage holds ⌈L/p⌉ layers); data-parallel ranks = GPUs / (tp × pp); expert-parallel sizes that divide
both the experts and the data-parallel ranks; the ZeRO stages the engine supports
(:data:`ENGINE_ZERO_STAGES`; with pipeline parallelism only 0 and 1, as DeepSpeed's PipelineEngine and
Megatron's distributed optimizer allow); recomputation none/selective/full; and every micro-batch with
``micro × accum × dp = global`` exactly (or, with ``max_deviation``, the nearest global batch within
that relative deviation), micro-batches up to :data:`MAX_MICRO_BATCH` sequences. Any of them can be pinned (:class:`Pins`).

Each candidate must fit: analytic memory (:func:`batchpilot.estimate.memory.analytic_memory`, plus
the calibration's measured overhead) ≤ device memory × (1 − headroom). Feasible candidates are ranked
by tokens/s from :class:`batchpilot.estimate.steptime.StepTimeModel`.

Speed: memory is non-decreasing in the micro-batch, so each layout needs O(log #micro-batches) memory
evaluations (bisection). Layouts are visited in order of an optimistic throughput bound (the step time
of their best micro-batch, ignoring memory); once ``top`` plans are found, a layout whose bound is below
the ``top``-th best cannot enter the ranking and is skipped (``pruned``) without evaluating memory.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from batchpilot.errors import BatchpilotError, InfeasibleError, SpecError
from batchpilot.estimate.breakdown import MemoryBreakdown
from batchpilot.estimate.calibration import DEFAULT_CALIBRATION, Calibration
from batchpilot.estimate.memory import analytic_memory
from batchpilot.estimate.overhead import OverheadModel
from batchpilot.estimate.steptime import StepTime, StepTimeModel
from batchpilot.specs.batch import (
    MAX_BATCH_SEQUENCES,
    BatchError,
    BatchTriad,
    check_seq_len,
    sequences_from_tokens,
)
from batchpilot.specs.hardware import ClusterSpec
from batchpilot.specs.model import ModelSpec
from batchpilot.specs.settings import RECOMPUTES, RunSettings, validate_for_model
from batchpilot.units import GIB

ENGINE_ZERO_STAGES: dict[str, tuple[int, ...]] = {
    "torch": (0, 1),          # DDP; ZeRO-1 = torch.distributed.optim.ZeroRedundancyOptimizer
    "fsdp2": (0, 2, 3),       # replicate; fully_shard(reshard_after_forward=False) ≈ 2; fully_shard = 3
    "deepspeed": (0, 1, 2, 3),
    "megatron": (0, 1),       # 1 = --use-distributed-optimizer
}
"""ZeRO stages searched per engine (a pinned stage is used as given)."""

DEFAULT_SETTINGS = RunSettings()
"""Settings when none are given (those of :class:`RunSettings`)."""

DEFAULT_HEADROOM = 0.10
"""Fraction of device memory kept free by default (allocator spikes, estimate error)."""

MAX_MICRO_BATCH = 1024
"""Largest micro-batch (sequences) searched unless pinned: keeps the search bounded for tiny models and
huge targets (memory allows more only for models far below the device size)."""

MAX_PIPELINE_ZERO_STAGE = 1
"""With pipeline parallelism DeepSpeed supports ZeRO-1 only, Megatron its distributed optimizer (≈ 1)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Pins:
    """Choices fixed by the user; None lets the planner search."""

    micro_batch: int | None = None
    grad_accum: int | None = None
    tp: int | None = None
    pp: int | None = None
    vpp: int | None = None
    ep: int | None = None
    zero_stage: int | None = None
    recompute: str | None = None

    def __post_init__(self) -> None:
        for name in ("micro_batch", "grad_accum", "tp", "pp", "vpp", "ep"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                flag = name.replace("_", "-")
                raise SpecError(f"--{flag} {value!r} must be a positive integer; omit it to let the planner choose")
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise SpecError(f"--zero {self.zero_stage!r} is not a ZeRO stage; use 0, 1, 2 or 3")
        if self.recompute is not None and self.recompute not in RECOMPUTES:
            raise SpecError(f"--recompute {self.recompute!r} is not one of: {', '.join(RECOMPUTES)}")

    def pinned(self) -> dict[str, Any]:
        """The pinned choices only (for messages)."""
        return {k: getattr(self, k) for k in ("micro_batch", "grad_accum", "tp", "pp", "vpp", "ep", "zero_stage",
                                               "recompute") if getattr(self, k) is not None}


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanRequest:
    """What to plan for. Exactly one of ``global_batch_sequences`` and ``global_batch_tokens``."""

    model: ModelSpec
    cluster: ClusterSpec
    seq_len: int
    """Tokens per sequence."""
    global_batch_sequences: int | None = None
    global_batch_tokens: int | None = None
    settings: RunSettings = DEFAULT_SETTINGS
    """Precision, optimizer, engine, attention, sequence parallelism, hybrid sharding, offload; its
    tp/pp/vpp/ep/zero/recompute are ignored (use :class:`Pins`)."""
    pins: Pins = Pins()
    headroom: float = DEFAULT_HEADROOM
    """Fraction of device memory left free."""
    max_deviation: float = 0.0
    """Largest allowed |global − target| / target; 0 requires the target exactly."""
    calibration: Calibration = DEFAULT_CALIBRATION
    overhead: OverheadModel | None = None
    """Memory overhead model (None: the analytic model's GPU defaults)."""
    top: int = 5
    """Plans returned."""
    exhaustive: bool = False
    """Evaluate every layout (no throughput-bound pruning); same ranking, slower."""

    def __post_init__(self) -> None:
        check_seq_len(self.seq_len)
        if (self.global_batch_sequences is None) == (self.global_batch_tokens is None):
            raise SpecError("give exactly one target: --global-batch-tokens, --global-batch or --like")
        if not 0.0 <= self.headroom < 1.0:
            raise SpecError(f"--headroom {self.headroom!r} must be in [0, 1), e.g. 0.1 for 10 %")
        if not 0.0 <= self.max_deviation < 1.0:
            raise SpecError(f"--max-deviation {self.max_deviation!r} must be in [0, 1), e.g. 0.05 for 5 %")
        if isinstance(self.top, bool) or not isinstance(self.top, int) or self.top < 1:
            raise SpecError(f"--top {self.top!r} must be a positive integer")

    @property
    def budget_bytes(self) -> int:
        """Usable bytes per GPU: device memory × (1 − headroom)."""
        return int(self.cluster.accelerator.memory_bytes * (1.0 - self.headroom))


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """One feasible configuration with its memory and speed."""

    triad: BatchTriad
    settings: RunSettings
    """The full run settings (layout, ZeRO stage, recomputation included)."""
    memory: MemoryBreakdown
    step: StepTime
    deviation: float
    """(global − target) / target; 0 for an exact match."""

    def to_dict(self) -> dict[str, Any]:
        """The ``plans[i]`` JSON contract."""
        t, s, st = self.triad, self.settings, self.step
        return {
            "micro_batch": t.micro_batch_sequences, "grad_accum": t.grad_accum_steps, "dp": t.data_parallel_ranks,
            "tp": s.tp, "pp": s.pp, "vpp": s.vpp, "ep": s.ep, "zero_stage": s.zero_stage, "recompute": s.recompute,
            "global_batch_sequences": t.global_batch_sequences, "global_batch_tokens": t.global_batch_tokens,
            "deviation": self.deviation,
            "memory": {k: v for k, v in self.memory.to_dict().items() if k != "details"},
            "flops_per_step": st.flops_per_step, "step_time_s": st.step_time_s, "tokens_per_s": st.tokens_per_s,
            "tflops_per_gpu": st.tflops_per_gpu, "mfu": st.mfu,
            "step": st.to_dict(), "settings": s.to_dict(),
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class Rejection:
    """A layout that produced no plan, and why."""

    settings: RunSettings
    dp: int
    kind: str
    """``memory`` (does not fit even at its smallest micro-batch) or ``batch`` (target not reachable)."""
    reason: str
    need_bytes: int = 0
    """For ``memory``: the smallest total it needs."""

    def to_dict(self) -> dict[str, Any]:
        s = self.settings
        return {"tp": s.tp, "pp": s.pp, "vpp": s.vpp, "ep": s.ep, "dp": self.dp, "zero_stage": s.zero_stage,
                "recompute": s.recompute, "kind": self.kind, "reason": self.reason}


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanResult:
    """Ranked plans, the rejected layouts and search statistics."""

    request: PlanRequest
    target_sequences: float
    """The target global batch in sequences (fractional when given in tokens that are not whole sequences)."""
    plans: tuple[Plan, ...]
    rejected: tuple[Rejection, ...]
    layouts: int
    """Layouts (tp, pp, ep, ZeRO, recompute) in the search space."""
    memory_evaluations: int
    pruned: int
    """Layouts skipped because their best possible throughput could not reach the ranking."""
    feasible: int = 0
    """Feasible (layout, micro-batch) candidates found among the layouts evaluated."""
    rationale: str = ""

    def to_dict(self, *, max_rejected: int = 20) -> dict[str, Any]:
        """The ``plan --json`` contract."""
        r = self.request
        return {
            "model": r.model.name, "cluster": r.cluster.to_dict(), "seq_len": r.seq_len,
            "target": {"global_batch_sequences": _whole(self.target_sequences),
                       "global_batch_tokens": _whole(self.target_sequences * r.seq_len),
                       "max_deviation": r.max_deviation},
            "headroom": r.headroom, "budget_bytes": r.budget_bytes, "calibration": r.calibration.source,
            "pins": r.pins.pinned(), "settings": r.settings.to_dict(),
            "plans": [p.to_dict() for p in self.plans], "rationale": self.rationale,
            "rejected": [x.to_dict() for x in self.rejected[:max_rejected]],
            "rejected_total": len(self.rejected),
            "search": {"layouts": self.layouts, "memory_evaluations": self.memory_evaluations,
                       "pruned": self.pruned, "feasible": self.feasible},
        }


def _whole(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


# ---------------------------------------------------------------------- the search space
def _divisors(n: int) -> list[int]:
    """All divisors of ``n`` ascending; O(√n), so only for small ``n`` (heads, GPUs, experts)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _micro_divisors(n: int, pinned: int | None) -> list[int]:
    """The divisors of ``n`` that are micro-batch candidates (≤ :data:`MAX_MICRO_BATCH`, or the pinned one),
    ascending; O(MAX_MICRO_BATCH) whatever ``n`` (the per-rank batch can be ~2^31)."""
    out = [m for m in range(1, min(n, MAX_MICRO_BATCH) + 1) if n % m == 0]
    if pinned is not None and pinned > MAX_MICRO_BATCH and n % pinned == 0:
        out.append(pinned)
    return out


def _tp_options(req: PlanRequest) -> list[int]:
    if req.pins.tp is not None:
        return [req.pins.tp]
    out = []
    for tp in _divisors(req.model.num_heads):
        if tp > req.cluster.devices_per_node or req.cluster.total_devices % tp:
            continue
        try:
            validate_for_model(RunSettings(tp=tp), req.model)
        except SpecError:
            continue
        out.append(tp)
    return out


def _pp_options(req: PlanRequest, tp: int) -> list[int]:
    if req.pins.pp is not None:
        return [req.pins.pp]
    rest = req.cluster.total_devices // tp
    return [p for p in _divisors(rest) if p <= req.model.num_layers]


def _vpp_options(req: PlanRequest, pp: int) -> list[int]:
    """Virtual stages per pipeline rank: 1 (plain 1F1B) and, with a pipeline, the divisors of the layers
    per stage (each virtual stage an equal share of the rank's layers), or the pin when it fits."""
    layers_per_stage = -(-req.model.num_layers // pp)
    if req.pins.vpp is not None:
        fits = req.pins.vpp == 1 or (pp > 1 and req.pins.vpp <= layers_per_stage)
        return [req.pins.vpp] if fits else []
    return [1] if pp == 1 else _divisors(layers_per_stage)


def _interleavable(pairs: list[tuple[int, int]], pp: int, vpp: int) -> list[tuple[int, int]]:
    """The (micro, accum) pairs the interleaved schedule can run (accumulation a multiple of ``pp``,
    :func:`~batchpilot.specs.settings.check_interleaving`)."""
    return pairs if vpp == 1 else [(m, a) for m, a in pairs if a % pp == 0]


def _ep_options(req: PlanRequest, dp: int) -> list[int]:
    if req.pins.ep is not None:
        return [req.pins.ep]
    if not req.model.is_moe:
        return [1]
    return [e for e in _divisors(req.model.num_experts) if dp % e == 0]


def _zero_options(req: PlanRequest, pp: int) -> list[int]:
    if req.pins.zero_stage is not None:
        return [req.pins.zero_stage]
    stages = ENGINE_ZERO_STAGES[req.settings.engine]
    offload_needs_zero = req.settings.offload and req.settings.engine in ("deepspeed", "fsdp2")
    return [z for z in stages if (pp == 1 or z <= MAX_PIPELINE_ZERO_STAGE) and not (offload_needs_zero and z == 0)]


def _recompute_options(req: PlanRequest) -> list[str]:
    return [req.pins.recompute] if req.pins.recompute is not None else list(RECOMPUTES)


def target_sequences(req: PlanRequest) -> float:
    """The target in sequences; tokens that are not whole sequences need ``max_deviation`` > 0; at most
    :data:`MAX_BATCH_SEQUENCES`."""
    target = _target_sequences(req)
    if target > MAX_BATCH_SEQUENCES:
        given = (f"target global batch {req.global_batch_sequences} sequences" if req.global_batch_tokens is None
                 else f"--global-batch-tokens {req.global_batch_tokens} at --seq-len {req.seq_len} is {target:.4g} "
                      f"sequences, which")
        raise SpecError(f"{given} is above the limit of 2^31 = {MAX_BATCH_SEQUENCES} sequences per step; "
                        f"use a smaller target")
    return target


def _target_sequences(req: PlanRequest) -> float:
    if req.global_batch_sequences is not None:
        if isinstance(req.global_batch_sequences, bool) or req.global_batch_sequences < 1:
            raise SpecError(f"--global-batch {req.global_batch_sequences!r} must be a positive integer")
        return float(req.global_batch_sequences)
    tokens = req.global_batch_tokens
    assert tokens is not None  # checked in PlanRequest
    if req.max_deviation > 0:
        if isinstance(tokens, bool) or tokens < 1:
            raise SpecError(f"--global-batch-tokens {tokens!r} must be a positive integer")
        return tokens / req.seq_len
    try:
        return float(sequences_from_tokens(tokens, seq_len_tokens=req.seq_len, what="--global-batch-tokens"))
    except BatchError as exc:
        raise BatchError(f"{exc}, or allow the nearest with --max-deviation 1%") from None


def _micro_candidates(req: PlanRequest, target: float, dp: int) -> list[tuple[int, int]]:
    """(micro, accum) pairs for ``dp`` ranks, micro ascending: exact divisors, or the nearest accumulation
    within ``max_deviation``."""
    pins = req.pins
    if req.max_deviation == 0.0:
        g = int(target)
        if g % dp:
            return []
        local = g // dp
        pairs = [(m, local // m) for m in _micro_divisors(local, pins.micro_batch)]
    else:
        limit = max(1, math.floor(target * (1 + req.max_deviation) / dp))
        pairs = []
        for m in range(1, min(limit, pins.micro_batch or MAX_MICRO_BATCH) + 1):
            accum = max(1, round(target / (m * dp)))
            if abs(m * accum * dp - target) <= req.max_deviation * target:
                pairs.append((m, accum))
    return [(m, a) for m, a in pairs
            if (pins.micro_batch is None or m == pins.micro_batch) and (pins.grad_accum is None or a == pins.grad_accum)]


@dataclass(kw_only=True, slots=True)
class _Layout:
    settings: RunSettings
    dp: int
    pairs: list[tuple[int, int]]
    bound: float = 0.0
    """Best tokens/s over ``pairs`` ignoring memory."""
    memory: dict[tuple[int, int], MemoryBreakdown] = dataclasses.field(default_factory=dict)
    """Memory evaluated so far, by pair."""


def _layouts(req: PlanRequest, target: float) -> Iterator[_Layout]:
    base = req.settings
    gpus = req.cluster.total_devices
    for tp in _tp_options(req):
        for pp in _pp_options(req, tp):
            if gpus % (tp * pp):
                continue
            dp = gpus // (tp * pp)
            pairs = _micro_candidates(req, target, dp)
            for vpp in _vpp_options(req, pp):
                interleaved = _interleavable(pairs, pp, vpp)
                if vpp > 1 and not interleaved and req.pins.vpp is None:
                    continue  # no accumulation that is a multiple of pp: plain 1F1B covers this layout
                for ep in _ep_options(req, dp):
                    for zero in _zero_options(req, pp):
                        for recompute in _recompute_options(req):
                            settings = dataclasses.replace(base, tp=tp, pp=pp, vpp=vpp, ep=ep, zero_stage=zero,
                                                           recompute=recompute)  # type: ignore[arg-type]
                            yield _Layout(settings=settings, dp=dp, pairs=interleaved)


# ---------------------------------------------------------------------- evaluation
class _Search:
    """One planning run: memory and step-time evaluation with counters."""

    def __init__(self, req: PlanRequest, target: float) -> None:
        self.req, self.target = req, target
        self.steps = StepTimeModel(req.model, req.cluster, seq_len=req.seq_len, calibration=req.calibration)
        self.extra_bytes = req.calibration.memory_overhead_bytes or 0
        self.memory_evaluations = 0

    def triad(self, layout: _Layout, pair: tuple[int, int]) -> BatchTriad:
        return BatchTriad(micro_batch_sequences=pair[0], grad_accum_steps=pair[1], data_parallel_ranks=layout.dp,
                          seq_len_tokens=self.req.seq_len)

    def memory(self, layout: _Layout, pair: tuple[int, int]) -> MemoryBreakdown:
        cached = layout.memory.get(pair)
        if cached is not None:
            return cached
        self.memory_evaluations += 1
        mem = analytic_memory(self.req.model, layout.settings, micro_batch=pair[0], seq_len=self.req.seq_len,
                              dp=layout.dp, grad_accum=pair[1], overhead=self.req.overhead,
                              gpus_per_node=self.req.cluster.devices_per_node)
        if self.extra_bytes:
            mem = dataclasses.replace(mem, overhead_bytes=mem.overhead_bytes + self.extra_bytes)
        layout.memory[pair] = mem
        return mem

    def bound(self, layout: _Layout) -> float:
        return max(self.steps.tokens_per_s(layout.settings, micro_batch=m, grad_accum=a, dp=layout.dp)
                   for m, a in layout.pairs)

    def fitting(self, layout: _Layout) -> tuple[int, MemoryBreakdown]:
        """How many of the layout's pairs fit (a prefix: memory grows with the micro-batch; bisection),
        and the memory of the smallest pair."""
        budget = self.req.budget_bytes
        pairs = layout.pairs
        first = self.memory(layout, pairs[0])
        if first.total_bytes > budget:
            return 0, first
        lo, hi = 0, len(pairs)  # pairs[lo] fits; pairs[hi] (if any) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.memory(layout, pairs[mid]).total_bytes <= budget:
                lo = mid
            else:
                hi = mid
        return lo + 1, first

    def candidates(self, layout: _Layout, count: int) -> list[tuple[StepTime, tuple[int, int]]]:
        """Step times of the first ``count`` pairs, fastest first."""
        timed = [(self.steps.estimate(layout.settings, self.triad(layout, p)), p) for p in layout.pairs[:count]]
        return sorted(timed, key=lambda sp: -sp[0].tokens_per_s)

    def plan(self, layout: _Layout, pair: tuple[int, int], step: StepTime) -> Plan:
        triad = self.triad(layout, pair)
        return Plan(triad=triad, settings=layout.settings, memory=self.memory(layout, pair), step=step,
                    deviation=(triad.global_batch_sequences - self.target) / self.target)


def _rank_key(p: Plan) -> tuple[float, float, int]:
    return (-p.step.tokens_per_s, abs(p.deviation), p.memory.total_bytes)


def plan(req: PlanRequest) -> PlanResult:
    """Search the configuration space of ``req``; raises :class:`InfeasibleError` (or a ``BatchError``)
    with the reason and what would help when nothing is feasible."""
    return _plan(req, explain=True)


def _plan(req: PlanRequest, *, explain: bool) -> PlanResult:
    """:func:`plan`; ``explain=False`` skips the (re-planning) search for fixes when nothing fits."""
    _check_pins(req)
    target = target_sequences(req)
    search = _Search(req, target)
    layouts = list(_layouts(req, target))
    reachable = [lay for lay in layouts if lay.pairs]
    rejected = [Rejection(settings=lay.settings, dp=lay.dp, kind="batch",
                          reason=_unreachable_reason(req, target, lay.dp, lay.settings)) for lay in layouts if not lay.pairs]
    for lay in reachable:
        lay.bound = search.bound(lay)
    reachable.sort(key=lambda lay: -lay.bound)
    plans: list[Plan] = []
    pruned = feasible = 0
    for lay in reachable:
        kth = _kth_best(plans, req.top)
        if not req.exhaustive and kth is not None and lay.bound < kth:
            pruned += 1
            continue
        count, smallest = search.fitting(lay)
        if not count:
            rejected.append(_memory_rejection(req, lay, smallest))
            continue
        feasible += count
        for step, pair in search.candidates(lay, count):
            kth = _kth_best(plans, req.top)
            if kth is not None and step.tokens_per_s < kth:
                break
            plans.append(search.plan(lay, pair, step))
            plans.sort(key=_rank_key)
            del plans[req.top:]
    if not plans:
        raise _infeasible(req, target, layouts, rejected) if explain else InfeasibleError("nothing fits")
    rejected.sort(key=lambda r: (r.kind != "memory", r.need_bytes))
    result = PlanResult(request=req, target_sequences=target, plans=tuple(plans), rejected=tuple(rejected),
                        layouts=len(layouts), memory_evaluations=search.memory_evaluations, pruned=pruned,
                        feasible=feasible)
    return dataclasses.replace(result, rationale=rationale(result))


def _kth_best(plans: list[Plan], k: int) -> float | None:
    return plans[k - 1].step.tokens_per_s if len(plans) >= k else None


def _check_pins(req: PlanRequest) -> None:
    """Pinned layout values that can never work: one-line errors with the rule and a fix."""
    pins, model, gpus = req.pins, req.model, req.cluster.total_devices
    probe = RunSettings(tp=pins.tp or 1, pp=pins.pp or 1, ep=pins.ep or 1)
    validate_for_model(probe, model)
    if pins.vpp is not None and pins.vpp > 1 and pins.pp is not None:
        validate_for_model(RunSettings(pp=pins.pp, vpp=pins.vpp), model)  # needs a pipeline, ≤ layers per stage
    mp = probe.tp * probe.pp
    if gpus % mp:
        raise SpecError(f"--gpus {gpus} is not a multiple of tp {probe.tp} × pp {probe.pp} = {mp}; "
                        f"use a multiple of {mp} GPUs or other --tp/--pp")
    if pins.ep is not None and (gpus // mp) % pins.ep:
        raise SpecError(f"--ep {pins.ep} does not divide the {gpus // mp} data-parallel ranks "
                        f"(gpus {gpus} / (tp {probe.tp} × pp {probe.pp})); use a divisor of {gpus // mp}")
    zero = pins.zero_stage
    if zero is not None and zero not in ENGINE_ZERO_STAGES[req.settings.engine]:
        raise SpecError(f"--zero {zero} is not available with --engine {req.settings.engine} "
                        f"(stages {', '.join(map(str, ENGINE_ZERO_STAGES[req.settings.engine]))}); use --engine deepspeed or another --zero")
    if zero is not None and zero > MAX_PIPELINE_ZERO_STAGE and probe.pp > 1:
        raise SpecError(f"--zero {zero} cannot be combined with pipeline parallelism (--pp {probe.pp}); "
                        f"use --zero 0 or 1 with --pp, or --pp 1")


# ---------------------------------------------------------------------- explanations
def _unreachable_reason(req: PlanRequest, target: float, dp: int, settings: RunSettings) -> str:
    if settings.vpp > 1:
        return (f"no micro × accum × dp {dp} reaches {target:g} sequences with the accumulation a multiple of "
                f"pp {settings.pp} (interleaved schedule, vpp {settings.vpp})")
    if req.max_deviation == 0.0:
        return f"global batch {target:g} sequences is not divisible by dp {dp} (with the pinned micro/accum)"
    return f"no micro × accum × dp {dp} within {req.max_deviation:.1%} of {target:g} sequences"


def _memory_rejection(req: PlanRequest, lay: _Layout, smallest: MemoryBreakdown) -> Rejection:
    micro = lay.pairs[0][0]
    reason = (f"needs {smallest.total_bytes / GIB:.1f} GiB per GPU at micro-batch {micro} > "
              f"{req.budget_bytes / GIB:.1f} GiB usable")
    return Rejection(settings=lay.settings, dp=lay.dp, kind="memory", reason=reason,
                     need_bytes=smallest.total_bytes)


def _infeasible(req: PlanRequest, target: float, layouts: list[_Layout], rejected: list[Rejection]) -> BatchpilotError:
    gpus = req.cluster.total_devices
    if not layouts:
        return InfeasibleError(f"no parallel layout of {req.model.name} fits {gpus} GPUs with the pins "
                               f"{req.pins.pinned()}; unpin --tp/--pp/--vpp/--ep")
    memory = [r for r in rejected if r.kind == "memory"]
    if not memory:
        return BatchError(_batch_message(req, target, sorted({lay.dp for lay in layouts})))
    best = min(memory, key=lambda r: r.need_bytes)
    s = best.settings
    why = (f"nothing fits in {req.budget_bytes / GIB:.1f} GiB per GPU ({req.cluster.accelerator.name}, "
           f"{req.headroom:.0%} headroom): the leanest layout (tp {s.tp}, pp {s.pp}, ep {s.ep}, ZeRO-{s.zero_stage}, "
           f"recompute {s.recompute}) {best.reason.split(' > ')[0]}")
    return InfeasibleError(f"{why}; {_suggestions(req, target)}")


def _batch_message(req: PlanRequest, target: float, dps: list[int]) -> str:
    """Why no layout reaches the target, with the nearest reachable global batches as fixes."""
    pinned = (req.pins.micro_batch or 1) * (req.pins.grad_accum or 1)
    units = [dp * pinned for dp in dps]
    options = sorted({g for u in units for g in _near_multiples(target, u)}, key=lambda g: (abs(g - target), g))[:2]
    fixes = [f"--global-batch {g}" for g in options] + ["--max-deviation 5%"]
    rule = "micro × accum × dp"
    if req.pins.micro_batch or req.pins.grad_accum:
        rule += f" with --micro-batch {req.pins.micro_batch or 'any'} --grad-accum {req.pins.grad_accum or 'any'}"
    return (f"global batch {target:g} sequences cannot be split as {rule} on {req.cluster.total_devices} GPUs "
            f"(dp ∈ {{{', '.join(map(str, dps))}}}); use {' or '.join(fixes)}")


def _near_multiples(target: float, unit: int) -> list[int]:
    below = math.floor(target / unit) * unit
    return [g for g in (below, below + unit) if g > 0]


def _suggestions(req: PlanRequest, target: float) -> str:
    """What would make it fit, each checked by re-planning: unpinning, a sharding engine, offload, more GPUs."""
    hints: list[str] = []
    if req.pins.pinned():
        found = _try(dataclasses.replace(req, pins=Pins(), top=1))
        if found is not None:
            s = found.settings
            hints.append(f"drop the pins {req.pins.pinned()} (tp {s.tp}, pp {s.pp}, ZeRO-{s.zero_stage}, "
                         f"recompute {s.recompute}, micro-batch {found.triad.micro_batch_sequences} fits)")
    if not hints and req.settings.engine in ("torch", "megatron"):
        sharded = dataclasses.replace(req, settings=dataclasses.replace(req.settings, engine="deepspeed"), top=1,
                                      pins=dataclasses.replace(req.pins, zero_stage=None))
        found = _try(sharded)
        if found is not None:
            hints.append(f"--engine deepspeed (ZeRO-{found.settings.zero_stage} fits)")
    if not hints and not req.settings.offload and req.settings.engine in ("deepspeed", "fsdp2"):
        settings = dataclasses.replace(req.settings, offload=True, zero_stage=max(1, req.settings.zero_stage))
        offload = dataclasses.replace(req, settings=settings, top=1,
                                      pins=dataclasses.replace(req.pins, zero_stage=None))
        if _try(offload) is not None:
            hints.append("--offload (optimizer states in CPU memory) fits")
    if not hints:
        more = _more_gpus(req)
        hints.append(f"≥ {more} GPUs (fits at micro-batch 1)" if more else
                     "more GPUs, ZeRO-3 (--engine deepspeed), --recompute full, a larger --tp or a shorter --seq-len")
    return "try " + "; ".join(hints)


def _try(req: PlanRequest) -> Plan | None:
    try:
        return _plan(req, explain=False).plans[0]
    except BatchpilotError:
        return None


def _more_gpus(req: PlanRequest) -> int | None:
    """The smallest node count (doubling, up to 64×) on which some layout fits at micro-batch 1."""
    nodes = req.cluster.num_nodes
    bw = req.cluster.inter_node_bandwidth_bytes_per_s or req.cluster.accelerator.intra_node_bandwidth_bytes_per_s
    for _ in range(6):
        nodes *= 2
        cluster = dataclasses.replace(req.cluster, num_nodes=nodes, inter_node_bandwidth_bytes_per_s=bw)
        gpus = cluster.total_devices
        trial = dataclasses.replace(req, cluster=cluster, global_batch_sequences=gpus, global_batch_tokens=None,
                                    max_deviation=0.0, top=1,
                                    pins=dataclasses.replace(req.pins, micro_batch=1, grad_accum=1))
        if _try(trial) is not None:
            return gpus
    return None


def rationale(result: PlanResult) -> str:
    """One line on why the winner wins: its layout, what limits it, and the margin over the runner-up."""
    best = result.plans[0]
    t, s, st, mem = best.triad, best.settings, best.step, best.memory
    overheads = {"pipeline bubble": st.bubble_s, "tensor-parallel communication": st.tp_comm_s,
                 "expert all-to-all": st.ep_comm_s, "exposed data-parallel communication": st.dp_exposed_s,
                 "optimizer step": st.optimizer_s}
    name, seconds = max(overheads.items(), key=lambda kv: kv[1])
    interleaved = f" (interleaved, {s.vpp} virtual stages per rank)" if s.vpp > 1 else ""
    text = (f"tp {s.tp} × pp {s.pp}{interleaved} × dp {t.data_parallel_ranks}, ZeRO-{s.zero_stage}, recompute {s.recompute}, "
            f"micro-batch {t.micro_batch_sequences} × accum {t.grad_accum_steps}: uses "
            f"{mem.total_bytes / GIB:.1f} of {result.request.budget_bytes / GIB:.1f} GiB usable, MFU {st.mfu:.0%}; "
            f"largest overhead {name} {seconds / st.step_time_s:.0%} of the {st.step_time_s:.3g} s step")
    if len(result.plans) > 1:
        gain = st.tokens_per_s / result.plans[1].step.tokens_per_s - 1
        text += f"; {gain:+.1%} tokens/s over the runner-up"
    if best.deviation:
        text += f"; global batch deviates {best.deviation:+.2%} from the target"
    return text


__all__ = ["DEFAULT_HEADROOM", "ENGINE_ZERO_STAGES", "Pins", "Plan", "PlanRequest", "PlanResult", "Rejection",
           "plan", "rationale", "target_sequences"]
