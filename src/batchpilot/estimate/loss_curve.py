"""The loss a run will reach: a saturating power law fitted to a short run's loss curve, and Chinchilla's law.

Pure arithmetic. The form is the data term of the published laws with an irreducible loss:

    L(D) = L_∞ + A · D^(−α)

(Kaplan et al. 2020, arXiv:2001.08361, Eq. 1.2 gives L(D) = (D_c/D)^α_D; Hoffmann et al. 2022,
arXiv:2203.15556, Eq. 2 adds the irreducible term E). Here D counts the tokens *this* run has seen at
its own batch, so the fit describes one training curve, not a family of compute-optimal runs.
:func:`fit_loss_curve` searches L_∞ on a grid below the smallest observed loss and, for each, fits log(L −
L_∞) = log A − α·log D by least squares; it keeps the L_∞ with the smallest squared error in L. Known
error: a short run constrains L_∞ weakly, so the extrapolation's spread over the near-best grid points is
reported as ``band`` (the range of predictions among fits within 10% of the best error).

:func:`chinchilla_loss` is Hoffmann et al. 2022's fitted L(N, D) = 1.69 + 406.4/N^0.34 + 410.7/D^0.28
(§3.3, "Approach 3"), in nats per token of their MassiveText data and tokenizer: it applies only where
the model and data match those conditions (otherwise the number is not comparable to the run's loss).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from batchpilot.errors import BatchpilotError

CHINCHILLA_E, CHINCHILLA_A, CHINCHILLA_B, CHINCHILLA_ALPHA, CHINCHILLA_BETA = 1.69, 406.4, 410.7, 0.34, 0.28
"""Hoffmann et al. 2022, §3.3: L(N, D) = E + A/N^α + B/D^β."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LossCurveFit:
    """L(D) = L_∞ + A·D^(−α) for one run."""

    l_inf: float
    a: float
    alpha: float
    rms_error: float
    """RMS error of the fit in nats at the fitted points."""
    tokens_range: tuple[float, float]
    """Smallest and largest fitted token count: beyond it the curve is an extrapolation."""
    near_best: tuple[tuple[float, float, float], ...]
    """(L_∞, A, α) of the grid fits within 10% of the best squared error (for :meth:`band`)."""

    def loss(self, tokens: float) -> float:
        return self.l_inf + self.a * tokens ** (-self.alpha)

    def tokens_to(self, loss: float) -> float:
        """D at which the curve reaches ``loss`` (inf when at or below L_∞)."""
        if loss <= self.l_inf:
            return math.inf
        return ((loss - self.l_inf) / self.a) ** (-1.0 / self.alpha)

    def band(self, tokens: float) -> tuple[float, float]:
        """Lowest and highest L(tokens) among the near-best fits."""
        values = [lo + a * tokens ** (-al) for lo, a, al in self.near_best]
        return min(values), max(values)


def _line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return my - slope * mx, slope


def fit_loss_curve(tokens: Sequence[float], losses: Sequence[float], *, grid: int = 200) -> LossCurveFit:
    """Fit L(D) = L_∞ + A·D^(−α) (module docstring) to finite, positive (tokens, loss) pairs."""
    pairs = [(d, v) for d, v in zip(tokens, losses, strict=True) if d > 0 and math.isfinite(v) and v > 0]
    if len(pairs) < 4 or len({d for d, _ in pairs}) < 4:
        raise BatchpilotError(f"loss-curve fit needs >= 4 points at different token counts, got {len(pairs)}; "
                              "run the measurement for more steps")
    floor = min(v for _, v in pairs)
    logd = [math.log(d) for d, _ in pairs]
    fits = []
    for i in range(grid):
        l_inf = floor * i / grid  # 0 … just below the smallest loss
        intercept, slope = _line(logd, [math.log(v - l_inf) for _, v in pairs])
        if slope >= 0:
            continue
        a, alpha = math.exp(intercept), -slope
        sse = sum((l_inf + a * d ** (-alpha) - v) ** 2 for d, v in pairs)
        fits.append((sse, l_inf, a, alpha))
    if not fits:
        raise BatchpilotError("the loss does not fall over these points; a power-law fit of the curve is meaningless")
    best = min(fits)
    near = tuple((lo, a, al) for sse, lo, a, al in fits if sse <= 1.1 * best[0] + 1e-12)
    d_all = [d for d, _ in pairs]
    return LossCurveFit(l_inf=best[1], a=best[2], alpha=best[3], rms_error=math.sqrt(best[0] / len(pairs)),
                        tokens_range=(min(d_all), max(d_all)), near_best=near)


def chinchilla_loss(params: float, tokens: float) -> float:
    """Hoffmann et al. 2022's L(N, D) = 1.69 + 406.4/N^0.34 + 410.7/D^0.28 (MassiveText nats per token)."""
    if not (params > 0 and tokens > 0):
        raise BatchpilotError(f"Chinchilla's law needs N > 0 and D > 0, got N={params}, D={tokens}")
    return CHINCHILLA_E + CHINCHILLA_A / params**CHINCHILLA_ALPHA + CHINCHILLA_B / tokens**CHINCHILLA_BETA
