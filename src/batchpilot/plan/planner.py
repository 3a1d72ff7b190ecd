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

Search space (the engine's, :mod:`batchpilot.plan.engines`, when the request names one): tensor-parallel sizes that divide the attention heads (and the key/value heads' rule)
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

from batchpilot.errors import BatchpilotError, InfeasibleError, SpecError
from batchpilot.estimate.breakdown import MemoryBreakdown
from batchpilot.estimate.memory import analytic_memory
from batchpilot.estimate.steptime import StepTime, StepTimeModel
from batchpilot.plan.engines import request_problems
from batchpilot.plan.explain import (
    fixes,
    infeasible,
    memory_rejection,
    plan_warnings,
    rationale,
    refusal,
    target_warnings,
    unreachable_reason,
)
from batchpilot.plan.request import (
    DEFAULT_HEADROOM,
    ENGINE_ZERO_STAGES,
    MAX_PIPELINE_ZERO_STAGE,
    Pins,
    Plan,
    PlanRequest,
    PlanResult,
    Rejection,
)
from batchpilot.plan.space import LayoutCandidate, clean_global_batch, engine_of, layouts, target_sequences
from batchpilot.specs.batch import (
    BatchTriad,
)
from batchpilot.specs.settings import RunSettings, validate_for_model


# ---------------------------------------------------------------------- evaluation
class _Search:
    """One planning run: memory and step-time evaluation with counters."""

    def __init__(self, req: PlanRequest, target: float) -> None:
        self.req, self.target = req, target
        self.steps = StepTimeModel(req.model, req.cluster, seq_len=req.seq_len, calibration=req.calibration)
        self.extra_bytes = req.calibration.memory_overhead_bytes or 0
        self.memory_evaluations = 0

    def triad(self, layout: LayoutCandidate, pair: tuple[int, int]) -> BatchTriad:
        return BatchTriad(micro_batch_sequences=pair[0], grad_accum_steps=pair[1], data_parallel_ranks=layout.dp,
                          seq_len_tokens=self.req.seq_len)

    def memory(self, layout: LayoutCandidate, pair: tuple[int, int]) -> MemoryBreakdown:
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

    def bound(self, layout: LayoutCandidate) -> float:
        return max(self.steps.tokens_per_s(layout.settings, micro_batch=m, grad_accum=a, dp=layout.dp)
                   for m, a in layout.pairs)

    def fitting(self, layout: LayoutCandidate) -> tuple[int, MemoryBreakdown]:
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

    def candidates(self, layout: LayoutCandidate, count: int) -> list[tuple[StepTime, tuple[int, int]]]:
        """Step times of the first ``count`` pairs, fastest first."""
        timed = [(self.steps.estimate(layout.settings, self.triad(layout, p)), p) for p in layout.pairs[:count]]
        return sorted(timed, key=lambda sp: -sp[0].tokens_per_s)

    def plan(self, layout: LayoutCandidate, pair: tuple[int, int], step: StepTime) -> Plan:
        triad = self.triad(layout, pair)
        return Plan(triad=triad, settings=layout.settings, memory=self.memory(layout, pair), step=step,
                    deviation=(triad.global_batch_sequences - self.target) / self.target)


def _rank_key(p: Plan) -> tuple[float, float, int]:
    return (-p.step.tokens_per_s, abs(p.deviation), p.memory.total_bytes)


def plan(req: PlanRequest, *, suggest_fixes: bool = True) -> PlanResult:
    """Search the configuration space of ``req``; raises :class:`InfeasibleError` (or a ``BatchError``)
    with the reason and what would help when nothing is feasible.

    ``suggest_fixes=False`` plans once: when nothing fits it skips the search for what would (each fix is a
    re-planned request, so that search costs several plans) and raises a bare ``InfeasibleError("nothing fits")``,
    or the engine's problem alone — for callers that try several requests and explain only the last
    (``batchpilot rl plan``'s recomputation policies; the fixes' own re-plans)."""
    _check_pins(req)
    problem = _engine_problem(req)
    if problem is not None:
        raise refusal(SpecError, problem, fixes(req, _try, need_bytes=0) if suggest_fixes else ())
    target = target_sequences(req)
    global_batch, split = clean_global_batch(req, target)
    search = _Search(req, target)
    space, plans, rejected, pruned, feasible = _search(req, search, global_batch, context_parallel=False)
    caps = engine_of(req)
    if not plans and caps is not None and caps.cp and req.pins.cp is None:  # long sequences: split them too
        space, plans, rejected, pruned, feasible = _search(req, search, global_batch, context_parallel=True)
    if not plans:
        raise infeasible(req, target, space, rejected, _try) if suggest_fixes else InfeasibleError("nothing fits")
    rejected.sort(key=lambda r: (r.kind != "memory", r.need_bytes))
    result = PlanResult(request=req, target_sequences=target, plans=tuple(plans), rejected=tuple(rejected),
                        layouts=len(space), memory_evaluations=search.memory_evaluations, pruned=pruned,
                        feasible=feasible, warnings=target_warnings(req, target))
    return dataclasses.replace(result, rationale=rationale(result, split=split),
                               warnings=(*result.warnings, *plan_warnings(result, split=split)))


