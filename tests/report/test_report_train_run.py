"""The report of a plain ``batchpilot train --out DIR`` folder: the noise scale the runner measured, over steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import record_samples
from matplotlib.image import imread

from batchpilot.records.train_summary import TrainNoiseScale
from batchpilot.report.html import build_report
from batchpilot.train.config import TrainConfig
from batchpilot.train.data import stdlib_root
from batchpilot.train.runner import run


def test_a_train_folder_gets_the_noise_plot_from_its_metrics(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = TrainConfig().replace(
        data={"data": str(stdlib_root() / "json"), "seq_len": 32, "val_fraction": 0.1},
        batch={"global_batch_sequences": 8, "micro_batch_sequences": 2},
        run={"steps": 5, "out": str(out), "threads": 1, "val_rows": 4, "noise_every": 1})
    summary = run(cfg)
    files = build_report(out)
    assert {"noise", "loss"} <= set(files.plot_paths)
    image = imread(files.plot_paths["noise"])
    assert image.shape[0] > 100 and np.unique(image.reshape(-1, image.shape[-1]), axis=0).shape[0] > 10
    page = files.html_path.read_text(encoding="utf-8")
    assert "critical batch ≈ B_simple" in page and "id='plot-noise'" in page
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["noise_scale"]["steps_measured"] == summary["noise_scale"]["steps_measured"] == 5


def test_a_train_folder_without_noise_says_so(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    rows = [{"step": s, "tokens": 256 * s, "loss": 5.0 - 0.1 * s, "elapsed_s": 0.1 * s} for s in range(1, 6)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    record_samples.summary(steps=5, noise_scale=TrainNoiseScale(every=0, note="off")).save(out / "summary.json")
    files = build_report(out)
    assert "noise" in files.missing and "loss" in files.plot_paths
