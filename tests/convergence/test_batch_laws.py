"""Published batch-size laws (plan.batch_laws): coefficients against their sources, ranges, disagreement."""

from __future__ import annotations

import math

import pytest

from batchpilot.errors import BatchpilotError
from batchpilot.plan.batch_laws import (
    LAWS,
    LawInputs,
    kaplan_loss,
    law_inputs,
    predict,
    predict_all,
    spread,
)
from batchpilot.specs.model import load_model


def _x(n: float, d: float, m: float = 1e9, seq: int = 2048) -> LawInputs:
    return LawInputs(non_embedding_params=n, train_tokens=d, flops_per_token=m, seq_len=seq)


@pytest.mark.parametrize(("n_millions", "forecast"), [(85, 746.287), (1200, 2578.188)])
def test_zhang_law_reproduces_their_notebooks_forecast(n_millions: float, forecast: float) -> None:
    # plots/chinchilla.ipynb (github.com/hlzhang109/critical-batch-size @ c5b509d) prints "Model Size: 85,
    # Forecasted CBS: 746.287…" and "1200 … 2578.188…" (sequences of 512) for its Chinchilla runs, D = 20·N.
    p = predict("zhang-cbs-2024", _x(n_millions * 1e6, 20 * n_millions * 1e6))
    assert p.batch_tokens / 512 == pytest.approx(forecast, rel=2e-4)
    assert p.in_range and p.learning_rate is None


def test_step_law_batch_depends_on_data_only_and_lr_on_both() -> None:
    a, b = predict("step-law-2025", _x(3e8, 5e10)), predict("step-law-2025", _x(9e8, 5e10))
    assert a.batch_tokens == b.batch_tokens  # "invariant to N"
    assert a.learning_rate is not None and b.learning_rate is not None
    assert b.learning_rate / a.learning_rate == pytest.approx(3.0**-0.713)  # η ∝ N^−0.713
    c = predict("step-law-2025", _x(3e8, 1e11))
    assert c.batch_tokens / a.batch_tokens == pytest.approx(2.0**0.571)  # B ∝ D^0.571
    assert a.in_range and not predict("step-law-2025", _x(7e9, 2e12)).in_range


def test_kaplan_loss_limits_are_its_single_variable_laws() -> None:
    # Eq. 1.5: D → ∞ leaves (N_c/N)^α_N; N → ∞ leaves (D_c/D)^α_D (Table 2's constants)
    assert kaplan_loss(1e9, 1e40) == pytest.approx((6.4e13 / 1e9) ** 0.076, rel=1e-9)
    assert kaplan_loss(1e40, 1e10) == pytest.approx((1.8e13 / 1e10) ** 0.103, rel=1e-9)


def test_deepseek_law_matches_deepseek_llm_7b_through_the_model_preset() -> None:
    # DeepSeek LLM Table 2: 7B trained on 2T tokens with 2304 × 4096 = 9.44M tokens and LR 4.2e-4
    x = law_inputs(load_model("deepseek-llm-7b"), train_tokens=2e12, seq_len=4096)
    p = predict("deepseek-llm-2024", x)
    assert p.batch_tokens == pytest.approx(9_437_184, rel=0.03)
    assert p.learning_rate == pytest.approx(4.2e-4, rel=0.03)
    assert not p.in_range and "outside" in p.note  # C ≈ 8.5e22: far beyond the fitted 1e17–3e20


def test_every_law_predicts_and_the_spread_names_the_extremes() -> None:
    rows = predict_all(law_inputs(load_model("llama-7b"), train_tokens=1e12, seq_len=2048))
    assert [r.law for r in rows] == list(LAWS)
    assert all(math.isfinite(r.batch_tokens) and r.batch_tokens > 0 for r in rows)
    ratio, lo, hi = spread(rows)
    values = {r.law: r.batch_tokens for r in rows}
    assert ratio == pytest.approx(max(values.values()) / min(values.values()))
    assert values[lo] == min(values.values()) and values[hi] == max(values.values())


def test_mixture_of_experts_uses_active_non_embedding_parameters() -> None:
    spec = load_model("deepseek-v3")
    x = law_inputs(spec, train_tokens=14.8e12, seq_len=4096)
    assert x.non_embedding_params == spec.params_active - spec.params_embedding
    assert x.non_embedding_params < spec.params_non_embedding / 10  # 37B active of 671B


def test_bad_inputs() -> None:
    with pytest.raises(BatchpilotError, match="unknown batch law"):
        predict("nope", _x(1e9, 1e10))
    with pytest.raises(BatchpilotError, match="train tokens"):
        law_inputs(load_model("llama-7b"), train_tokens=0, seq_len=2048)


def test_plan_train_tokens_shows_every_law_beside_the_deepseek_target() -> None:
    from batchpilot.plan.options import PlanOptions, prepare_plan

    prepared = prepare_plan(PlanOptions(model="llama-3-8b", gpu="h100-sxm", gpus=64, seq_len=8192,
                                        train_tokens=15 * 10**12))
    prior = prepared.target_record["prior"]
    laws = {law["law"]: law for law in prior["laws"]}
    assert list(laws) == list(LAWS)
    assert laws["deepseek-llm-2024"]["batch_tokens"] == pytest.approx(prior["batch_tokens"])  # the planned target
    assert "other published laws: step-law-2025" in prepared.source and "apart" in prepared.source
