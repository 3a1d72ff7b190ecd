"""plan with fine-tuning modes and a token budget: Qwen2.5-7B on one 80 GB H100 at sequence 4096 (the issue's case),
the modes table, the nothing-fits suggestion, the cost with its band, and the --json keys."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from batchpilot.cli import app
from batchpilot.errors import SpecError
from batchpilot.plan.cost import TIME_RATIO_HIGH, TIME_RATIO_LOW, budget_tokens, training_cost
from batchpilot.plan.finetune import compare_modes
from batchpilot.plan.options import PlanOptions, prepare_plan
from batchpilot.records.plan import PlanRecord
from batchpilot.units import GIB

QWEN = ["plan", "--model", "qwen2.5-7b", "--gpu", "h100-sxm", "--gpus", "1", "--seq-len", "4096",
        "--global-batch", "16"]


def _qwen_request():
    return prepare_plan(PlanOptions(model="qwen2.5-7b", gpu="h100-sxm", gpus=1, seq_len=4096,
                                    global_batch=16)).request


def test_qwen_7b_on_one_80gb_gpu_offers_the_modes_that_fit() -> None:
    modes = {m.name: m for m in compare_modes(_qwen_request())}
    # full mixed-precision AdamW: 16 bytes/param × 7.62B = 114 GiB of model states alone
    assert not modes["full"].fits and "nothing fits" in (modes["full"].reason or "")
    for name in ("lora", "qlora"):
        m = modes[name]
        assert m.fits and m.memory_bytes is not None and m.memory_bytes < 72 * GIB
        assert m.tokens_per_s and m.step_time_s and "adapters" in m.optimizer
        assert m.trainable_params == 40_370_176  # PEFT's count for r=16 on every linear of Qwen2.5-7B
    # QLoRA's 4-bit base frees memory that the planner spends on a larger micro-batch
    assert modes["qlora"].micro_batch >= modes["lora"].micro_batch
    assert all(m.optimizer and m.result for m in modes.values())


def test_plan_names_the_modes_that_fit_when_full_training_does_not(cli_runner) -> None:
    result = cli_runner.invoke(app, QWEN)
    assert result.exit_code == 2
    assert "fine-tuning modes that fit: " in result.stderr and "--finetune lora" in result.stderr
    assert "--finetune qlora" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_plan_compare_json_carries_modes_and_costs(cli_runner) -> None:
    result = cli_runner.invoke(app, [*QWEN, "--finetune", "compare", "--epochs", "2", "--dataset-tokens", "10M",
                                     "--json"])
    assert result.exit_code == 0, result.output
    modes = json.loads(result.stdout)["finetune_modes"]
    lora = next(m for m in modes if m["name"] == "lora")
    assert lora["cost"]["train_tokens"] == 20_000_000
    assert lora["cost"]["wall_s"] == pytest.approx(20_000_000 / lora["tokens_per_s"])


def test_plan_with_lora_and_budget_json_roundtrips(cli_runner) -> None:
    result = cli_runner.invoke(app, [*QWEN, "--finetune", "lora,r=16", "--epochs", "1", "--dataset-tokens", "1M",
                                     "--price-per-gpu-hour", "3", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["settings"]["finetune"]["method"] == "lora"
    cost = record["cost"]
    assert cost["gpu_hours"] == pytest.approx(cost["wall_s"] / 3600)
    assert cost["cost"] == pytest.approx(3 * cost["gpu_hours"])
    assert cost["wall_s_low"] < cost["wall_s"] < cost["wall_s_high"]
    assert PlanRecord.from_dict(record).to_dict() == record


def test_budget_flags_are_checked(cli_runner) -> None:
    with pytest.raises(SpecError, match="go together"):
        budget_tokens(epochs=2)
    with pytest.raises(SpecError, match="once"):
        budget_tokens(train_tokens=5, epochs=1, dataset_tokens=10)
    result = cli_runner.invoke(app, [*QWEN, "--finetune", "lora", "--price-per-gpu-hour", "2"])
    assert result.exit_code == 2 and "needs a token budget" in result.stderr


def test_band_is_the_held_out_error_of_the_speed_model() -> None:
    """The band constants are the 10th/90th percentiles of published ÷ predicted step time on the held-out
    published runs with a tokens/s figure (recomputed from the committed benchmark output)."""
    data = json.loads(Path("benchmarks/results/published_runs.json").read_text(encoding="utf-8"))
    errors = np.array([r["throughput"]["error"] for r in data["rows"] if r["split"] == "heldout" and r["throughput"]
                       and "error" in r["throughput"] and r["throughput"]["metric"] == "tokens_per_s_per_gpu"])
    assert len(errors) >= 100
    assert np.percentile(1 + errors, 10) == pytest.approx(TIME_RATIO_LOW, abs=0.02)
    assert np.percentile(1 + errors, 90) == pytest.approx(TIME_RATIO_HIGH, abs=0.02)
    cost = training_cost(tokens_per_s=1000.0, gpus=2, train_tokens=3_600_000)
    assert cost.gpu_hours == pytest.approx(2.0) and cost.price_per_gpu_hour is None and cost.cost is None


def test_cost_summary_keeps_a_small_runs_band() -> None:
    """1.18 GPU-hours on one GPU reads as such: not ``1 GPU-hours (1–1)`` on ``1 GPUs``."""
    cost = training_cost(tokens_per_s=11_764.0, gpus=1, train_tokens=50_000_000, price_per_gpu_hour=2.5)
    line = cost.summary()
    assert "on 1 GPU:" in line and "1 GPUs" not in line
    assert "1.18 GPU-hours (0.976–1.39), 2.95 at 2.5/GPU-hour (2.44–3.48)" in line, line
    big = training_cost(tokens_per_s=1000.0, gpus=2048, train_tokens=3_600_000_000)
    assert "2,048,000 GPU-hours" in big.summary() and "on 2048 GPUs" in big.summary()


def test_report_shows_the_cost(cli_runner) -> None:
    from batchpilot.report.html import plan_html

    result = cli_runner.invoke(app, [*QWEN[:-2], "--finetune", "lora", "--train-tokens", "100M", "--json"])
    assert result.exit_code == 0, result.output
    record = PlanRecord.from_dict(json.loads(result.stdout))
    assert record.cost is not None and record.cost.train_tokens == 100_000_000
    html = plan_html(record)
    assert "time and cost: </strong>100,000,000 tokens (--train-tokens)" in html
