"""Helpers for the runner's tests: a small variable-length corpus and CPU-friendly configs."""

from __future__ import annotations

from pathlib import Path

import torch

from batchpilot.train.config import TrainConfig
from batchpilot.train.data import stdlib_root

torch.set_num_threads(1)


def write_corpus(folder: Path, count: int = 60) -> Path:
    """``count`` text documents of 5…300 bytes cut from the stdlib's ``os.py`` (lengths vary on purpose)."""
    source = (stdlib_root() / "os.py").read_text(encoding="utf-8")
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for i in range(count):
        length = 5 + (i * 37) % 296
        (folder / f"doc{i:03d}.txt").write_text(source[start:start + length], encoding="utf-8")
        start += length
    return folder


def small_config(data: Path, out: Path, **sections: dict[str, object]) -> TrainConfig:
    """tiny-llama-1m, byte tokens, 32-token rows, 8-sequence global batch, 1 thread."""
    base = TrainConfig().replace(
        data={"data": str(data), "seq_len": 32, "val_fraction": 0.1},
        batch={"global_batch_sequences": 8, "micro_batch_sequences": 8},
        optim={"warmup_steps": 2},
        run={"steps": 3, "out": str(out), "threads": 1, "val_rows": 8},
    )
    return base.replace(**sections) if sections else base
