"""Why a plan wins and why nothing fits: the rejection reasons, the one-line infeasibility message with
suggestions checked by re-planning, and the winner's rationale.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from batchpilot.errors import BatchpilotError, InfeasibleError
from batchpilot.estimate.breakdown import MemoryBreakdown
from batchpilot.plan.request import Pins, Plan, PlanRequest, PlanResult, Rejection
from batchpilot.plan.space import LayoutCandidate
from batchpilot.specs.batch import (
    BatchError,
)
from batchpilot.specs.settings import RunSettings
from batchpilot.units import GIB

Replan = Callable[[PlanRequest], Plan | None]
"""Plan ``req`` without explanations; None when nothing fits (the planner's own search)."""


def unreachable_reason(req: PlanRequest, target: float, dp: int, settings: RunSettings) -> str:
    if settings.vpp > 1:
        return (f"no micro × accum × dp {dp} reaches {target:g} sequences with the accumulation a multiple of "
                f"pp {settings.pp} (interleaved schedule, vpp {settings.vpp})")
    if req.max_deviation == 0.0:
        return f"global batch {target:g} sequences is not divisible by dp {dp} (with the pinned micro/accum)"
    return f"no micro × accum × dp {dp} within {req.max_deviation:.1%} of {target:g} sequences"


def memory_rejection(req: PlanRequest, lay: LayoutCandidate, smallest: MemoryBreakdown) -> Rejection:
    micro = lay.pairs[0][0]
    reason = (f"needs {smallest.total_bytes / GIB:.1f} GiB per GPU at micro-batch {micro} > "
              f"{req.budget_bytes / GIB:.1f} GiB usable")
    return Rejection(settings=lay.settings, dp=lay.dp, kind="memory", reason=reason,
                     need_bytes=smallest.total_bytes)


def infeasible(req: PlanRequest, target: float, layouts: list[LayoutCandidate], rejected: list[Rejection],
               replan: Replan) -> BatchpilotError:
    """The one-line error when no plan exists: no layout, no reachable batch, or nothing fits (with
    :func:`_suggestions` checked by ``replan``)."""
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
    return InfeasibleError(f"{why}; {_suggestions(req, target, replan)}")


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


def _suggestions(req: PlanRequest, target: float, replan: Replan) -> str:
    """What would make it fit, each checked by re-planning: unpinning, a sharding engine, offload, more GPUs."""
    hints: list[str] = []
    if req.pins.pinned():
        found = replan(dataclasses.replace(req, pins=Pins(), top=1))
        if found is not None:
            s = found.settings
            hints.append(f"drop the pins {req.pins.pinned()} (tp {s.tp}, pp {s.pp}, ZeRO-{s.zero_stage}, "
                         f"recompute {s.recompute}, micro-batch {found.triad.micro_batch_sequences} fits)")
    if not hints and req.settings.engine in ("torch", "megatron"):
        sharded = dataclasses.replace(req, settings=dataclasses.replace(req.settings, engine="deepspeed"), top=1,
                                      pins=dataclasses.replace(req.pins, zero_stage=None))
        found = replan(sharded)
        if found is not None:
            hints.append(f"--engine deepspeed (ZeRO-{found.settings.zero_stage} fits)")
    if not hints and not req.settings.offload and req.settings.engine in ("deepspeed", "fsdp2"):
        settings = dataclasses.replace(req.settings, offload=True, zero_stage=max(1, req.settings.zero_stage))
        offload = dataclasses.replace(req, settings=settings, top=1,
                                      pins=dataclasses.replace(req.pins, zero_stage=None))
        if replan(offload) is not None:
            hints.append("--offload (optimizer states in CPU memory) fits")
    if not hints:
        more = _more_gpus(req, replan)
        hints.append(f"≥ {more} GPUs (fits at micro-batch 1)" if more else
                     "more GPUs, ZeRO-3 (--engine deepspeed), --recompute full, a larger --tp or a shorter --seq-len")
    return "try " + "; ".join(hints)


def _more_gpus(req: PlanRequest, replan: Replan) -> int | None:
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
        if replan(trial) is not None:
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