def _search(req: PlanRequest, search: _Search, global_batch: int, *,
            context_parallel: bool) -> tuple[list[LayoutCandidate], list[Plan], list[Rejection], int, int]:
    """The ranked plans of one pass over the layouts (bound-pruned), the rejections, and the counters."""
    space = list(layouts(req, global_batch, context_parallel=context_parallel))
    reachable = [lay for lay in space if lay.pairs]
    rejected = [Rejection(settings=lay.settings, dp=lay.dp, kind="batch",
                          reason=unreachable_reason(req, global_batch, lay.dp, lay.settings))
                for lay in space if not lay.pairs]
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
            rejected.append(memory_rejection(req, lay, smallest))
            continue
        feasible += count
        for step, pair in search.candidates(lay, count):
            kth = _kth_best(plans, req.top)
            if kth is not None and step.tokens_per_s < kth:
                break
            plans.append(search.plan(lay, pair, step))
            plans.sort(key=_rank_key)
            del plans[req.top:]
    return space, plans, rejected, pruned, feasible


def _try(req: PlanRequest) -> Plan | None:
    """The best plan for ``req`` without explanations, or None when nothing fits (suggestions re-plan with it)."""
    try:
        return plan(req, suggest_fixes=False).plans[0]
    except BatchpilotError:
        return None


def _kth_best(plans: list[Plan], k: int) -> float | None:
    return plans[k - 1].step.tokens_per_s if len(plans) >= k else None


def _engine_problem(req: PlanRequest) -> str | None:
    """The first setting or pin of ``req`` its engine does not run (:func:`~batchpilot.plan.engines.request_problems`)."""
    caps = engine_of(req)
    if caps is None:
        return None
    pins = req.pins
    problems = request_problems(caps, req.settings, tp=pins.tp, pp=pins.pp, vpp=pins.vpp, cp=pins.cp, ep=pins.ep,
                                zero=pins.zero_stage, recompute=pins.recompute)
    if not problems and caps.name == "torchtitan" and req.seq_len % 2:
        problems = [f"--engine torchtitan needs an even --seq-len (a multiple of tp × 2 × cp: torchtitan "
                    f"distributed/parallel_dims.py:365-372); use --seq-len {req.seq_len + 1}"]
    return problems[0] if problems else None


def _check_pins(req: PlanRequest) -> None:
    """Pinned layout values (and settings) that can never work: one-line errors with the rule and a fix."""
    pins, model, gpus = req.pins, req.model, req.cluster.total_devices
    caps = engine_of(req)
    probe = RunSettings(tp=pins.tp or 1, pp=pins.pp or 1, ep=pins.ep or 1)
    validate_for_model(probe, model)
    if pins.vpp is not None and pins.vpp > 1 and pins.pp is not None:
        validate_for_model(RunSettings(pp=pins.pp, vpp=pins.vpp), model)  # needs a pipeline, ≤ layers per stage
    cp = pins.cp or 1
    mp = probe.tp * probe.pp * cp
    if gpus % mp:
        raise SpecError(f"--gpus {gpus} is not a multiple of tp {probe.tp} × pp {probe.pp} × cp {cp} = {mp}; "
                        f"use a multiple of {mp} GPUs or other --tp/--pp/--cp")
    if pins.ep is not None and (gpus // mp) % pins.ep:
        raise SpecError(f"--ep {pins.ep} does not divide the {gpus // mp} data-parallel ranks "
                        f"(gpus {gpus} / (tp {probe.tp} × pp {probe.pp} × cp {cp})); use a divisor of {gpus // mp}")
    zero = pins.zero_stage
    if caps is None and zero is not None and zero not in ENGINE_ZERO_STAGES[req.settings.engine]:
        raise SpecError(f"--zero {zero} is not available with --engine {req.settings.engine} "
                        f"(stages {', '.join(map(str, ENGINE_ZERO_STAGES[req.settings.engine]))}); use --engine deepspeed or another --zero")
    limit = MAX_PIPELINE_ZERO_STAGE if caps is None else caps.pipeline_max_zero
    if zero is not None and zero > limit and probe.pp > 1:
        raise SpecError(f"--zero {zero} cannot be combined with pipeline parallelism (--pp {probe.pp}); "
                        f"use --zero {limit} or lower with --pp, or --pp 1")


__all__ = ["DEFAULT_HEADROOM", "ENGINE_ZERO_STAGES", "Pins", "Plan", "PlanRequest", "PlanResult", "Rejection",
           "plan", "rationale", "target_sequences"]
