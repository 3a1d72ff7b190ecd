"""The probe record: real trials, the largest micro-batch that fits, the throughput knee, the prediction.

``batchpilot probe --json`` prints it; ``batchpilot tune`` writes it to ``probe.json`` with the local
calibration it derived from the trials; the report draws the memory and throughput plots from it.
:func:`batchpilot.measure.probe.run_probe` constructs it.

    >>> from batchpilot.specs.settings import RunSettings
    >>> trial = ProbeTrial(micro_batch=4, fits=True, peak_bytes=2**20, tokens_per_s=900.0, seconds=1.5)
    >>> result = ProbeResult(max_micro_batch=4, knee_micro_batch=4, predicted_max_micro_batch=4, search_trials=1,
    ...                      trials=(trial,), device="cpu", budget_bytes=2**30, model="tiny-llama-1m", seq_len=64,
    ...                      wall_seconds=2.0, search_seconds=1.5, settings=RunSettings(precision="fp32"))
    >>> ProbeResult.from_dict(result.to_dict()) == result
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from batchpilot.records.base import EXTRA, JsonValue, Record
from batchpilot.specs.settings import RunSettings

Phase = Literal["search", "knee"]
"""Why a trial ran: the size search, or a throughput point below the maximum (the knee ladder)."""

SCHEMA_VERSION = 1


@dataclass(frozen=True, kw_only=True, slots=True)
class ProbeTrial(JsonValue):
    """One real trial (JSON keys: the field names)."""

    micro_batch: int
    """Sequences per step."""
    fits: bool
    """All warm-up and timed steps ran under the budget."""
    peak_bytes: int | None
    """CPU: address-space growth over the trial process's baseline; CUDA: peak reserved by the allocator."""
    tokens_per_s: float | None
    """Fastest timed step's ``micro_batch × seq_len / seconds``; None when it did not fit."""
    seconds: float
    """Wall time of the whole trial (process start, model build, all steps)."""
    phase: Phase = "search"
    """``search`` (part of the size search) or ``knee`` (a throughput point below the maximum)."""
    error: str | None = None
    """The allocator's message when it did not fit."""
    peak_source: str | None = None
    """How ``peak_bytes`` was measured: ``address-space`` or ``address-space-upper-bound`` (CPU, see
    :mod:`batchpilot.measure._trial`), ``allocator`` (CUDA)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ProbeResult(Record):
    """The probe's findings: ``probe.json`` and the ``batchpilot probe --json`` object."""

    SCHEMA_VERSION: ClassVar[int] = SCHEMA_VERSION
    KIND: ClassVar[str] = "probe record"
    RERUN: ClassVar[str] = "run the probe again (`batchpilot probe --json`, or `batchpilot tune` without --reuse)"

    max_micro_batch: int
    """Largest micro-batch (sequences) whose trial fitted."""
    knee_micro_batch: int
    """Smallest measured size within 3 % of the best tokens/s (``measure.probe.find_knee``)."""
    predicted_max_micro_batch: int
    """The analytic model's largest micro-batch under the budget: the search's first trial."""
    search_trials: int
    """Trials the size search took (the knee's extra trials are not counted)."""
    trials: tuple[ProbeTrial, ...]
    """Every trial, in the order run."""
    device: Literal["cpu", "cuda"]
    """Where the trials ran."""
    budget_bytes: int
    """CPU: memory allowed above the trial process's baseline (which holds the weights); CUDA: the caching
    allocator's cap."""
    model: str
    """The model as given (preset name or config path)."""
    seq_len: int
    """Tokens per sequence of every trial."""
    wall_seconds: float
    """Wall time of the whole probe."""
    search_seconds: float
    """Wall time of the size search alone."""
    settings: RunSettings
    """The run settings every trial used."""
    calibration_file: str | None = None
    """Where ``batchpilot probe --calibration-out`` wrote the calibration (null: not written)."""
    calibration: dict[str, Any] | None = field(default=None, metadata=EXTRA)
    """``tune`` only: the calibration derived from the trials, in the calibration-file format
    (:func:`batchpilot.estimate.calibration.calibration_from_dict` reads it)."""
    peak_flops_per_s: float | None = field(default=None, metadata=EXTRA)
    """``tune`` only: the local device's peak FLOP/s that the calibration's efficiencies divide by."""
