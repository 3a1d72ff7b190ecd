"""``batchpilot tune``: probe → memory → noise → plan → verify → report, each stage's record under ``out``.

Example (CPU, about five minutes on two cores)::

    batchpilot tune                                   # tiny-llama-1m on the stdlib corpus
    batchpilot tune --gpu h100-sxm --gpus 64 --out runs/h100   # plus a plan for the target cluster
    batchpilot tune --out runs/h100 --reuse --skip probe       # re-plan from the records already there

A stage can be skipped (``--skip``) or reused from an earlier run in the same ``out`` (``--reuse``: its
record is read instead of measured again, and refused in one line when it was made for another model,
sequence length, device, data or settings: :mod:`batchpilot.tune.reuse`). A stage that fails is recorded
with its message; later stages that do not need it still run, and the report says what is missing.
Every record is written and read through its type in :mod:`batchpilot.records`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchpilot.errors import BatchpilotError
from batchpilot.records.base import Record
from batchpilot.records.memory_curve import MemoryCurve
from batchpilot.records.noise import NoiseRecord
from batchpilot.records.plan import PlanRecord
from batchpilot.records.probe import ProbeResult
from batchpilot.records.tune_state import StageRecord, TuneOutcome, TuneRunRecord
from batchpilot.records.verify import VerifyRecord
from batchpilot.tune import stages
from batchpilot.tune.config import STAGES, TuneConfig
from batchpilot.tune.reuse import check_reusable
from batchpilot.tune.stages import TuneState

RECORDS: dict[str, tuple[str, type[Record]]] = {
    "probe": ("probe.json", ProbeResult), "memory": ("memory_curve.json", MemoryCurve),
    "noise": ("noise.json", NoiseRecord), "plan": ("plan.json", PlanRecord), "verify": ("verify.json", VerifyRecord),
}
"""Each measuring stage's record file and type."""
TUNE_RECORD = "tune.json"


def _absorb(name: str, record: Any, state: TuneState) -> None:
    """Take a reused record into the state, as the stage would have left it."""
    if name == "probe":
        stages.absorb_probe(record, state)
    elif name == "memory":
        state.memory = record
    elif name == "noise":
        state.noise = record
    elif name == "plan":
        state.plan = record


StageEvent = Callable[[str, str, StageRecord | None], None]
"""``event(stage, "start"|"end", record)`` for progress displays."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TuneResult:
    """What ``run_tune`` did: the stages' outcomes, the report and the state the stages left."""

    out: Path
    """The run directory."""
    stages: tuple[StageRecord, ...]
    """Every stage's outcome, in order."""
    report_path: Path | None
    """The HTML report (None when the report stage did not run)."""
    state: TuneState
    """The typed records of the stages that ran or were reused."""

    def to_record(self) -> TuneOutcome:
        """The ``batchpilot tune --json`` object."""
        probe, noise, plan = self.state.probe, self.state.noise, self.state.plan
        return TuneOutcome(out=str(self.out), report=str(self.report_path) if self.report_path else None,
                           stages=self.stages, plan=plan.best if plan else None,
                           max_micro_batch=probe.max_micro_batch if probe else None,
                           knee_micro_batch=probe.knee_micro_batch if probe else None,
                           b_simple_sequences=noise.b_simple_sequences if noise else None)

    def to_dict(self) -> dict[str, Any]:
        return self.to_record().to_dict()


def _runner(name: str, cfg: TuneConfig, state: TuneState, hooks: dict[str, Any]) -> Callable[[], Record]:
    out = cfg.out
    return {
        "probe": lambda: stages.probe_stage(cfg, state, hooks.get("probe")),
        "memory": lambda: stages.memory_stage(cfg, state),
        "noise": lambda: stages.noise_stage(cfg, state, out),
        "plan": lambda: stages.plan_stage(cfg, state, out),
        "verify": lambda: stages.verify_stage(cfg, state, out, hooks.get("verify")),
    }[name]


def _reused(name: str, cfg: TuneConfig, state: TuneState) -> StageRecord | None:
    """With ``--reuse``, the stage's record read through its loader and checked against this run."""
    filename, record_type = RECORDS[name]
    path = cfg.out / filename
    if not (cfg.reuse and path.is_file()):
        return None
    record = record_type.load(path)
    check_reusable(name, path, record, cfg, state.device)
    _absorb(name, record, state)
    return StageRecord(name=name, status="reused", seconds=0.0, record=filename)


def _elapsed(start: float) -> float:
    return round(time.perf_counter() - start, 2)


def _run_stage(name: str, cfg: TuneConfig, state: TuneState, hooks: dict[str, Any]) -> StageRecord:
    if name in cfg.skip:
        return StageRecord(name=name, status="skipped", seconds=0.0, message="--skip")
    reused = _reused(name, cfg, state)
    if reused is not None:
        return reused
    start = time.perf_counter()
    try:
        record = _runner(name, cfg, state, hooks)()
    except BatchpilotError as exc:
        return StageRecord(name=name, status="failed", seconds=_elapsed(start), message=str(exc))
    filename = RECORDS[name][0]
    record.save(cfg.out / filename)
    return StageRecord(name=name, status="ok", seconds=_elapsed(start), record=filename)


def run_tune(cfg: TuneConfig, *, on_stage: StageEvent | None = None, hooks: dict[str, Any] | None = None) -> TuneResult:
    """Run every stage in order, write ``tune.json`` after each one, then the report."""
    state = stages.new_state(cfg)  # bad input is refused before the run directory is created
    cfg.out.mkdir(parents=True, exist_ok=True)
    done: list[StageRecord] = []
    report_path = None
    for name in STAGES:
        if on_stage:
            on_stage(name, "start", None)
        if name == "report":
            rec, report_path = _report_stage(cfg, done)
        else:
            rec = _run_stage(name, cfg, state, hooks or {})
        done.append(rec)
        _save_tune_record(cfg, done)
        if on_stage:
            on_stage(name, "end", rec)
    return TuneResult(out=cfg.out, stages=tuple(done), report_path=report_path, state=state)


def _save_tune_record(cfg: TuneConfig, done: list[StageRecord]) -> None:
    TuneRunRecord(config=cfg.to_record(), stages=tuple(done)).save(cfg.out / TUNE_RECORD)


def _report_stage(cfg: TuneConfig, done: list[StageRecord]) -> tuple[StageRecord, Path | None]:
    if "report" in cfg.skip:
        return StageRecord(name="report", status="skipped", seconds=0.0, message="--skip"), None
    from batchpilot.report.html import build_report

    start = time.perf_counter()
    _save_tune_record(cfg, done)
    try:
        files = build_report(cfg.out)
    except BatchpilotError as exc:
        return StageRecord(name="report", status="failed", seconds=_elapsed(start), message=str(exc)), None
    return StageRecord(name="report", status="ok", seconds=_elapsed(start), record="report.html"), files.html_path
