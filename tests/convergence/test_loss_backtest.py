"""The loss-curve extrapolation backtested on the committed CPU-task runs (benchmarks/loss_backtest.py, no training)."""

from __future__ import annotations

import pytest
from benchmarks.loss_backtest import FRACTIONS, backtest

# Measured by benchmarks/loss_backtest.py (results/loss_backtest.md): the largest |error| of the new fit, nats
MAX_ERROR = {0.15: 0.5814, 0.30: 0.3690}
OLD_MEAN_ERROR = {0.15: 0.5250, 0.30: 0.2247}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return backtest()


def test_every_run_is_backtested_within_the_measured_bound_and_band(rows: list[dict]) -> None:
    assert len(rows) == 2 * 10 + 1
    for f in FRACTIONS:
        sel = [r for r in rows if r["fraction"] == f]
        errors = [abs(r["new"] - r["truth"]) for r in sel]
        assert max(errors) == pytest.approx(MAX_ERROR[f], abs=1e-4)
        # no floor: better on average than the old floor-on-a-grid rule on the same points
        assert sum(errors) / len(errors) < OLD_MEAN_ERROR[f]
        assert sum(abs(r["old"] - r["truth"]) for r in sel) / len(sel) == pytest.approx(OLD_MEAN_ERROR[f], abs=1e-4)
    assert all(r["inside"] for r in rows)


def test_the_schedule_failure_case_is_inside_the_bound_and_the_band(rows: list[dict]) -> None:
    # fixed-16, first 150K tokens → 1M: the old advice predicted 2.523 (band 2.523–2.553); the run stood at 1.942
    case = rows[-1]
    assert case["whole_tokens"] == 1_000_000 and case["truth"] == pytest.approx(1.942, abs=5e-4)
    assert case["new"] == pytest.approx(2.523, abs=5e-4)  # the old fit had no floor here either (L_∞ = 0)
    assert abs(case["new"] - case["truth"]) <= MAX_ERROR[0.15] + 1e-4
    lo, hi = case["band"]
    assert lo <= case["truth"] <= hi and hi < 2.553 + 1e-3
