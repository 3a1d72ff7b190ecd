"""What the planner is asked and what it answers: :class:`PlanRequest` (with :class:`Pins`), :class:`Plan`,
:class:`Rejection` and :class:`PlanResult` (the ``plan --json`` contract), and the engine constants the
search space uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from batchpilot.errors import SpecError
from batchpilot.estimate.breakdown import MemoryBreakdown
from batchpilot.estimate.calibration import DEFAULT_CALIBRATION, Calibration
from batchpilot.estimate.overhead import OverheadModel
from batchpilot.estimate.steptime import StepTime
from batchpilot.records.plan import PlanMemory, PlanRecord, PlanRejection, PlanRow, PlanSearch, PlanTarget
from batchpilot.specs.batch import (
    BatchTriad,
    check_seq_len,
)
from batchpilot.specs.hardware import ClusterSpec
from batchpilot.specs.model import ModelSpec
from batchpilot.specs.settings import RECOMPUTES, RunSettings

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
    cp: int | None = None
    zero_stage: int | None = None
    recompute: str | None = None

    def __post_init__(self) -> None:
        for name in ("micro_batch", "grad_accum", "tp", "pp", "vpp", "ep", "cp"):
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
        return {k: getattr(self, k) for k in ("micro_batch", "grad_accum", "tp", "pp", "vpp", "ep", "cp", "zero_stage",
                                               "recompute") if getattr(self, k) is not None}

    def flags(self) -> list[str]:
        """The pinned choices as the ``plan`` flags that pin them (``--tp 2 --recompute full``)."""
        names = {"zero_stage": "--zero"}
        return [f"{names.get(k, '--' + k.replace('_', '-'))} {v}" for k, v in self.pinned().items()]


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
    """Precision, optimizer, attention, sequence parallelism, hybrid sharding, offload, compile, fp8 recipe,
    recompute-every; its tp/pp/vpp/cp/ep/zero/recompute are ignored (use :class:`Pins`), and so is its
    ``engine`` (the memory bookkeeping) when :attr:`engine` is given."""
    engine: str | None = None
    """The engine that will run the plan (``batchpilot.plan.engines``: batchpilot, deepspeed, hf, lightning,
    torchtitan, megatron): only what it runs from its own configuration is searched, each data-parallel scheme
    with its memory bookkeeping. None: every layout the memory model covers, with ``settings.engine``'s
    bookkeeping (no engine is promised to run it; each export checks its own rules)."""
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

    def to_record(self) -> PlanRow:
        """The ``plans[i]`` row of the plan record (:class:`batchpilot.records.plan.PlanRow`)."""
        t, s, st, m = self.triad, self.settings, self.step, self.memory
        return PlanRow(
            micro_batch=t.micro_batch_sequences, grad_accum=t.grad_accum_steps, dp=t.data_parallel_ranks,
            tp=s.tp, pp=s.pp, vpp=s.vpp, ep=s.ep, zero_stage=s.zero_stage, recompute=s.recompute,
            global_batch_sequences=t.global_batch_sequences, global_batch_tokens=t.global_batch_tokens,
            deviation=self.deviation,
            memory=PlanMemory(weights=m.weights_bytes, gradients=m.gradients_bytes, optimizer=m.optimizer_bytes,
                              activations=m.activations_bytes, overhead=m.overhead_bytes, total=m.total_bytes),
            flops_per_step=st.flops_per_step, step_time_s=st.step_time_s, tokens_per_s=st.tokens_per_s,
            tflops_per_gpu=st.tflops_per_gpu, mfu=st.mfu, step=st.to_dict(), settings=s,
        )

    def to_dict(self) -> dict[str, Any]:
        """The ``plans[i]`` JSON contract."""
        return self.to_record().to_dict()


@dataclass(frozen=True, kw_only=True, slots=True)
class Rejection:
    """A layout that produced no plan, and why."""

    settings: RunSettings
    dp: int
    kind: Literal["memory", "batch"]
    """``memory`` (does not fit even at its smallest micro-batch) or ``batch`` (target not reachable)."""
    reason: str
    need_bytes: int = 0
    """For ``memory``: the smallest total it needs."""

    def to_record(self) -> PlanRejection:
        """The ``rejected[i]`` row of the plan record."""
        s = self.settings
        return PlanRejection(tp=s.tp, pp=s.pp, vpp=s.vpp, ep=s.ep, dp=self.dp, zero_stage=s.zero_stage,
                             recompute=s.recompute, kind=self.kind, reason=self.reason)


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
    warnings: tuple[str, ...] = ()
    """What looks wrong with the request although plans exist (an implausible target), one line each."""

    def to_record(self, *, max_rejected: int = 20) -> PlanRecord:
        """The plan record (:class:`batchpilot.records.plan.PlanRecord`: ``plan.json``, ``plan --json``)."""
        r = self.request
        return PlanRecord(
            model=r.model.name, cluster=r.cluster.to_dict(), seq_len=r.seq_len,
            target=PlanTarget(global_batch_sequences=_whole(self.target_sequences),
                              global_batch_tokens=_whole(self.target_sequences * r.seq_len),
                              max_deviation=r.max_deviation),
            headroom=r.headroom, budget_bytes=r.budget_bytes, calibration=r.calibration.source,
            pins=r.pins.pinned(), settings=r.settings,
            plans=tuple(p.to_record() for p in self.plans), rationale=self.rationale,
            rejected=tuple(x.to_record() for x in self.rejected[:max_rejected]), rejected_total=len(self.rejected),
            search=PlanSearch(layouts=self.layouts, memory_evaluations=self.memory_evaluations, pruned=self.pruned,
                              feasible=self.feasible),
            warnings=self.warnings or None,
        )

    def to_dict(self, *, max_rejected: int = 20) -> dict[str, Any]:
        """The ``plan --json`` contract: :meth:`to_record` as JSON."""
        return self.to_record(max_rejected=max_rejected).to_dict()


def _whole(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


