"""The plan record: ranked feasible layouts for a target global batch (``plan.json``, ``batchpilot plan --json``).

:meth:`batchpilot.plan.request.PlanResult.to_record` builds it; ``plan --json`` adds where the target came
from and any warnings, ``tune`` adds ``target_source`` and the target cluster's plan (``cluster_plan``); tune's
verification stage trains the best row and the report tabulates the rows and the rejected layouts.

    >>> memory = PlanMemory(weights=4, gradients=4, optimizer=8, activations=16, overhead=0, total=32)
    >>> memory.total == memory.weights + memory.gradients + memory.optimizer + memory.activations + memory.overhead
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from batchpilot.records.base import EXTRA, JsonValue, Record
from batchpilot.records.cost import FineTuneMode, TrainingCost
from batchpilot.specs.settings import Recompute, RunSettings

SCHEMA_VERSION = 1


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanMemory(JsonValue):
    """Peak memory per GPU of a plan, in bytes (:class:`batchpilot.estimate.breakdown.MemoryBreakdown`)."""

    weights: int
    """Parameters as stored."""
    gradients: int
    """Gradients."""
    optimizer: int
    """Optimizer states (fp32 masters included where the engine keeps them)."""
    activations: int
    """Activations saved for backward at the peak, and the transient buffers alive then."""
    overhead: int
    """CUDA context, allocator slack, communication buffers."""
    total: int
    """The sum of the five."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanRow(JsonValue):
    """One feasible plan: the batch triad, the parallel layout, its memory and its modelled speed."""

    micro_batch: int
    """Sequences per GPU per forward/backward."""
    grad_accum: int
    """Micro-batches accumulated per optimizer step."""
    dp: int
    """Data-parallel ranks."""
    tp: int
    """Tensor-parallel size."""
    pp: int
    """Pipeline stages."""
    vpp: int
    """Virtual stages per pipeline rank."""
    ep: int
    """Expert-parallel size."""
    zero_stage: int
    """ZeRO stage 0-3."""
    recompute: Recompute
    """Activation recomputation."""
    global_batch_sequences: int
    """micro_batch × grad_accum × dp."""
    global_batch_tokens: int
    """The global batch in tokens."""
    deviation: float
    """(global − target) / target; 0 for an exact match."""
    memory: PlanMemory
    """Peak memory per GPU."""
    flops_per_step: float
    """FLOPs the cluster executes per step, recomputation included."""
    step_time_s: float
    """Modelled wall time of one optimizer step."""
    tokens_per_s: float
    """Modelled tokens per second of the whole job."""
    tflops_per_gpu: float
    """Executed FLOP/s per GPU ÷ 1e12."""
    mfu: float
    """Model FLOPs utilisation."""
    step: dict[str, float]
    """Every term of the step-time model (:class:`batchpilot.estimate.steptime.StepTime`), in seconds or FLOPs."""
    settings: RunSettings
    """The full run settings of this plan."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanRejection(JsonValue):
    """A layout that produced no plan, and why."""

    tp: int
    """Tensor-parallel size."""
    pp: int
    """Pipeline stages."""
    vpp: int
    """Virtual stages per pipeline rank."""
    ep: int
    """Expert-parallel size."""
    dp: int
    """Data-parallel ranks."""
    zero_stage: int
    """ZeRO stage."""
    recompute: Recompute
    """Activation recomputation."""
    kind: Literal["memory", "batch"]
    """``memory``: does not fit even at its smallest micro-batch; ``batch``: the target is not reachable."""
    reason: str
    """One line with the numbers."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanTarget(JsonValue):
    """The global batch the plans aim at."""

    global_batch_sequences: float
    """Target in sequences (fractional when it was given in tokens that are not whole sequences)."""
    global_batch_tokens: float
    """Target in tokens."""
    max_deviation: float
    """Largest accepted |global − target| / target."""
    source: str | None = field(default=None, metadata=EXTRA)
    """``plan --json``: where the target came from (a flag, the registry, a prior, a noise measurement)."""
    prior: dict[str, Any] | None = field(default=None, metadata=EXTRA)
    """``plan --json --train-tokens``: the scaling-law prior's suggestion."""
    noise: dict[str, Any] | None = field(default=None, metadata=EXTRA)
    """``plan --json --noise``: the suggestion from the measured noise scale."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanSearch(JsonValue):
    """How much of the configuration space the planner looked at."""

    layouts: int
    """Layouts (tp, pp, ep, ZeRO, recompute) in the search space."""
    memory_evaluations: int
    """Memory-model evaluations."""
    pruned: int
    """Layouts skipped because their best possible throughput could not reach the ranking."""
    feasible: int
    """Feasible (layout, micro-batch) candidates found."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanRecord(Record):
    """The planner's answer: ranked plans (best first), rejected layouts, the reasoning."""

    SCHEMA_VERSION: ClassVar[int] = SCHEMA_VERSION
    KIND: ClassVar[str] = "plan record"
    RERUN: ClassVar[str] = "plan again (`batchpilot plan --json`, or `batchpilot tune` without --reuse)"

    model: str
    """The model as given (preset name or config path)."""
    cluster: dict[str, Any]
    """The cluster (:meth:`batchpilot.specs.hardware.ClusterSpec.to_dict`)."""
    seq_len: int
    """Tokens per sequence."""
    target: PlanTarget
    """The target global batch."""
    headroom: float
    """Fraction of each GPU's memory kept free."""
    budget_bytes: int
    """Usable memory per GPU after the headroom."""
    calibration: str
    """Where the efficiency figures come from."""
    pins: dict[str, Any]
    """The choices the user pinned (flag name → value)."""
    settings: RunSettings
    """The run settings the search started from."""
    plans: tuple[PlanRow, ...]
    """Feasible plans ranked by tokens/s, best first."""
    rationale: str
    """Why the winner won, in one paragraph."""
    rejected: tuple[PlanRejection, ...]
    """The first rejected layouts (see ``rejected_total``)."""
    rejected_total: int
    """All rejected layouts."""
    search: PlanSearch
    """Search statistics."""
    warnings: tuple[str, ...] | None = field(default=None, metadata=EXTRA)
    """``plan --json``: warnings printed with the plan (e.g. a noise file measured at another sequence length)."""
    export: dict[str, Any] | None = field(default=None, metadata=EXTRA)
    """``plan --json --export``: the format and the file the winner was exported to."""
    target_source: str | None = field(default=None, metadata=EXTRA)
    """``tune``: where the target global batch came from."""
    cluster_plan: PlanRecord | None = field(default=None, metadata=EXTRA)
    """``tune --gpu --gpus``: the plan for the target cluster."""
    cost: TrainingCost | None = field(default=None, metadata=EXTRA)
    """With a token budget (``--train-tokens``, ``--epochs`` × ``--dataset-tokens``): the winner's wall time,
    GPU-hours and cost with the speed model's error band (:mod:`batchpilot.plan.cost`)."""
    finetune_modes: tuple[FineTuneMode, ...] | None = field(default=None, metadata=EXTRA)
    """``plan --finetune compare``: every training mode planned for the same target (:mod:`batchpilot.plan.finetune`)."""

    @property
    def best(self) -> PlanRow | None:
        """The winning plan, or None when none is feasible."""
        return self.plans[0] if self.plans else None
