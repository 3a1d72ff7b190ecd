"""``batchpilot tune``: probe → memory → noise → plan → verify → report, each stage's record under ``out``.

Example (CPU, about five minutes on two cores)::

    batchpilot tune                                   # tiny-llama-1m on the stdlib corpus
    batchpilot tune --gpu h100-sxm --gpus 64 --out runs/h100   # plus a plan for the target cluster
    batchpilot tune --out runs/h100 --reuse --skip probe       # re-plan from the records already there

A stage can be skipped (``--skip``) or reused from an earlier run in the same ``out`` (``--reuse``: its
record is read instead of measured again). A stage that fails is recorded with its message; later stages
that do not need it still run, and the report says what is missing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchpilot.errors import BatchpilotError
from batchpilot.tune import stages
from batchpilot.tune.config import STAGES, StageRecord, TuneConfig
from batchpilot.tune.stages import TuneState

RECORD_FILES: dict[str, str] = {
    "probe": "probe.json", "memory": "memory_curve.json", "noise": "noise.json", "plan": "plan.json",
    "verify": "verify.json",
}
ABSORB: dict[str, Callable[[dict[str, Any], stages.TuneState], None]] = {
    "probe": stages.absorb_probe,
    "noise": lambda record, state: setattr(state, "noise", record),
    "plan": lambda record, state: setattr(state, "plan", record),
}

StageEvent = Callable[[str, str, StageRecord | None], None]
"""``event(stage, "start"|"end", record)`` for progress displays."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TuneResult:
    out: Path
    stages: tuple[StageRecord, ...]
    report_path: Path | None
    state: TuneState

    def to_dict(self) -> dict[str, Any]:
        plan = (self.state.plan or {}).get("plans") or [{}]
        return {"out": str(self.out), "report": str(self.report_path) if self.report_path else None,
                "stages": [s.to_dict() for s in self.stages], "plan": plan[0],
                "max_micro_batch": (self.state.probe or {}).get("max_micro_batch"),
                "knee_micro_batch": (self.state.probe or {}).get("knee_micro_batch"),
                "b_simple_sequences": (self.state.noise or {}).get("b_simple_sequences")}


def _write_json(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def _runner(name: str, cfg: TuneConfig, state: stages.TuneState, hooks: dict[str, Any]) -> Callable[[], Any]:
    out = cfg.out
    return {
        "probe": lambda: stages.probe_stage(cfg, state, hooks.get("probe")),
        "memory": lambda: stages.memory_stage(cfg, state),
        "noise": lambda: stages.noise_stage(cfg, state, out),
        "plan": lambda: stages.plan_stage(cfg, state, out),
        "verify": lambda: stages.verify_stage(cfg, state, out, hooks.get("verify")),
    }[name]


def _reused(name: str, cfg: TuneConfig, state: stages.TuneState) -> StageRecord | None:
    path = cfg.out / RECORD_FILES[name]
    if not (cfg.reuse and path.is_file()):
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BatchpilotError(f"--reuse: {str(path)!r} is unreadable ({exc}); delete it or drop --reuse") from None
    if name in ABSORB:
        ABSORB[name](record, state)
    return StageRecord(name=name, status="reused", seconds=0.0, record=RECORD_FILES[name])


def _run_stage(name: str, cfg: TuneConfig, state: stages.TuneState, hooks: dict[str, Any]) -> StageRecord:
    if name in cfg.skip:
        return StageRecord(name=name, status="skipped", seconds=0.0, message="--skip")
    reused = _reused(name, cfg, state)
    if reused is not None:
        return reused
    start = time.perf_counter()
    try:
        record = _runner(name, cfg, state, hooks)()
    except BatchpilotError as exc:
        return StageRecord(name=name, status="failed", seconds=time.perf_counter() - start, message=str(exc))
    _write_json(cfg.out / RECORD_FILES[name], record)
    return StageRecord(name=name, status="ok", seconds=time.perf_counter() - start, record=RECORD_FILES[name])


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
        _write_json(cfg.out / "tune.json", {"config": _config_record(cfg), "stages": [s.to_dict() for s in done]})
        if on_stage:
            on_stage(name, "end", rec)
    return TuneResult(out=cfg.out, stages=tuple(done), report_path=report_path, state=state)


def _report_stage(cfg: TuneConfig, done: list[StageRecord]) -> tuple[StageRecord, Path | None]:
    if "report" in cfg.skip:
        return StageRecord(name="report", status="skipped", seconds=0.0, message="--skip"), None
    from batchpilot.report.html import build_report

    start = time.perf_counter()
    _write_json(cfg.out / "tune.json", {"config": _config_record(cfg), "stages": [s.to_dict() for s in done]})
    try:
        files = build_report(cfg.out)
    except BatchpilotError as exc:
        return StageRecord(name="report", status="failed", seconds=time.perf_counter() - start, message=str(exc)), None
    return (StageRecord(name="report", status="ok", seconds=time.perf_counter() - start, record="report.html"),
            files.html_path)


def _config_record(cfg: TuneConfig) -> dict[str, Any]:
    return {"model": cfg.model, "data": cfg.data, "seq_len": cfg.seq_len, "device": cfg.device,
            "memory_budget_bytes": cfg.memory_budget_bytes, "settings": cfg.settings.to_dict(), "gpu": cfg.gpu,
            "gpus": cfg.gpus, "time_budget_s": cfg.time_budget_s, "skip": list(cfg.skip), "reuse": cfg.reuse,
            "seed": cfg.seed}
