"""The planner's search space: parallel layouts (tp, pp, vpp, ep, ZeRO stage, recomputation) over the cluster
and the (micro-batch, accumulation) pairs that reach the target global batch.

    >>> from batchpilot.specs.hardware import ClusterSpec, load_accelerator
    >>> from batchpilot.specs.model import load_model
    >>> cluster = ClusterSpec(accelerator=load_accelerator("h100-sxm"), devices_per_node=8, num_nodes=1)
    >>> req = PlanRequest(model=load_model("llama-3-8b"), cluster=cluster, seq_len=8192, global_batch_sequences=64)
    >>> target_sequences(req), len(list(layouts(req, 64.0))) > 0
    (64.0, True)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass

from batchpilot.errors import SpecError
from batchpilot.estimate.breakdown import MemoryBreakdown
from batchpilot.plan.request import ENGINE_ZERO_STAGES, MAX_MICRO_BATCH, MAX_PIPELINE_ZERO_STAGE, PlanRequest
from batchpilot.specs.batch import (
    MAX_BATCH_SEQUENCES,
    BatchError,
    sequences_from_tokens,
)
from batchpilot.specs.settings import RECOMPUTES, RunSettings, validate_for_model


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
class LayoutCandidate:
    settings: RunSettings
    dp: int
    pairs: list[tuple[int, int]]
    bound: float = 0.0
    """Best tokens/s over ``pairs`` ignoring memory."""
    memory: dict[tuple[int, int], MemoryBreakdown] = dataclasses.field(default_factory=dict)
    """Memory evaluated so far, by pair."""


def layouts(req: PlanRequest, target: float) -> Iterator[LayoutCandidate]:
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
                            yield LayoutCandidate(settings=settings, dp=dp, pairs=interleaved)


