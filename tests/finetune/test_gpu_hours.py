"""Predicted GPU-hours of published pretraining runs (benchmarks/gpu_hours.py) against the published figures."""

from __future__ import annotations

from benchmarks.gpu_hours import RUNS, evaluate


def test_deepseek_v3_and_llama3_405b_gpu_hours_inside_the_band() -> None:
    """DeepSeek-V3: 2.664M H800 GPU-hours for 14.8T tokens (report Table 1); Llama 3.1 405B: 30.84M H100 GPU-hours
    (model card), both at their published layouts: the published figure lies inside the predicted 80% band."""
    for name in ("DeepSeek-V3 671B (pretraining)", "Llama 3.1 405B"):
        result = evaluate(next(r for r in RUNS if r.name == name))
        low, high = result["band"]
        assert low <= result["published_gpu_hours"] <= high, result
