"""The verify record: tune's short training run with the winning local plan, measured against the plan's
prediction (``verify.json``).

:func:`batchpilot.tune.stages.verify_stage` builds it from the plan's best row and the run's
:class:`~batchpilot.records.train_summary.TrainSummary`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from batchpilot.records.base import JsonValue, Record
from batchpilot.records.plan import PlanMemory
from batchpilot.records.train_summary import TrainSummary

SCHEMA_VERSION = 1


@dataclass(frozen=True, kw_only=True, slots=True)
class VerifyPrediction(JsonValue):
    """What the plan predicted for the run."""

    tokens_per_s: float
    """Modelled tokens per second."""
    step_time_s: float
    """Modelled seconds per optimizer step."""
    memory: PlanMemory
    """Modelled peak memory per device."""


@dataclass(frozen=True, kw_only=True, slots=True)
class VerifyMeasurement(JsonValue):
    """What the run measured."""

    tokens_per_s: float | None
    """Measured tokens per second (the summary's)."""
    peak_memory_bytes: int
    """Measured peak memory (the summary's)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class VerifyRecord(Record):
    """The verification run: its summary, the plan's prediction and the measurement side by side."""

    SCHEMA_VERSION: ClassVar[int] = SCHEMA_VERSION
    KIND: ClassVar[str] = "verify record"
    RERUN: ClassVar[str] = "run the verification again (`batchpilot tune` without --reuse)"

    summary: TrainSummary
    """The training run's summary (without its own ``schema_version``: it is part of this record)."""
    predicted: VerifyPrediction
    """The plan's prediction."""
    measured: VerifyMeasurement
    """The run's measurement."""
    steps: int
    """Optimizer steps the run was given (the time budget at the probe's measured speed)."""
