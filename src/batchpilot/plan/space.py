"""The planner's search space: parallel layouts (tp, pp, vpp, ep, ZeRO stage, recomputation) over the cluster
and the (micro-batch, accumulation) pairs that reach the target global batch.

    >>> from batchpilot.specs.hardware import ClusterSpec, load_accelerator
    >>> from batchpilot.specs.model import load_model
    >>> cluster = ClusterSpec(accelerator=load_accelerator("h100-sxm"), devices_per_node=8, num_nodes=1)
    >>> req = PlanRequest(model=load_model("llama-3-8b"), cluster=cluster, seq_len=8192, global_batch_sequences=64)
    >>> target_sequences(req), len(list(layouts(req, 64))) > 0
    (64.0, True)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass

from batchpilot.errors import SpecError
from batchpilot.estimate.breakdown import MemoryBreakdown
from batchpilot.plan.engines import Capabilities, get_engine, pipeline_problem, recompute_for, shardings_for
from batchpilot.plan.request import ENGINE_ZERO_STAGES, MAX_MICRO_BATCH, MAX_PIPELINE_ZERO_STAGE, PlanRequest
from batchpilot.specs.batch import (
    MAX_BATCH_SEQUENCES,
    BatchError,
    sequences_from_tokens,
)
from batchpilot.specs.settings import RECOMPUTES, Engine, Recompute, RunSettings, validate_for_model


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


def engine_of(req: PlanRequest) -> Capabilities | None:
    """The engine ``req`` plans for (:mod:`batchpilot.plan.engines`), or None: every layout the memory model
    covers, with ``req.settings.engine``'s bookkeeping."""
    return None if req.engine is None else get_engine(req.engine)


def _seq_divisor(caps: Capabilities | None, tp: int, cp: int) -> int:
    """What the sequence length must divide by at this layout (torchtitan: tp × 2 × cp; cp > 1: 2 × cp)."""
    if caps is not None and caps.name == "torchtitan":
        return tp * 2 * cp
    return 2 * cp if cp > 1 else 1


def _tp_options(req: PlanRequest, caps: Capabilities | None) -> list[int]:
    if req.pins.tp is not None:
        return [req.pins.tp]
    if caps is not None and not caps.tp:
        return [1]
    out = []
    for tp in _divisors(req.model.num_heads):
        if tp > req.cluster.devices_per_node or req.cluster.total_devices % tp or req.seq_len % _seq_divisor(caps, tp, 1):
            continue
        try:
            validate_for_model(RunSettings(tp=tp), req.model)
        except SpecError:
            continue
        out.append(tp)
    return out


def _pp_options(req: PlanRequest, tp: int, caps: Capabilities | None) -> list[int]:
    if req.pins.pp is not None:
        return [req.pins.pp]
    if caps is not None and (not caps.pipeline_schedules or (tp > 1 and not caps.pipeline_with_tp)):
        return [1]
    rest = req.cluster.total_devices // tp
    return [p for p in _divisors(rest) if p <= req.model.num_layers]


def _cp_options(req: PlanRequest, tp: int, pp: int, caps: Capabilities | None, search: bool) -> list[int]:
    """Context-parallel sizes: the pin, else the settings' for a request without an engine, else 1 or (``search``)
    every divisor of the remaining GPUs that splits the sequence (the engine's rule); a ring may span nodes
    (Llama 3 405B trained with tp 8 × cp 16, arXiv:2407.21783 §3.3.2). The planner searches them only when
    nothing fits without: context parallelism is there to split the activations of sequences too long for one
    GPU (Megatron-LM ``--context-parallel-size``, torchtitan ``context_parallel_degree``), and its
    ring-attention cost at shorter sequences is the step-time model's least checked term."""
    if req.pins.cp is not None:
        return [req.pins.cp]
    if caps is None or not caps.cp or req.settings.attention != "flash" or not search:
        return [req.settings.cp if caps is None else 1]
    rest = req.cluster.total_devices // (tp * pp)
    return [c for c in _divisors(rest) if req.seq_len % _seq_divisor(caps, tp, c) == 0]


