"""Run outputs: ``metrics.jsonl`` (one object per optimizer step) and peak memory (``summary.json`` is
:class:`batchpilot.records.train_summary.TrainSummary`).

``metrics.jsonl`` keys (a contract, tested): step, tokens, loss, lr, global_batch_sequences,
global_batch_tokens, micro_batch, grad_accum, grad_norm, padding_fraction, tokens_per_s,
peak_memory_bytes, elapsed_s — plus target_tokens, loss_scale, and ``val_loss`` on evaluation steps,
and whatever fields hooks return. ``step`` is 1-based (the number of optimizer steps done), ``tokens``
the input tokens (padding excluded) consumed up to and including that step.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch

METRIC_KEYS = (
    "step", "tokens", "loss", "lr", "global_batch_sequences", "global_batch_tokens", "micro_batch",
    "grad_accum", "grad_norm", "padding_fraction", "tokens_per_s", "peak_memory_bytes", "elapsed_s",
)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The complete records of a ``metrics.jsonl`` (a torn last line from a crash is skipped)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, records after the checkpoint's step are dropped first."""

    def __init__(self, path: Path, *, resume_step: int | None) -> None:
        self.path = path
        kept = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step] if resume_step is not None else []
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, path)
        self._handle = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(_json_safe(record)) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: ``max_memory_allocated``; CPU: the process's peak resident set (``ru_maxrss``, KiB on Linux)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
