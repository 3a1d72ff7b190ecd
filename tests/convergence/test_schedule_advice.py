"""From a short measurement to a whole-run schedule: loss-curve fit, cost integral, schedule text, LR rule."""

from __future__ import annotations

import math

import pytest

from batchpilot.errors import BatchpilotError
from batchpilot.estimate.loss_curve import chinchilla_loss, fit_loss_curve
from batchpilot.plan.schedule_advice import ShortRun, advise_schedule
from batchpilot.train.schedule_syntax import parse_batch_schedule

TOKENS = [1e4 * k for k in range(1, 41)]
LOSSES = [2.0 + 3.0 * t**-0.3 for t in TOKENS]


def _run(b_simple: list[float] | None = None, lr: float | None = 3e-3) -> ShortRun:
    return ShortRun(tokens=TOKENS, losses=LOSSES, b_simple=b_simple or [8 * (v / 2.2) ** -18 for v in LOSSES],
                    batch_sequences=8, seq_len=128, lr=lr)


def test_loss_curve_recovers_an_exact_power_law_and_inverts() -> None:
    # Kaplan et al. 2020 Eq. 1.2's form L = A·D^(−α), no floor: recovered exactly by the log-log fit
    fit = fit_loss_curve(TOKENS, [6.0 * t**-0.08 for t in TOKENS])
    assert fit.a == pytest.approx(6.0, rel=1e-9) and fit.alpha == pytest.approx(0.08, rel=1e-9)
    assert fit.rms_error == pytest.approx(0.0, abs=1e-12) and fit.tokens_range == (1e4, 4e5)
    assert fit.tokens_to(fit.loss(1e6)) == pytest.approx(1e6, rel=1e-6)
    # band: the exponent moved by the backtest's shortfall (−0.005 … +0.14) over the 10× past the fitted tokens
    assert fit.band(4e6) == pytest.approx((fit.loss(4e6) * 10**-0.14, fit.loss(4e6) * 10**0.005), rel=1e-9)
    assert fit.band(2e5) == (fit.loss(2e5), fit.loss(2e5))  # inside the fitted tokens: no extrapolation
    with pytest.raises(BatchpilotError, match=">= 4 points"):
        fit_loss_curve(TOKENS[:3], LOSSES[:3])


def test_chinchilla_law_coefficients() -> None:
    # Hoffmann et al. 2022 §3.3: L = 1.69 + 406.4/N^0.34 + 410.7/D^0.28; N, D → ∞ leaves E = 1.69
    assert chinchilla_loss(1e60, 1e60) == pytest.approx(1.69, abs=1e-9)
    assert chinchilla_loss(70e9, 1.4e12) == pytest.approx(1.69 + 406.4 / 70e9**0.34 + 410.7 / 1.4e12**0.28)


def test_fixed_measuring_batch_costs_exactly_the_planned_tokens() -> None:
    # dE = dE_m·(1 + B/B_c)/(1 + B_m/B_c) is dE_m at B = B_m: the whole run's tokens, in D/(B_m·seq) steps
    advice = advise_schedule(_run(), train_tokens=4e6, multiple=8, max_batch=512, fixed=[8, 64])
    fixed8 = next(c for c in advice.costs if c.name == "fixed-8")
    assert fixed8.tokens == pytest.approx(4e6, rel=1e-9) and fixed8.steps == pytest.approx(4e6 / (8 * 128), rel=1e-9)
    fixed64 = next(c for c in advice.costs if c.name == "fixed-64")
    b_c = [advice.noise_fit.batch(v) for v in (LOSSES[0], advice.target_loss)]  # B_crit grows from ~8 to ~30
    ratios = [(1 + 64 / b) / (1 + 8 / b) for b in b_c]
    assert min(ratios) < fixed64.tokens / 4e6 < max(ratios)  # between the ends' token factors
    assert fixed64.steps < fixed8.steps  # larger batch, fewer steps


def test_schedule_doubles_where_b_crit_reaches_twice_the_batch_and_parses() -> None:
    advice = advise_schedule(_run(), train_tokens=4e6, multiple=8, max_batch=512)
    # B_crit = 8·(L/2.2)^−18 reaches 32 at L* = 2.2·4^(−1/18), which the B_m = 8 curve reaches at D*; batch 16
    # spends (1 + 16/B_c)/(1 + 8/B_c) of its tokens to get there, between 1 and that factor at the start's B_c
    d_star = advice.loss_fit.tokens_to(2.2 * 4 ** (-1 / 18))
    b0 = advice.noise_fit.batch(advice.loss_fit.loss(TOKENS[0]))
    assert [b for _, b in advice.stages] == [16, 32]
    assert d_star < advice.stages[1][0] < d_star * (1 + 16 / b0) / (1 + 8 / b0)
    schedule = parse_batch_schedule(advice.schedule, global_batch_sequences=32, seq_len_tokens=128)
    assert schedule.planned_batches() == [16, 32]
    # LR: square-root rule anchored at the short run's 3e-3 at B = 8
    assert dict(advice.lr_by_batch) == pytest.approx({16: 3e-3 * math.sqrt(2), 32: 3e-3 * 2})
    sched = advice.costs[0]
    fixed8 = next(c for c in advice.costs if c.name == "fixed-8")
    assert sched.steps < 0.6 * fixed8.steps and sched.tokens > fixed8.tokens  # steps saved, tokens spent


def test_deepseek_anchor_when_the_model_is_known() -> None:
    advice = advise_schedule(_run(lr=None), train_tokens=4e6, multiple=8, max_batch=512,
                             model_flops_per_token=5.5e6)
    c = 5.5e6 * 4e6
    b_opt, lr_opt = 0.2920 * c**0.3271 / 128, 0.3118 * c**-0.125
    assert dict(advice.lr_by_batch)[16] == pytest.approx(lr_opt * math.sqrt(16 / b_opt))
    assert "DeepSeek LLM" in advice.lr_anchor


def test_refusals() -> None:
    with pytest.raises(BatchpilotError, match="longer than the measurement"):
        advise_schedule(_run(), train_tokens=1e5, multiple=8, max_batch=512)
    with pytest.raises(BatchpilotError, match="no LR anchor"):
        advise_schedule(_run(lr=None), train_tokens=4e6, multiple=8, max_batch=512)
    with pytest.raises(BatchpilotError, match="does not grow as the loss falls"):
        advise_schedule(_run(b_simple=[8 * (v / 2.2) ** 5 for v in LOSSES]), train_tokens=4e6, multiple=8,
                        max_batch=512)


def test_schedule_after_shifts_the_thresholds_for_a_continuing_run() -> None:
    advice = advise_schedule(_run(), train_tokens=4e6, multiple=8, max_batch=512)
    assert advice.schedule_after(0) == advice.schedule
    switch = advice.stages[1][0]  # the threshold shifted by the tokens already trained, rounded to 1024
    assert advice.schedule_after(892_800) == f"steps:0=16,{round((switch - 892_800) / 1024) * 1024}=32"
    assert advice.schedule_after(3e6) == "steps:0=32"