def _vpp_options(req: PlanRequest, pp: int, caps: Capabilities | None) -> list[int]:
    """Virtual stages per pipeline rank: 1 (plain 1F1B) and, with a pipeline and an engine with an interleaved
    schedule, the divisors of the layers per stage (each virtual stage an equal share of the rank's layers),
    or the pin when it fits."""
    layers_per_stage = -(-req.model.num_layers // pp)
    if req.pins.vpp is not None:
        fits = req.pins.vpp == 1 or (pp > 1 and req.pins.vpp <= layers_per_stage)
        return [req.pins.vpp] if fits else []
    if pp == 1 or (caps is not None and "interleaved" not in caps.pipeline_schedules):
        return [1]
    return _divisors(layers_per_stage)


def _schedulable(pairs: list[tuple[int, int]], caps: Capabilities | None, pp: int, vpp: int) -> list[tuple[int, int]]:
    """The (micro, accum) pairs the pipeline schedule runs: the engine's own rule
    (:func:`~batchpilot.plan.engines.pipeline_problem`) and, interleaved, the memory model's (accumulation a
    multiple of ``pp``, :func:`~batchpilot.specs.settings.check_interleaving`)."""
    out = pairs if vpp == 1 else [(m, a) for m, a in pairs if a % pp == 0]
    if caps is not None and pp > 1:
        out = [(m, a) for m, a in out if pipeline_problem(caps, pp=pp, vpp=vpp, accum=a) is None]
    return out


def _ep_options(req: PlanRequest, dp: int, caps: Capabilities | None) -> list[int]:
    if req.pins.ep is not None:
        return [req.pins.ep]
    if not req.model.is_moe or (caps is not None and not caps.ep):
        return [1]
    return [e for e in _divisors(req.model.num_experts) if dp % e == 0]


def _schemes(req: PlanRequest, caps: Capabilities | None, *, tp: int, pp: int, cp: int, ep: int,
             dp: int) -> list[tuple[Engine, int, tuple[Recompute, ...]]]:
    """(memory bookkeeping, ZeRO stage, recomputation policies) of each data-parallel scheme searched."""
    base, pins = req.settings, req.pins
    if caps is None:
        zeros = [pins.zero_stage] if pins.zero_stage is not None else _legacy_zero_options(req, pp)
        return [(base.engine, z, RECOMPUTES) for z in zeros]  # type: ignore[misc]
    out = []
    for sharding in shardings_for(caps, tp=tp, pp=pp, cp=cp, ep=ep, dp=dp):
        if pins.zero_stage is not None and sharding.zero_stage != pins.zero_stage:
            continue
        if base.offload and (not sharding.offload or (pp > 1 and not caps.pipeline_offload)):
            continue
        if not sharding.finetune and (base.finetune.method != "full" or base.finetune.frozen_layers):
            continue
        if base.optimizer in sharding.optimizers:
            out.append((sharding.bookkeeping, sharding.zero_stage, recompute_for(sharding, pp)))
    return out


def _legacy_zero_options(req: PlanRequest, pp: int) -> list[int]:
    stages = ENGINE_ZERO_STAGES[req.settings.engine]
    offload_needs_zero = req.settings.offload and req.settings.engine in ("deepspeed", "fsdp2")
    return [z for z in stages if (pp == 1 or z <= MAX_PIPELINE_ZERO_STAGE) and not (offload_needs_zero and z == 0)]


def _recompute_options(req: PlanRequest, allowed: tuple[Recompute, ...]) -> list[Recompute]:
    if req.pins.recompute is not None:
        return [req.pins.recompute] if req.pins.recompute in allowed else []  # type: ignore[list-item]
    return list(allowed)


def _sequence_parallel(caps: Capabilities | None, base: RunSettings, tp: int) -> bool:
    if caps is None or caps.sequence_parallel == "optional":
        return base.sp
    return caps.sequence_parallel == "always" and tp > 1


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


def clean_global_batch(req: PlanRequest, target: float) -> tuple[int, int]:
    """(global batch searched, the most data-parallel ranks it splits over). Exactly the target without
    ``max_deviation``; with it, the global batch within ``max_deviation`` of the target that splits over the most
    data-parallel ranks (a divisor of the GPU count; times the pinned micro-batch and accumulation), nearest the
    target among those. A multiple of the GPU count splits over every layout, so the layout is chosen for speed,
    never bent to fit an awkward batch (2,322 sequences on 64 GPUs at 10%: 2,304 = 36 × 64, not 2,322 = 2 × 1,161
    on 2 data-parallel ranks)."""
    unit = (req.pins.micro_batch or 1) * (req.pins.grad_accum or 1)
    gpus = req.cluster.total_devices
    if req.max_deviation == 0.0:
        g = int(target)
        return g, max((d for d in _divisors(gpus) if g % (d * unit) == 0), default=0)
    lo = max(1, math.ceil(target * (1 - req.max_deviation) - 1e-9))
    hi = math.floor(target * (1 + req.max_deviation) + 1e-9)
    for dp in reversed(_divisors(gpus)):
        step = dp * unit
        near = [k * step for k in (math.floor(target / step), math.ceil(target / step)) if lo <= k * step <= hi and k > 0]
        if near:
            return min(near, key=lambda g: (abs(g - target), g)), dp
    return max(1, round(target)), 0


def _micro_candidates(req: PlanRequest, global_batch: int, dp: int) -> list[tuple[int, int]]:
    """(micro, accum) pairs with ``micro × accum × dp = global_batch`` (micro ascending, the pins kept)."""
    pins = req.pins
    if global_batch % dp:
        return []
    local = global_batch // dp
    pairs = [(m, local // m) for m in _micro_divisors(local, pins.micro_batch)]
    return [(m, a) for m, a in pairs
            if (pins.micro_batch is None or m == pins.micro_batch) and (pins.grad_accum is None or a == pins.grad_accum)]


@dataclass(kw_only=True, slots=True)
class LayoutCandidate:
    settings: RunSettings
    dp: int
    pairs: list[tuple[int, int]]
    bound: float = 0.0
    """Best tokens/s over ``pairs`` ignoring memory."""
    memory: dict[tuple[int, int], MemoryBreakdown] = dataclasses.field(default_factory=dict)
    """Memory evaluated so far, by pair."""


def layouts(req: PlanRequest, global_batch: int, *, context_parallel: bool = True) -> Iterator[LayoutCandidate]:
    """Every layout of the search space (the engine's, :func:`engine_of`) with the (micro, accum) pairs its
    schedule runs at ``global_batch`` sequences (:func:`clean_global_batch`); combinations the settings refuse are
    left out; context-parallel sizes > 1 only with ``context_parallel`` (:func:`_cp_options`)."""
    caps = engine_of(req)
    gpus = req.cluster.total_devices
    for tp in _tp_options(req, caps):
        for pp in _pp_options(req, tp, caps):
            if gpus % (tp * pp):
                continue
            for cp in _cp_options(req, tp, pp, caps, context_parallel):
                if gpus % (tp * pp * cp):
                    continue
                yield from _layouts_at(req, global_batch, caps, tp=tp, pp=pp, cp=cp)


def _layouts_at(req: PlanRequest, global_batch: int, caps: Capabilities | None, *, tp: int, pp: int,
                cp: int) -> Iterator[LayoutCandidate]:
    dp = req.cluster.total_devices // (tp * pp * cp)
    pairs = _micro_candidates(req, global_batch, dp)
    for vpp in _vpp_options(req, pp, caps):
        runnable = _schedulable(pairs, caps, pp, vpp)
        if vpp > 1 and not runnable and req.pins.vpp is None:
            continue  # no accumulation the interleaved schedule runs: plain 1F1B covers this layout
        for ep in _ep_options(req, dp, caps):
            for bookkeeping, zero, policies in _schemes(req, caps, tp=tp, pp=pp, cp=cp, ep=ep, dp=dp):
                for recompute in _recompute_options(req, policies):
                    settings = _settings(req, caps, bookkeeping=bookkeeping, zero=zero, recompute=recompute,
                                         tp=tp, pp=pp, vpp=vpp, cp=cp, ep=ep)
                    if settings is not None:
                        yield LayoutCandidate(settings=settings, dp=dp, pairs=runnable)


def _settings(req: PlanRequest, caps: Capabilities | None, *, bookkeeping: Engine, zero: int, recompute: Recompute,
              tp: int, pp: int, vpp: int, cp: int, ep: int) -> RunSettings | None:
    """The run settings of one layout, or None when the settings refuse the combination (or the engine cannot
    checkpoint 1 layer in N with this policy)."""
    base = req.settings
    every = base.recompute_every if recompute != "none" else 1
    if caps is not None and every > 1 and recompute not in caps.every_n:
        return None
    try:
        return dataclasses.replace(base, engine=bookkeeping, tp=tp, pp=pp, vpp=vpp, cp=cp, ep=ep, zero_stage=zero,
                                   recompute=recompute, recompute_every=every,
                                   sp=_sequence_parallel(caps, base, tp))
    except SpecError:
        return None
