"""The steps–examples trade-off fit (McCandlish et al. 2018, Eq. 2.11) and Kaplan's B_crit(L) form."""

from __future__ import annotations

import math

import pytest

from batchpilot.errors import BatchpilotError
from batchpilot.estimate.critical_batch import TradeoffPoint, fit_noise_vs_loss, fit_tradeoff

# Zhang et al. 2024 ("How Does Critical Batch Size Scale in Pre-training?", arXiv:2410.21676): steps to the
# target loss per batch (sequences of 512 tokens, 64 … 16384) of their five Chinchilla-scaled models, and the
# fit printed by their notebook (github.com/hlzhang109/critical-batch-size, plots/chinchilla.ipynb at commit
# c5b509d): log S = log(a + b/B) by scipy curve_fit, then CBS = b/(5a) + 1.2·256 (20% step overhead over
# linear scaling from B = 256). a and b are our S_min and E_min.
BATCHES = [2**i for i in range(6, 15)]
ZHANG_STEPS = {
    "85M": [46000, 23000, 13282, 7000, 3840, 2528, 1917, 1600, 1600],
    "151M": [96000, 49000, 24000, 12000, 7128, 4350, 2940, 2400, 2300],
    "302M": [196000, 90000, 46000, 23400, 13300, 7224, 4980, 3400, 2879],
    "604M": [311000, 166000, 81000, 37440, 21320, 11400, 7199, 4700, 3800],
    "1.2B": [642000, 331000, 176000, 94000, 46500, 25000, 15360, 8900, 6500],
}
ZHANG_CBS = {"85M": 745.32, "151M": 955.16, "302M": 1393.73, "604M": 1888.52, "1.2B": 2533.41}


def test_exact_hyperbola_is_recovered() -> None:
    # S = S_min(1 + B_crit/B) with S_min = 40, B_crit = 12 (E_min = 480): the fit must return them exactly.
    points = [TradeoffPoint(batch=b, steps=40.0 * (1 + 12.0 / b)) for b in (1, 2, 4, 8, 16, 32, 64, 128)]
    fit = fit_tradeoff(points)
    assert fit.s_min == pytest.approx(40.0, rel=1e-9) and fit.e_min == pytest.approx(480.0, rel=1e-9)
    assert fit.b_crit == pytest.approx(12.0, rel=1e-9) and fit.rms_rel_error < 1e-9
    # the hyperbola (S/S_min − 1)(E/E_min − 1) = 1 holds at every point
    assert all((p.steps / 40 - 1) * (p.examples / 480 - 1) == pytest.approx(1.0) for p in points)


@pytest.mark.parametrize("model", list(ZHANG_STEPS))
def test_reproduces_zhang_et_al_published_fits(model: str) -> None:
    fit = fit_tradeoff([TradeoffPoint(batch=b, steps=s) for b, s in zip(BATCHES, ZHANG_STEPS[model], strict=True)])
    # relative-error least squares vs their log-space curve_fit: the same minimiser to first order
    assert fit.b_crit / 5 + 1.2 * 256 == pytest.approx(ZHANG_CBS[model], rel=0.01)
    assert fit.rms_rel_error < 0.06


def test_bootstrap_band_brackets_the_fit_on_noisy_points() -> None:
    noise = [1.08, 0.93, 1.05, 0.97, 1.1, 0.95, 1.02, 0.9]  # ±10% multiplicative, fixed
    points = [TradeoffPoint(batch=b, steps=40.0 * (1 + 12.0 / b) * n)
              for b, n in zip((1, 2, 4, 8, 16, 32, 64, 128), noise, strict=True)]
    fit = fit_tradeoff(points, bootstrap=300)
    assert fit.band[0] <= fit.b_crit <= fit.band[1]
    assert fit.band[0] < 12.0 < fit.band[1] and 0.5 * 12 < fit.b_crit < 2 * 12


def test_points_that_do_not_bend_are_refused_with_the_reason() -> None:
    below = [TradeoffPoint(batch=b, steps=1000.0 / b) for b in (1, 2, 4, 8)]  # perfect scaling: all ≪ B_crit
    with pytest.raises(BatchpilotError, match="every batch is below B_crit; add larger batches"):
        fit_tradeoff([*below[:3], TradeoffPoint(batch=8, steps=1000.0 / 8 * 0.9)])
    with pytest.raises(BatchpilotError, match="every batch is above B_crit; add smaller batches"):
        fit_tradeoff([TradeoffPoint(batch=b, steps=50.0 * (1 + 0.01 * b)) for b in (16, 32, 64)])
    with pytest.raises(BatchpilotError, match=">= 3 points"):
        fit_tradeoff(below[:2])
    with pytest.raises(BatchpilotError, match="positive and finite"):
        fit_tradeoff([*below[:2], TradeoffPoint(batch=4, steps=math.inf)])


def test_kaplan_form_recovers_b_star_and_alpha() -> None:
    losses = [4.0, 3.5, 3.0, 2.7, 2.4]
    batches = [2.1e8 / loss ** (1 / 0.21) for loss in losses]  # Kaplan et al. 2020's constants, exact
    fit = fit_noise_vs_loss(losses, batches)
    assert fit.b_star == pytest.approx(2.1e8, rel=1e-9) and fit.alpha_b == pytest.approx(0.21, rel=1e-9)
    assert fit.batch(3.0) == pytest.approx(2.1e8 / 3.0 ** (1 / 0.21)) and fit.loss_range == (2.4, 4.0)


def test_kaplan_form_refuses_a_batch_that_does_not_grow() -> None:
    with pytest.raises(BatchpilotError, match="does not grow as the loss falls"):
        fit_noise_vs_loss([3.0, 2.5, 2.0], [10.0, 8.0, 5.0])
    with pytest.raises(BatchpilotError, match=">= 3"):
        fit_noise_vs_loss([3.0, math.nan, 2.0], [1.0, 2.0, 3.0])
