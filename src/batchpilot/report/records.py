"""Reading a run directory's records (written by ``batchpilot tune`` or by the commands one by one).

Layout of a run directory (every file optional; the report says which stage is missing)::

    RUN_DIR/
      probe.json          batchpilot probe --json  (trials, max_micro_batch, knee_micro_batch, ...)
      memory_curve.json   {"micro_batches": [...], "analytic": [bytes...], "traced": [bytes | null ...]}
      noise.json          batchpilot noise --json  (b_simple_sequences, band, history: [{step, b_simple, ...}])
      plan.json           batchpilot plan --json   (plans, rejected, rationale)
      train/metrics.jsonl batchpilot train         (one object per optimizer step)
      train/summary.json
      metrics.jsonl       a plain ``batchpilot train --out RUN_DIR`` folder (no train/ inside)
      summary.json
      exports/*           exported configs (DeepSpeed JSON, Megatron args, ...)
      tune.json           the tune stages: status, seconds, record file
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchpilot.errors import BatchpilotError
from batchpilot.io import path_is

MAX_EXPORT_BYTES = 64 * 1024  # an export bigger than this is shown truncated in the report


@dataclass(frozen=True, kw_only=True, slots=True)
class RunRecords:
    """Everything the report needs, each part ``None``/empty when its stage did not run."""

    run_dir: Path
    probe: dict[str, Any] | None = None
    memory_curve: dict[str, Any] | None = None
    noise: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    tune: dict[str, Any] | None = None
    exports: dict[str, str] = field(default_factory=dict)


def _finite_or_none(value: str) -> None:
    return None


def _read_object(path: Path) -> dict[str, Any] | None:
    """A record file, or None when absent; read with the bounded reader (regular files, size cap). Lenient:
    NaN/Infinity literals (Python's json default) become None rather than failing the whole report."""
    from batchpilot.io import read_small_file

    if not path.exists():
        return None
    try:
        data = json.loads(read_small_file(path, "record").decode("utf-8", errors="replace"),
                          parse_constant=_finite_or_none)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise BatchpilotError(f"record {str(path)!r} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BatchpilotError(f"record {str(path)!r} must hold a JSON object")
    return data


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
        probe=_read_object(root / "probe.json"),
        memory_curve=_read_object(root / "memory_curve.json"),
        noise=_read_object(root / "noise.json"),
        plan=_read_object(root / "plan.json"),
        metrics=_read_jsonl(train / "metrics.jsonl"),
        summary=_read_object(train / "summary.json"),
        tune=_read_object(root / "tune.json"),
        exports=_read_exports(root / "exports"),
    )
    if not any((records.probe, records.noise, records.plan, records.metrics, records.memory_curve)):
        raise BatchpilotError(
            f"{str(root)!r} holds no batchpilot records (probe.json, noise.json, plan.json, train/metrics.jsonl, "
            f"metrics.jsonl)"
        )
    return records


def numbers(rows: list[dict[str, Any]], key: str) -> list[float]:
    """The finite numeric values of ``key`` across rows (missing and non-finite values dropped)."""
    values = []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            values.append(float(value))
    return values
