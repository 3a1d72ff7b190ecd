"""DCP checkpoints: asynchronous writes publish complete checkpoints; hostile files are refused unrun; fp8 on CPU."""

from __future__ import annotations

import os
import pickle
import shlex
from pathlib import Path

import pytest
import torch
from train_helpers import small_config

from batchpilot.errors import BatchpilotError
from batchpilot.train.checkpoint import verify_checkpoint
from batchpilot.train.dcp_io import read_model_state
from batchpilot.train.metrics import read_metrics
from batchpilot.train.runner import run


def test_async_checkpoints_are_published_whole_and_resume_exactly(corpus_dir: Path, tmp_path: Path) -> None:
    cfg = small_config(corpus_dir, tmp_path / "async", run={"steps": 4, "checkpoint_every": 1, "async_checkpoint": True})
    run(cfg)
    full = [r["loss"] for r in read_metrics(tmp_path / "async" / "metrics.jsonl")]
    checkpoints = tmp_path / "async" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-00000003", "step-00000004"]
    assert all(verify_checkpoint(checkpoints / name) is None for name in ("step-00000003", "step-00000004"))
    sync = small_config(corpus_dir, tmp_path / "sync", run={"steps": 4, "checkpoint_every": 1})
    run(sync)
    for name in ("step-00000003", "step-00000004"):  # the background writer wrote what the synchronous one does
        a, b = read_model_state(checkpoints / name), read_model_state(tmp_path / "sync" / "checkpoints" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    (checkpoints / "latest").write_text("step-00000003")
    run(cfg.replace(run={"resume": True}))
    assert [r["loss"] for r in read_metrics(tmp_path / "async" / "metrics.jsonl")] == full


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_a_hostile_dcp_metadata_file_is_refused_unrun(corpus_dir: Path, tmp_path: Path) -> None:
    """DCP's own reader unpickles ``.metadata`` with ``pickle.load``; the runner's admits DCP metadata only."""
    out = tmp_path / "out"
    run(small_config(corpus_dir, out, run={"steps": 1}))
    step = out / "checkpoints" / "step-00000001"
    marker = tmp_path / "pwned"
    (step / "dcp" / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(BatchpilotError, match=r"cannot be read: .*os\.system|cannot be read: .*posix\.system"):
        read_model_state(step)
    assert not marker.exists()


def test_fp8_on_a_cpu_is_one_line(corpus_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BatchpilotError, match="--precision fp8 runs torchao Float8Linear matmuls, which need a CUDA GPU"):
        run(small_config(corpus_dir, tmp_path / "fp8", run={"steps": 1}, optim={"precision": "fp8"}))
