"""Why a plan wins and why nothing fits: the rejection reasons, the one-line infeasibility message with the fixes
checked by re-planning (:func:`fixes`), the winner's rationale, and the target as read with its warnings.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from batchpilot.errors import BatchpilotError, InfeasibleError
from batchpilot.estimate.breakdown import MemoryBreakdown
from batchpilot.plan.engines import Capabilities, get_engine
from batchpilot.plan.request import Pins, Plan, PlanRequest, PlanResult, Rejection
from batchpilot.plan.space import LayoutCandidate, engine_of
from batchpilot.specs.batch import BatchError
from batchpilot.specs.settings import RunSettings
from batchpilot.units import GIB, format_count

Replan = Callable[[PlanRequest], Plan | None]
"""Plan ``req`` without explanations; None when nothing fits (the planner's own search)."""

FIX_ENGINE_ORDER = ("hf", "deepspeed", "torchtitan", "megatron", "lightning", "batchpilot")
"""Engines tried, in this order, for a fix the chosen engine cannot run (the first that fits is shown)."""

MIN_HEADROOM = 0.02
"""The least headroom a fix proposes: allocator fragmentation alone takes a few percent."""

MAX_GPU_DOUBLINGS = 6
"""More GPUs are tried up to 2^6 = 64× the cluster."""

MAX_BUBBLE_SHARE = 0.20
"""A winner whose pipeline bubble takes more of the step than this is flagged: (p − 1)/(m + p − 1) > 20% means
fewer than 4(p − 1) micro-batches per step (GPipe/1F1B bubble, Narayanan et al. 2021 §2.2)."""

MIN_MFU = 0.10
"""A multi-GPU winner below this model FLOPs utilisation is flagged: the model is too small for the cluster (its
step is communication and latency, not matrix multiplies), and fewer GPUs would train it about as fast."""


def unreachable_reason(req: PlanRequest, global_batch: int, dp: int, settings: RunSettings) -> str:
    if global_batch % dp == 0 and settings.pp > 1:
        caps = engine_of(req)
        engine = f"{caps.name}'s " if caps is not None else ""
        return (f"no micro × accum × dp {dp} = {global_batch} sequences that {engine}pipeline schedule runs at pp "
                f"{settings.pp}" + (f" × vpp {settings.vpp}" if settings.vpp > 1 else ""))
    return f"global batch {global_batch} sequences is not divisible by dp {dp} (with the pinned micro/accum)"


def memory_rejection(req: PlanRequest, lay: LayoutCandidate, smallest: MemoryBreakdown) -> Rejection:
    micro = lay.pairs[0][0]
    reason = (f"needs {smallest.total_bytes / GIB:.1f} GiB per GPU at micro-batch {micro} > "
              f"{req.budget_bytes / GIB:.1f} GiB usable")
    return Rejection(settings=lay.settings, dp=lay.dp, kind="memory", reason=reason,
                     need_bytes=smallest.total_bytes)


def infeasible(req: PlanRequest, target: float, layouts: list[LayoutCandidate], rejected: list[Rejection],
               replan: Replan) -> BatchpilotError:
    """The one-line error when no plan exists: no layout, no reachable batch, or nothing fits (with the
    :func:`fixes` that fit, each re-planned)."""
    gpus = req.cluster.total_devices
    if not layouts:
        pins = " ".join(req.pins.flags())
        engine = f" under --engine {req.engine}" if req.engine else ""
        why = f"no parallel layout of {req.model.name} on {gpus} GPUs runs with {pins or 'these settings'}{engine}"
        return refusal(InfeasibleError, why, fixes(req, replan, need_bytes=0),
                       otherwise="; unpin --tp/--pp/--vpp/--cp/--ep")
    memory = [r for r in rejected if r.kind == "memory"]
    if not memory:
        return BatchError(_batch_message(req, target, sorted({lay.dp for lay in layouts})))
    best = min(memory, key=lambda r: r.need_bytes)
    s = best.settings
    why = (f"nothing fits in {req.budget_bytes / GIB:.1f} GiB per GPU ({req.cluster.accelerator.name}, "
           f"{req.headroom:.0%} headroom): the leanest layout (tp {s.tp}, pp {s.pp}, ep {s.ep}, ZeRO-{s.zero_stage}, "
           f"recompute {s.recompute}) {best.reason.split(' > ')[0]}")
    return refusal(InfeasibleError, why, fixes(req, replan, need_bytes=best.need_bytes),
                   otherwise=f"; none of unpinning, --offload, --optimizer adamw-8bit, a smaller --headroom, another "
                             f"--engine or up to {2 ** MAX_GPU_DOUBLINGS}× the GPUs fits: use a smaller model or --seq-len")


def refusal(kind: type[BatchpilotError], why: str, found: Sequence[Fix], *, otherwise: str = "") -> BatchpilotError:
    """The one-line error ``why; fits with: A; B`` rendered from the fixes it carries (``fixes``: each
    :meth:`Fix.describe`), or ``why`` and ``otherwise`` when none fits."""
    described = tuple(f.describe() for f in found)
    if not described:
        return kind(why + otherwise)
    return kind(f"{why}; fits with: " + "; ".join(described), fixes=described)


def _batch_message(req: PlanRequest, target: float, dps: list[int]) -> str:
    """Why no layout reaches the target, with the nearest reachable global batches as fixes."""
    pinned = (req.pins.micro_batch or 1) * (req.pins.grad_accum or 1)
    units = [dp * pinned for dp in dps]
    options = sorted({g for u in units for g in _near_multiples(target, u)}, key=lambda g: (abs(g - target), g))[:2]
    fixes = [f"--global-batch {g}" for g in options]
    # the deviation that reaches the nearest of them (a fixed 5 % was advised even where it reaches none)
    percent = math.ceil(min(abs(g - target) for g in options) / target * 100 - 1e-9) if options else 100
    if req.max_deviation * 100 < percent < 100:
        fixes.append(f"--max-deviation {percent}%")
    rule = "micro × accum × dp"
    if req.pins.micro_batch or req.pins.grad_accum:
        rule += f" with --micro-batch {req.pins.micro_batch or 'any'} --grad-accum {req.pins.grad_accum or 'any'}"
    return (f"global batch {target:g} sequences cannot be split as {rule} on {req.cluster.total_devices} GPUs "
            f"(dp ∈ {{{', '.join(map(str, dps))}}}); use {' or '.join(fixes)}")


def _near_multiples(target: float, unit: int) -> list[int]:
    below = math.floor(target / unit) * unit
    return [g for g in (below, below + unit) if g > 0]


@dataclass(frozen=True, kw_only=True, slots=True)
class Fix:
    """A change of the request that makes a plan fit, with the plan it then gets."""

    flags: str
    """The change as ``plan`` flags (``--engine deepspeed --offload``); never a flag the user already pinned."""
    plan: Plan

    def describe(self) -> str:
        p, s = self.plan, self.plan.settings
        return (f"{self.flags} ({p.memory.total_bytes / GIB:.1f} GiB per GPU, {format_count(p.step.tokens_per_s)} "
                f"tokens/s: tp {s.tp} × pp {s.pp} × dp {p.triad.data_parallel_ranks}, ZeRO-{s.zero_stage}, recompute "
                f"{s.recompute}, micro-batch {p.triad.micro_batch_sequences} × accum {p.triad.grad_accum_steps})")


def fixes(req: PlanRequest, replan: Replan, *, need_bytes: int) -> list[Fix]:
    """What would make it fit, each re-planned (``replan``) and kept only when a plan fits: dropping the pins,
    another engine (the first of :data:`FIX_ENGINE_ORDER` that fits), optimizer states in CPU memory, an 8-bit
    optimizer, a smaller headroom; more GPUs only when nothing on this cluster fits. An option the chosen engine
    lacks is tried on the engines that have it, unless another engine already fits as it is."""
    out: list[Fix] = []
    if req.pins.pinned():
        _add(out, replan, f"without {' '.join(req.pins.flags())}", dataclasses.replace(req, pins=Pins()))
    switched = _first(out, replan, req, "", req.settings, lambda c: True, same=False)
    if not req.settings.offload:
        offloaded = dataclasses.replace(req.settings, offload=True, zero_stage=max(1, req.settings.zero_stage))
        _first(out, replan, req, "--offload", offloaded, lambda c: any(x.offload for x in c.shardings),
               others=not switched)
    if req.settings.optimizer != "adamw-8bit":
        _first(out, replan, req, "--optimizer adamw-8bit", dataclasses.replace(req.settings, optimizer="adamw-8bit"),
               lambda c: any("adamw-8bit" in x.optimizers for x in c.shardings), others=not switched)
    headroom = _headroom_needed(req, need_bytes) if need_bytes else None
    if headroom is not None:
        _add(out, replan, f"--headroom {headroom:.0%}", dataclasses.replace(req, headroom=headroom))
    if not out:
        more = _more_gpus(req, replan)
        if more is not None:
            out.append(more)
    return out


def _add(out: list[Fix], replan: Replan, flags: str, req: PlanRequest) -> bool:
    found = replan(dataclasses.replace(req, top=1))
    if found is not None:
        out.append(Fix(flags=flags, plan=found))
    return found is not None


def _first(out: list[Fix], replan: Replan, req: PlanRequest, flags: str, settings: RunSettings,
           has: Callable[[Capabilities], bool], *, same: bool = True, others: bool = True) -> bool:
    """The fix on the request's own engine (``same``), else (``others``) on the first other engine that has it
    and fits; whether one fits."""
    current = engine_of(req)
    if same and (current is None or has(current)) and _add(out, replan, flags, dataclasses.replace(req, settings=settings)):
        return True
    for name in FIX_ENGINE_ORDER if others else ():
        caps = get_engine(name)
        if caps is current or not has(caps):
            continue
        if _add(out, replan, f"--engine {name} {flags}".strip(), dataclasses.replace(req, engine=name, settings=settings)):
            return True
    return False


def _headroom_needed(req: PlanRequest, need_bytes: int) -> float | None:
    """The headroom (whole percent, at least :data:`MIN_HEADROOM`) under which the leanest layout fits, when it is
    smaller than the request's."""
    free = 1.0 - need_bytes / req.cluster.accelerator.memory_bytes
    headroom = math.floor(free * 100) / 100
    return headroom if MIN_HEADROOM <= headroom < req.headroom else None


def _more_gpus(req: PlanRequest, replan: Replan) -> Fix | None:
    """The smallest node count (doubling, up to 64×) on which some layout fits at micro-batch 1: on the
    request's engine, else on the first other engine of :data:`FIX_ENGINE_ORDER` that fits at some size."""
    current = engine_of(req)
    engines: list[str | None] = [current.name if current is not None else None]
    engines += [name for name in FIX_ENGINE_ORDER if current is None or name != current.name]
    for engine in engines:
        found = _more_gpus_on(dataclasses.replace(req, engine=engine) if engine is not None else req, replan)
        if found is not None:
            switch = f"--engine {engine} " if current is not None and engine != current.name else ""
            return dataclasses.replace(found, flags=switch + found.flags)
    return None


def _more_gpus_on(req: PlanRequest, replan: Replan) -> Fix | None:
    nodes = req.cluster.num_nodes
    per_node = req.cluster.devices_per_node
    bw = req.cluster.inter_node_bandwidth_bytes_per_s or req.cluster.accelerator.intra_node_bandwidth_bytes_per_s
    for _ in range(MAX_GPU_DOUBLINGS):
        nodes *= 2
        cluster = dataclasses.replace(req.cluster, num_nodes=nodes, inter_node_bandwidth_bytes_per_s=bw)
        gpus = cluster.total_devices
        trial = dataclasses.replace(req, cluster=cluster, global_batch_sequences=gpus, global_batch_tokens=None,
                                    max_deviation=0.0, top=1,
                                    pins=dataclasses.replace(req.pins, micro_batch=1, grad_accum=1))
        found = replan(trial)
        if found is not None:
            return Fix(flags=f"--gpus {gpus} (nodes of {per_node})", plan=found)
    return None


def rationale(result: PlanResult, *, split: int = 0) -> str:
    """One line on why the winner wins: its layout, what limits it, the margin over the runner-up, and how the
    global batch relates to the target (``split``: the most data-parallel ranks the global batch splits over)."""
    best = result.plans[0]
    t, s, st, mem = best.triad, best.settings, best.step, best.memory
    overheads = {"pipeline bubble": st.bubble_s, "tensor-parallel communication": st.tp_comm_s,
                 "expert all-to-all": st.ep_comm_s, "exposed data-parallel communication": st.dp_exposed_s,
                 "optimizer step": st.optimizer_s}
    name, seconds = max(overheads.items(), key=lambda kv: kv[1])
    interleaved = f" (interleaved, {s.vpp} virtual stages per rank)" if s.vpp > 1 else ""
    context = f" × cp {s.cp}" if s.cp > 1 else ""
    caps = engine_of(result.request)
    sharding = caps.sharding(s.engine, s.zero_stage) if caps is not None else None
    scheme = f" ({caps.name if caps is not None else ''} {sharding.name})" if sharding is not None else ""
    text = (f"tp {s.tp} × pp {s.pp}{interleaved}{context} × dp {t.data_parallel_ranks}, ZeRO-{s.zero_stage}{scheme}, "
            f"recompute {s.recompute}, micro-batch {t.micro_batch_sequences} × accum {t.grad_accum_steps}: uses "
            f"{mem.total_bytes / GIB:.1f} of {result.request.budget_bytes / GIB:.1f} GiB usable, MFU {st.mfu:.0%}; "
            f"largest overhead {name} {seconds / st.step_time_s:.0%} of the {st.step_time_s:.3g} s step")
    if len(result.plans) > 1:
        gain = st.tokens_per_s / result.plans[1].step.tokens_per_s - 1
        text += f"; {gain:+.1%} tokens/s over the runner-up"
    return text + _batch_note(result, split)


def _batch_note(result: PlanResult, split: int) -> str:
    """How the planned global batch relates to the target: the clean batch chosen within the deviation, or the
    data-parallel ranks an exact target leaves, with the batches that would split over every GPU."""
    req, best = result.request, result.plans[0]
    g, target, gpus = best.triad.global_batch_sequences, result.target_sequences, req.cluster.total_devices
    where = "every GPU" if split == gpus else f"at most {split} data-parallel ranks of the {gpus} GPUs"
    if g != target:
        return (f"; global batch {g:,} sequences ({best.deviation:+.2%}): the nearest to the target {target:,.6g} "
                f"within {req.max_deviation:.0%} that splits over {where}")
    if 0 < split < gpus and best.settings.model_parallel_size > 1 and best.triad.data_parallel_ranks == split:
        near = _near_multiples(target, gpus)
        off = min(abs(n - target) for n in near) / target
        return (f"; {g:,} sequences split over {where} as data parallelism: --global-batch "
                f"{' or '.join(map(str, near))} or --max-deviation {math.ceil(off * 100)}% splits over every GPU")
    return ""


def as_read(count: float) -> str:
    """A count as the shortest exact unit form: ``4M`` for 4,000,000, ``4Mi`` for 4,194,304, else the digits."""
    n = int(count)
    if n != count:
        return f"{count:,.6g}"
    for unit, size in (("Ti", 2**40), ("T", 10**12), ("Gi", 2**30), ("B", 10**9), ("Mi", 2**20), ("M", 10**6),
                       ("Ki", 2**10), ("K", 10**3)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n:,}"


def describe_target(result: PlanResult) -> str:
    """The target as read: ``4M sequences = 4,000,000 sequences × 4096 tokens = 16.38B tokens``."""
    req, target = result.request, result.target_sequences
    count = f"{int(target):,}" if float(target).is_integer() else f"{target:,.2f}"
    if req.global_batch_tokens is not None:
        tokens = req.global_batch_tokens
        head = f"{as_read(tokens)} tokens = " if as_read(tokens) != f"{tokens:,}" else ""
        return f"{head}{tokens:,} tokens = {count} sequences of {req.seq_len} tokens"
    head = f"{as_read(target)} sequences = " if as_read(target) != count else ""
    return f"{head}{count} sequences × {req.seq_len} tokens = {format_count(target * req.seq_len)} tokens"


def plan_warnings(result: PlanResult, *, split: int = 0) -> tuple[str, ...]:
    """What looks absurd about the winner although it fits: a pipeline bubble over :data:`MAX_BUBBLE_SHARE` of the
    step, an MFU under :data:`MIN_MFU` on more than one GPU (a model too small for the cluster), or a target of
    fewer sequences than GPUs that bounds the winner's data parallelism (``split``: the most data-parallel ranks
    the global batch splits over), so that GPUs the model does not need for memory go to model parallelism."""
    best, req = result.plans[0], result.request
    st, s = best.step, best.settings
    out = []
    gpus, dp = req.cluster.total_devices, best.triad.data_parallel_ranks
    if result.target_sequences < gpus and dp == split and s.model_parallel_size > 1:
        out.append(f"target {result.target_sequences:g} sequences is fewer than the {gpus} GPUs: data parallelism "
                   f"stops at {dp} ranks, so the winner spreads each over {s.model_parallel_size} GPUs of model "
                   f"parallelism; a larger global batch would let more of them train as data parallelism")
    bubble = st.bubble_s / st.step_time_s if st.step_time_s else 0.0
    if bubble > MAX_BUBBLE_SHARE:
        out.append(f"the winner's pipeline bubble is {bubble:.0%} of its step (pp {s.pp}, {best.triad.grad_accum_steps} "
                   f"micro-batches per step): use fewer stages (--pp) or a larger global batch")
    if gpus > 1 and st.mfu < MIN_MFU:
        out.append(f"MFU {st.mfu:.1%} on {gpus} GPUs: {req.model.name} ({format_count(req.model.params_total)} "
                   f"parameters) is too small to keep them busy; fewer GPUs would train it about as fast")
    return tuple(out)


def target_warnings(req: PlanRequest, target: float) -> tuple[str, ...]:
    """Targets that are plans but probably not what was meant: more tokens per step than any published
    pretraining batch (the registry's largest)."""
    from batchpilot.plan.registry import entries

    published = [e for e in entries() if e.global_batch_tokens]
    largest = max(published, key=lambda e: e.global_batch_tokens or 0, default=None)
    tokens = target * req.seq_len
    out = []
    if largest is not None and largest.global_batch_tokens and tokens > largest.global_batch_tokens:
        given = "--global-batch-tokens" if req.global_batch_tokens is not None else "--global-batch (sequences)"
        out.append(f"target {format_count(tokens)} tokens per step ({given} read as {as_read(target)} sequences of "
                   f"{req.seq_len} tokens) exceeds the largest published pretraining batch, "
                   f"{format_count(largest.global_batch_tokens)} tokens ({largest.name}); "
                   + ("did you mean --global-batch-tokens?" if req.global_batch_tokens is None else "check the units"))
    return tuple(out)


__all__ = ["Fix", "as_read", "describe_target", "fixes", "infeasible", "memory_rejection", "plan_warnings",
           "rationale", "refusal", "target_warnings", "unreachable_reason"]
