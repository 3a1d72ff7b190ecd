"""The memory-curve record: analytic and traced peak memory at the probed micro-batches (``memory_curve.json``).

``batchpilot tune``'s memory stage writes it; the report draws it beside the probe's measured peaks. All three
are in the probe's convention (:attr:`MemoryCurve.convention`), so they compare point by point.

    >>> from batchpilot.specs.settings import RunSettings
    >>> curve = MemoryCurve(micro_batches=(1, 2), analytic=(10, 20), traced=(11, None), model="tiny-llama-1m",
    ...                     seq_len=64, device="cpu", settings=RunSettings(precision="fp32"))
    >>> MemoryCurve.from_dict(curve.to_dict()) == curve
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from batchpilot.records.base import Record
from batchpilot.specs.settings import RunSettings

SCHEMA_VERSION = 1

PROBE_CONVENTION = "bytes above the trial process's baseline (weights excluded on CPU)"
"""What the numbers measure: the same quantity as the probe's ``peak_bytes``."""


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryCurve(Record):
    """Analytic and traced estimates at each probed micro-batch (lists aligned with ``micro_batches``)."""

    SCHEMA_VERSION: ClassVar[int] = SCHEMA_VERSION
    KIND: ClassVar[str] = "memory-curve record"
    RERUN: ClassVar[str] = "run the memory stage again (`batchpilot tune` without --reuse)"

    micro_batches: tuple[int, ...]
    """The probed sizes, ascending."""
    analytic: tuple[int, ...]
    """The analytic model's bytes at each size (:func:`batchpilot.measure.probe.analytic_trial_bytes`)."""
    traced: tuple[int | None, ...]
    """The traced (fake-tensor) model's bytes at each size; null where the stage's time ran out first."""
    model: str
    """The model as given (preset name or config path)."""
    seq_len: int
    """Tokens per sequence."""
    device: Literal["cpu", "cuda"]
    """The device whose convention the bytes follow."""
    settings: RunSettings
    """The run settings of the estimates."""
    convention: str = PROBE_CONVENTION
    """What the bytes measure."""
