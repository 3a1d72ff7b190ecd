"""The step-time model against published, measured GPU runs (``benchmarks/published_runs.py``): the acceptance goals
on the held-out split, the predicted order of alternatives a source measured side by side, DeepSeek-V3 on 2048
H800. Only the fit itself is slow (it re-runs the data set ~180 times)."""

from __future__ import annotations

import dataclasses
import functools

import pytest
from benchmarks import published_runs as pr

ROWS = pr.load_data()["rows"]


@functools.cache
def _results() -> tuple[dict, ...]:
    return tuple(pr.evaluate(row) for row in ROWS)


def test_held_out_tokens_per_s_meets_the_goal_and_fp8_is_reported_apart():
    """Issue goal: held-out tokens/s per GPU median |error| ≤ 15 %; fp8 and bf16 reported separately."""
    summary = pr.throughput_summary(list(_results()))
    held_out = summary["by_split"]["heldout"]
    assert held_out["all"]["rows"] >= 100
    assert held_out["all"]["median_abs_error"] <= 0.15
    assert held_out["bf16"]["rows"] + held_out["fp8"]["rows"] == held_out["all"]["rows"]
    assert held_out["bf16"]["rows"] > 0 and held_out["fp8"]["rows"] > 0


def test_no_large_source_is_biased_by_more_than_15_percent():
    """Issue goal on every source with at least 5 compared rows (the data file's summary threshold)."""
    summary = pr.throughput_summary(list(_results()))
    biased = {source: stats["all"]["mean_error"] for source, stats in summary["by_source"].items()
              if stats["all"]["rows"] >= pr.MIN_ROWS_PER_SOURCE and abs(stats["all"]["mean_error"]) > 0.15}
    assert biased == {}


#: Side-by-side alternatives the model must order as published: compile on/off, context-parallel degrees, async
#: TP, FSDP vs FSDP+TP, and float8 on/off with the source's default (tensor-wise) recipe. Recipe against recipe
#: (rowwise, MXFP8 vs current scaling) is reported in the benchmark, not asserted (see its results).
def _asserted(check: dict) -> bool:
    if check["setting"] != "precision":
        return True
    by_id = {r["id"]: r for r in ROWS}
    recipes = {by_id[check[k]]["precision"] for k in ("a", "b")}
    texts = " ".join(str(by_id[check[k]]["fp8_recipe"] or "") for k in ("a", "b")).lower()
    return recipes == {"bf16", "fp8"} and "rowwise" not in texts


def test_side_by_side_alternatives_are_ranked_as_published():
    checks = [c for c in pr.ranking_checks(ROWS, list(_results())) if _asserted(c)]
    assert {c["setting"] for c in checks} >= {"compile", "cp", "async-tp", "precision"}
    assert len(checks) >= 20
    wrong = [(c["setting"], c["a"], c["b"]) for c in checks if not c["agree"]]
    assert wrong == []


@pytest.mark.parametrize("vpp", [2, 4, 8])
def test_torchtitan_interleaved_1f1b_beats_1f1b(vpp):
    """torchtitan Llama 3.1 405B on 512 H100 (Table 5 of its 2024-12 benchmarks): Interleaved1F1B 128 tokens/s/GPU
    against 1F1B's 100. The published row does not state its virtual stages, so every v it could use is checked."""
    row = next(r for r in ROWS if r["id"] == "tt-h100-202412-5-405b-1f1b")
    inputs = pr.row_to_inputs(row)
    assert not inputs.not_expressible_throughput and inputs.settings and inputs.triad
    plain = pr._throughput(row, inputs)
    interleaved = dataclasses.replace(inputs, settings=dataclasses.replace(inputs.settings, vpp=vpp))
    faster = pr._throughput(row, interleaved)
    assert plain and faster and faster["predicted"] > plain["predicted"]


def test_deepseek_v3_on_2048_h800_within_20_percent():
    """DeepSeek-V3 report: 180K H800 GPU hours per trillion tokens = 1543 tokens/s per GPU; DualPipe, block-wise fp8,
    node-limited deduplicated expert dispatch (assumptions listed in the check)."""
    check = pr.deepseek_v3_check(ROWS)
    assert check["published"] == pytest.approx(1e12 / (180_000 * 3600), rel=1e-3)
    assert abs(check["error"]) <= 0.20
    assert check["exposed_share"]["ep"] > 0  # the all-to-all is modelled, and mostly hidden


@pytest.mark.slow
def test_the_shipped_constants_are_the_fit_split_optimum():
    from batchpilot.estimate.fitted import FITTED

    assert pr.fit_constants(ROWS) == FITTED
