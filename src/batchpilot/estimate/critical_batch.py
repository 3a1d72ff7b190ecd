"""The critical batch measured directly: the steps–examples trade-off, and how it moves as the loss falls.

Pure arithmetic (no torch). McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training",
arXiv:1812.06162, §2.2, Eq. 2.11 and §3, Fig. 7): training to a fixed loss at batch B takes S optimizer
steps and E = B·S examples, and over a range of batches the pairs lie on the hyperbola

    (S/S_min − 1)(E/E_min − 1) = 1,          B_crit = E_min / S_min

(S_min: steps at an infinite batch; E_min: examples at a tiny one). Substituting E = B·S gives the same
law as ``S(B) = S_min + E_min/B`` — *linear* in the two unknowns with regressor 1/B — which is how
:func:`fit_tradeoff` fits it: weighted least squares on the relative error of S (weights 1/S², so a
10% miss counts alike at 10 and at 1000 steps), closed form, no optimiser. Its band is a bootstrap over
the measured points (our choice; the paper fits by eye on log axes). Known error: the law assumes the
learning rate is tuned at every batch; with a rule-based LR (e.g. square-root scaling) a batch whose LR
is off its optimum needs more steps, which the fit absorbs as a smaller or larger B_crit.

How the critical batch moves with the loss — Kaplan et al. 2020 (arXiv:2001.08361, Eq. 5.1, §5.1):
``B_crit(L) = B* / L^(1/α_B)``, a power law in the loss L (nats per token); :func:`fit_noise_vs_loss`
fits B* and α_B by least squares in log–log space to any (loss, batch) pairs — measured B_crit or the
running B_simple of one run. Kaplan et al. fitted B* ≈ 2.1e8 tokens, α_B ≈ 0.21 on WebText2 with GPT-2
tokens; another tokenizer changes L, so only the form carries over, not the constants.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from batchpilot.errors import BatchpilotError


@dataclass(frozen=True, kw_only=True, slots=True)
class TradeoffPoint:
    """One training run to the target loss."""

    batch: float
    """Global batch B (sequences, or tokens: the fit is in the same unit)."""
    steps: float
    """Optimizer steps S to reach the target (may be fractional: interpolated between evaluations)."""

    @property
    def examples(self) -> float:
        """E = B·S."""
        return self.batch * self.steps


@dataclass(frozen=True, kw_only=True, slots=True)
class TradeoffFit:
    """S(B) = S_min + E_min/B fitted to measured points (McCandlish et al. 2018, Eq. 2.11)."""

    s_min: float
    """Steps at an infinite batch."""
    e_min: float
    """Examples at a vanishing batch (the unit of the points' batch)."""
    b_crit: float
    """E_min / S_min: the batch at which steps and examples are both 2× their minimum."""
    rms_rel_error: float
    """Root-mean-square relative error of the fitted S at the measured points."""
    band: tuple[float, float]
    """Bootstrap 5–95% range of B_crit over resampled points ((nan, nan) when not computed)."""
    points: int
    """Number of points fitted."""

    def steps(self, batch: float) -> float:
        """S(B) = S_min·(1 + B_crit/B)."""
        return self.s_min + self.e_min / batch

    def examples(self, batch: float) -> float:
        """E(B) = E_min·(1 + B/B_crit)."""
        return self.e_min + self.s_min * batch


def _solve(points: Sequence[TradeoffPoint]) -> tuple[float, float]:
    """Weighted least squares of S = a + b·(1/B), weights 1/S² (normal equations, 2×2)."""
    sw = sx = sy = sxx = sxy = 0.0
    for p in points:
        w, x = 1.0 / p.steps**2, 1.0 / p.batch
        sw, sx, sy = sw + w, sx + w * x, sy + w * p.steps
        sxx, sxy = sxx + w * x * x, sxy + w * x * p.steps
    det = sw * sxx - sx * sx
    if det <= 0:
        raise BatchpilotError(f"the trade-off fit needs at least two different batch sizes, got {len(points)} "
                              "points at one; measure more batch sizes")
    return (sxx * sy - sx * sxy) / det, (sw * sxy - sx * sy) / det


def fit_tradeoff(points: Sequence[TradeoffPoint], *, bootstrap: int = 0, seed: int = 0) -> TradeoffFit:
    """Fit (S/S_min − 1)(E/E_min − 1) = 1 to ``points``; ``bootstrap`` > 0 adds a 5–95% band of B_crit.

    Raises :class:`BatchpilotError` when the points do not bend: S_min ≤ 0 (steps still halve with every
    doubling — the batches are all below B_crit) or E_min ≤ 0 (steps do not fall at all — all above it).
    """
    if len(points) < 3:
        raise BatchpilotError(f"the trade-off fit needs >= 3 points (batch, steps), got {len(points)}; "
                              "measure at least 3 batch sizes, better 6 spanning B_crit/8 to 8·B_crit")
    for p in points:
        if not (p.batch > 0 and p.steps > 0 and math.isfinite(p.steps)):
            raise BatchpilotError(f"trade-off point batch={p.batch}, steps={p.steps}: both must be positive and finite")
    s_min, e_min = _solve(points)
    if s_min <= 0 or e_min <= 0:
        which = ("steps keep halving with every doubling: every batch is below B_crit; add larger batches"
                 if s_min <= 0 else "steps do not fall with the batch: every batch is above B_crit; add smaller batches")
        raise BatchpilotError(f"no critical batch in these points (S_min={s_min:.3g}, E_min={e_min:.3g}): {which}")
    rms = math.sqrt(sum(((s_min + e_min / p.batch) / p.steps - 1.0) ** 2 for p in points) / len(points))
    band = _bootstrap(points, bootstrap, seed) if bootstrap else (math.nan, math.nan)
    return TradeoffFit(s_min=s_min, e_min=e_min, b_crit=e_min / s_min, rms_rel_error=rms, band=band,
                       points=len(points))


def _bootstrap(points: Sequence[TradeoffPoint], draws: int, seed: int) -> tuple[float, float]:
    """5th and 95th percentile of B_crit over fits to resampled points (draws that do not bend count as
    B_crit = 0 or ∞, so the band widens instead of silently shrinking)."""
    rng, values = random.Random(seed), []
    for _ in range(draws):
        sample = [points[rng.randrange(len(points))] for _ in points]
        if len({p.batch for p in sample}) < 2:
            continue
        a, b = _solve(sample)
        values.append(b / a if a > 0 and b > 0 else (math.inf if a <= 0 < b else 0.0))
    if not values:
        return math.nan, math.nan
    values.sort()
    return values[int(0.05 * (len(values) - 1))], values[math.ceil(0.95 * (len(values) - 1))]


@dataclass(frozen=True, kw_only=True, slots=True)
class NoiseLossFit:
    """B(L) = B* / L^(1/α_B) (Kaplan et al. 2020, Eq. 5.1) fitted to (loss, batch) pairs."""

    b_star: float
    """B* in the unit of the fitted batches."""
    alpha_b: float
    """α_B (the batch grows as L^(−1/α_B))."""
    rms_log_error: float
    """Root-mean-square error of log B at the fitted points (0.69 = a factor 2)."""
    points: int
    """Number of points fitted."""
    loss_range: tuple[float, float]
    """Smallest and largest fitted loss: outside it the fit is an extrapolation."""

    def batch(self, loss: float) -> float:
        """B(L) = B* · L^(−1/α_B)."""
        if not (math.isfinite(loss) and loss > 0):
            raise BatchpilotError(f"loss must be a positive number of nats per token, got {loss}")
        return self.b_star * loss ** (-1.0 / self.alpha_b)


def fit_noise_vs_loss(losses: Sequence[float], batches: Sequence[float]) -> NoiseLossFit:
    """Least squares of log B = log B* − (1/α_B)·log L over the finite, positive pairs.

    Needs at least 3 pairs and a falling loss with a growing batch (α_B > 0); otherwise one line saying so.
    """
    pairs = [(math.log(loss), math.log(b)) for loss, b in zip(losses, batches, strict=True)
             if math.isfinite(loss) and loss > 0 and math.isfinite(b) and b > 0]
    if len(pairs) < 3:
        raise BatchpilotError(f"B(L) fit needs >= 3 (loss, batch) pairs with finite positive values, got {len(pairs)}; "
                              "measure the noise scale on more steps")
    n = len(pairs)
    mx, my = sum(x for x, _ in pairs) / n, sum(y for _, y in pairs) / n
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    if sxx <= 0:
        raise BatchpilotError("B(L) fit needs pairs at different losses; measure over a longer stretch of training")
    slope = sum((x - mx) * (y - my) for x, y in pairs) / sxx
    if slope >= 0:
        raise BatchpilotError(f"the measured batch does not grow as the loss falls (log-log slope {slope:+.2f}); "
                              "Kaplan's form B*/L^(1/α_B) does not apply to these points")
    intercept = my - slope * mx
    rms = math.sqrt(sum((y - intercept - slope * x) ** 2 for x, y in pairs) / n)
    raw = [math.exp(x) for x, _ in pairs]
    return NoiseLossFit(b_star=math.exp(intercept), alpha_b=-1.0 / slope, rms_log_error=rms, points=n,
                        loss_range=(min(raw), max(raw)))
