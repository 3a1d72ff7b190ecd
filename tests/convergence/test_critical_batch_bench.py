"""benchmarks/critical_batch.py --quick end to end: the results file has what the measurement promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmarks import critical_batch


@pytest.mark.slow
def test_quick_mode_writes_checkpoints_fits_and_the_plot(tmp_path: Path) -> None:
    assert critical_batch.main(["--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "critical_batch.json").read_text())
    setup = critical_batch.QUICK
    assert [c["step"] for c in data["checkpoints"]] == list(setup.checkpoints)
    losses = [c["loss"] for c in data["checkpoints"]]
    assert losses == sorted(losses, reverse=True)  # early, middle, late: the held-out loss falls
    for c, batches in zip(data["checkpoints"], setup.batches, strict=True):
        assert {"loss", "b_crit_fit", "b_simple", "points"} <= set(c)
        assert [p["batch"] for p in c["points"]] == list(batches) and len(batches) >= 6
        assert c["target_loss"] < c["loss"] and c["b_simple"] > 0
        for p in c["points"]:  # E = B·S wherever the target was reached
            assert p["steps"] is None or p["examples"] == pytest.approx(p["batch"] * p["steps"])
        for run in c["runs"]:  # every run starts at the checkpoint's own held-out loss
            assert run["evals"][0] == [0.0, c["loss"]]
    assert (tmp_path / "critical_batch.png").stat().st_size > 10_000
    assert "B_crit fit" in (tmp_path / "critical_batch.md").read_text()
