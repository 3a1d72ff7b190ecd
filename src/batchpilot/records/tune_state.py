"""The tune records: the run directory's stage log (``tune.json``) and the ``batchpilot tune --json`` object.

:func:`batchpilot.tune.pipeline.run_tune` writes ``tune.json`` after every stage (so a stopped run still says
how far it got) and the report shows its stage table.

    >>> stage = StageRecord(name="probe", status="ok", seconds=12.5, record="probe.json")
    >>> StageRecord(name="noise", status="skipped", seconds=0.0, message="--skip").record is None
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from batchpilot.records.base import JsonValue, Record
from batchpilot.records.plan import PlanRow
from batchpilot.specs.settings import RunSettings

SCHEMA_VERSION = 1

StageStatus = Literal["ok", "skipped", "reused", "failed"]
"""``ok``: ran and wrote its record; ``skipped``: ``--skip``; ``reused``: read with ``--reuse``; ``failed``."""


@dataclass(frozen=True, kw_only=True, slots=True)
class StageRecord(JsonValue):
    """One stage's outcome."""

    name: str
    """The stage (``probe``, ``memory``, ``noise``, ``plan``, ``verify``, ``report``)."""
    status: StageStatus
    """What happened."""
    seconds: float
    """Wall time of the stage, to 10 ms."""
    record: str | None = None
    """The record file the stage wrote or reused (relative to the run directory)."""
    message: str = ""
    """Why it was skipped or failed (one line)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TuneSettings(JsonValue):
    """The settings ``tune`` ran with (:class:`batchpilot.tune.config.TuneConfig`, as given)."""

    model: str
    """Preset name or config.json."""
    data: str
    """Training data of the noise and verification stages."""
    seq_len: int
    """Tokens per sequence."""
    device: Literal["auto", "cpu", "cuda"]
    """The device asked for."""
    memory_budget_bytes: int | None
    """The probe budget asked for; null: the device's default."""
    settings: RunSettings
    """Run settings of every stage."""
    gpu: str | None
    """Target accelerator of the cluster plan."""
    gpus: int | None
    """Target cluster size."""
    time_budget_s: float
    """The whole run's time budget."""
    skip: tuple[str, ...]
    """Stages not run."""
    reuse: bool
    """Whether records already in the run directory were reused."""
    seed: int
    """Model init and data order."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TuneRunRecord(Record):
    """``tune.json``: the settings and each stage's outcome so far, in order."""

    SCHEMA_VERSION: ClassVar[int] = SCHEMA_VERSION
    KIND: ClassVar[str] = "tune record"
    RERUN: ClassVar[str] = "run `batchpilot tune` again into this folder"

    config: TuneSettings
    """What the run was asked to do."""
    stages: tuple[StageRecord, ...]
    """The stages done so far, in order."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TuneOutcome(Record):
    """The ``batchpilot tune --json`` object: where everything is, the stages, and the headline numbers."""

    SCHEMA_VERSION: ClassVar[int] = SCHEMA_VERSION
    KIND: ClassVar[str] = "tune --json object"
    RERUN: ClassVar[str] = "run `batchpilot tune --json` again"

    out: str
    """The run directory."""
    report: str | None
    """The HTML report; null when the report stage did not run."""
    stages: tuple[StageRecord, ...]
    """Every stage's outcome."""
    plan: PlanRow | None
    """The winning local plan; null when the plan stage found none or did not run."""
    max_micro_batch: int | None
    """The probe's largest micro-batch that fits."""
    knee_micro_batch: int | None
    """The probe's throughput knee."""
    b_simple_sequences: float | None
    """The measured B_simple in sequences (null also when not finite)."""
