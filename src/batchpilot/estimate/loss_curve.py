"""The loss a run will reach: a power law fitted to a short run's loss curve, and Chinchilla's law.

Pure arithmetic. The form is Kaplan et al. 2020's data law without an irreducible term:

    L(D) = A · D^(−α)

(arXiv:2001.08361, Eq. 1.2: L(D) = (D_c/D)^α_D), with D the tokens *this* run has seen at its own batch, so
the fit describes one training curve. :func:`fit_loss_curve` fits log L = log A − α·log D by least squares
(closed form). Hoffmann et al. 2022 (arXiv:2203.15556, Eq. 2) add an irreducible loss E, but they fit it
across hundreds of runs; on one short run it is not identifiable: a floor searched below the smallest
observed loss (this module's rule before) landed at 3.00–3.11 nats, just under the window's last loss, in 7
of 11 backtested fits on a run's first 15%, and predicted almost no further progress (errors +0.43 … +0.66
nats; ``benchmarks/results/loss_backtest.md``). Without it the mean error there falls from 0.525 to 0.317.

Known error: the curves of the CPU task steepen in log–log after a plateau (−dL/dlnD ≈ 0.2 over the first
150K tokens of a batch-16 run, ≈ 0.45 after), which no power law fitted inside the plateau can foresee, so
the fit under-predicts progress (by up to 0.58 nats from a run's first 15%, 0.37 from its first 30%).
``band`` carries the measured error: the exponent α fitted on the first 15% or 30% of 10 runs fell short of
the one each run then realised by :data:`EXPONENT_SHORTFALL` (smallest, largest;
``benchmarks/results/loss_backtest.md``), and the band spans those exponents beyond the fitted tokens. It is measured on one task (tiny-llama-1m, byte tokens): another model or data may fall outside it.

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


EXPONENT_SHORTFALL = (-0.005, 0.14)
"""Realised minus fitted exponent, ln(L_pred/L_true)/ln(D_true/D_fit), smallest and largest over the backtest:
−0.004 … +0.137 in 21 predictions (10 CPU-task runs fitted on their first 15% and 30%, and a batch-16 run's
first 150K tokens predicted at 1M; ``benchmarks/results/loss_backtest.md``), rounded outward."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LossCurveFit:
    """L(D) = A·D^(−α) for one run."""

    a: float
    alpha: float
    rms_error: float
    """RMS error of the fit in nats at the fitted points."""
    tokens_range: tuple[float, float]
    """Smallest and largest fitted token count: beyond it the curve is an extrapolation."""

    def loss(self, tokens: float) -> float:
        return self.a * tokens ** (-self.alpha)

    def tokens_to(self, loss: float) -> float:
        """D at which the curve reaches ``loss``."""
        return (loss / self.a) ** (-1.0 / self.alpha)

    def band(self, tokens: float) -> tuple[float, float]:
        """Lowest and highest L(tokens) with the exponent moved by :data:`EXPONENT_SHORTFALL` past the fitted tokens."""
        ratio = max(tokens / self.tokens_range[1], 1.0)
        lo, hi = EXPONENT_SHORTFALL
        return self.loss(tokens) * ratio ** (-hi), self.loss(tokens) * ratio ** (-lo)


def _line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return my - slope * mx, slope


def fit_loss_curve(tokens: Sequence[float], losses: Sequence[float]) -> LossCurveFit:
    """Fit L(D) = A·D^(−α) (module docstring) to finite, positive (tokens, loss) pairs."""
    pairs = [(d, v) for d, v in zip(tokens, losses, strict=True) if d > 0 and math.isfinite(v) and v > 0]
    if len(pairs) < 4 or len({d for d, _ in pairs}) < 4:
        raise BatchpilotError(f"loss-curve fit needs >= 4 points at different token counts, got {len(pairs)}; "
                              "run the measurement for more steps")
    logd = [math.log(d) for d, _ in pairs]
    intercept, slope = _line(logd, [math.log(v) for _, v in pairs])
    if slope >= 0:
        raise BatchpilotError("the loss does not fall over these points; a power-law fit of the curve is meaningless")
    a, alpha = math.exp(intercept), -slope
    sse = sum((a * d ** (-alpha) - v) ** 2 for d, v in pairs)
    return LossCurveFit(a=a, alpha=alpha, rms_error=math.sqrt(sse / len(pairs)),
                        tokens_range=(min(d for d, _ in pairs), max(d for d, _ in pairs)))


def chinchilla_loss(params: float, tokens: float) -> float:
    """Hoffmann et al. 2022's L(N, D) = 1.69 + 406.4/N^0.34 + 410.7/D^0.28 (MassiveText nats per token)."""
    if not (params > 0 and tokens > 0):
        raise BatchpilotError(f"Chinchilla's law needs N > 0 and D > 0, got N={params}, D={tokens}")
    return CHINCHILLA_E + CHINCHILLA_A / params**CHINCHILLA_ALPHA + CHINCHILLA_B / tokens**CHINCHILLA_BETA
