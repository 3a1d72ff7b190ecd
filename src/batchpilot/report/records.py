"""Reading a run directory's records (written by ``batchpilot tune`` or by the commands one by one).

Layout of a run directory (every file optional; the report says which stage is missing); each record is
read through its type's loader (:mod:`batchpilot.records`), so a record of another schema version, or one
that is not what its writer wrote, is refused in one line naming the file::

    RUN_DIR/
      probe.json          ProbeResult   (batchpilot probe --json)
      memory_curve.json   MemoryCurve   (tune's analytic and traced curves at the probed sizes)
      noise.json          NoiseRecord   (batchpilot noise --json)
      plan.json           PlanRecord    (batchpilot plan --json)
      train/metrics.jsonl batchpilot train (one object per optimizer step)
      train/summary.json  TrainSummary
      metrics.jsonl       a plain ``batchpilot train --out RUN_DIR`` folder (no train/ inside)
      summary.json
      exports/*           exported configs (DeepSpeed JSON, Megatron args, ...)
      tune.json           TuneRunRecord (the tune stages: status, seconds, record file)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from batchpilot.errors import BatchpilotError
from batchpilot.io import path_is
from batchpilot.records.base import Record
from batchpilot.records.memory_curve import MemoryCurve
from batchpilot.records.noise import NoiseRecord
from batchpilot.records.plan import PlanRecord
from batchpilot.records.probe import ProbeResult
from batchpilot.records.train_summary import TrainSummary
from batchpilot.records.tune_state import TuneRunRecord

MAX_EXPORT_BYTES = 64 * 1024  # an export bigger than this is shown truncated in the report

R = TypeVar("R", bound=Record)


@dataclass(frozen=True, kw_only=True, slots=True)
class RunRecords:
    """Everything the report needs, each part ``None``/empty when its stage did not run."""

    run_dir: Path
    """The run directory."""
    probe: ProbeResult | None = None
    """``probe.json``."""
    memory_curve: MemoryCurve | None = None
    """``memory_curve.json``."""
    noise: NoiseRecord | None = None
    """``noise.json``."""
    plan: PlanRecord | None = None
    """``plan.json``."""
    metrics: list[dict[str, Any]] = field(default_factory=list)
    """The training run's ``metrics.jsonl`` rows (a log, not a record: hooks add their own keys)."""
    summary: TrainSummary | None = None
    """The training run's ``summary.json``."""
    tune: TuneRunRecord | None = None
    """``tune.json``."""
    exports: dict[str, str] = field(default_factory=dict)
    """Export file name → its text (truncated past :data:`MAX_EXPORT_BYTES`)."""

    @property
    def noise_scale(self) -> tuple[float, tuple[float, float]] | None:
        """The final B_simple (sequences) and its band: ``noise.json``, else the training run's ``noise_scale``."""
        if self.noise is not None:
            return self.noise.b_simple_sequences, self.noise.band.sequences
        estimate = self.summary.noise_scale.estimate if self.summary else None
        return (estimate.b_simple_sequences, estimate.band.sequences) if estimate else None


def _finite_or_none(value: str) -> None:
    return None


def _read(path: Path, record_type: type[R]) -> R | None:
    """A record file through its type's loader, or None when there is none."""
    return record_type.load(path) if path_is(path, "exists") else None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a torn last line (a killed writer) is skipped, other bad lines are errors."""
    if not path.is_file():
        return []
    rows: list[dict[str, Any]] = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, parse_constant=_finite_or_none)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise BatchpilotError(f"{str(path)!r} line {number} is not JSON") from None
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _read_exports(folder: Path) -> dict[str, str]:
    if not folder.is_dir():
        return {}
    exports: dict[str, str] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        raw = path.read_bytes()[: MAX_EXPORT_BYTES + 1]
        text = raw[:MAX_EXPORT_BYTES].decode("utf-8", errors="replace")
        exports[path.name] = text + ("\n… (truncated)" if len(raw) > MAX_EXPORT_BYTES else "")
    return exports


def load_run(run_dir: str | Path) -> RunRecords:
    """Read a run directory; an absent directory or one with no record at all is an error."""
    root = Path(run_dir)
    if path_is(root, "exists") and not path_is(root, "is_dir"):  # a file: "does not exist" would mislead
        raise BatchpilotError(f"run directory {str(root)!r} is a file, not a directory; pass the folder that "
                              f"`batchpilot tune --out` wrote (the one holding tune.json)")
    if not root.is_dir():
        raise BatchpilotError(f"run directory {str(root)!r} does not exist; run `batchpilot tune --out {root}` first")
    train = root / "train" if (root / "train").is_dir() else root  # tune's train stage, or a train --out folder
    records = RunRecords(
        run_dir=root,
        probe=_read(root / "probe.json", ProbeResult),
        memory_curve=_read(root / "memory_curve.json", MemoryCurve),
        noise=_read(root / "noise.json", NoiseRecord),
        plan=_read(root / "plan.json", PlanRecord),
        metrics=_read_jsonl(train / "metrics.jsonl"),
        summary=_read(train / "summary.json", TrainSummary),
        tune=_read(root / "tune.json", TuneRunRecord),
        exports=_read_exports(root / "exports"),
    )
    if not any((records.probe, records.noise, records.plan, records.metrics, records.memory_curve)):
        raise BatchpilotError(
            f"{str(root)!r} holds no batchpilot records (probe.json, noise.json, plan.json, train/metrics.jsonl, "
            f"metrics.jsonl)"
        )
    return records
