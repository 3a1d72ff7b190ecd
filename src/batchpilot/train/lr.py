"""Learning rate: linear warmup, cosine/linear decay, and the batch-size scaling rule.

``lr(step) = peak × warmup(step) × decay(progress) × scale(B / B₀)`` where

- ``warmup(step) = min(1, (step + 1) / warmup_steps)`` (linear, Goyal et al. 2017 §2.2);
- ``progress`` is ``step / steps`` or ``tokens_seen / tokens`` in [0, 1]; cosine:
  ``r + (1 − r)·½(1 + cos πp)`` (Loshchilov & Hutter 2017, no restarts), linear: ``r + (1 − r)(1 − p)``,
  ``r`` = ``min_lr_ratio``; ``wsd`` (warmup–stable–decay: Hu et al. 2024, MiniCPM, arXiv:2404.06395 §4;
  Hägele et al. 2024, arXiv:2405.18392): flat at the peak until ``1 − decay_ratio`` of the run, then linear
  to ``r`` over the last ``decay_ratio`` (``r + (1 − r)(1 − q)``, ``q`` the progress through the decay),
  torchtitan's ``linear_warmup_stable_decay`` with ``decay_type = "linear"``
  (``torchtitan/components/optimizer/lr_scheduler.py`` @ ``b5bcd76c``), counted in steps or tokens;
- ``scale`` is 1 (none), ``B/B₀`` (linear rule, Goyal et al. 2017) or ``√(B/B₀)`` (square-root rule for
  Adam, Malladi et al. 2022), ``B₀`` the first global batch of the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from batchpilot.train.config import LRDecay, LRScaling


@dataclass(frozen=True, kw_only=True, slots=True)
class LRSchedule:
    """A pure function of (step, tokens seen, global batch)."""

    peak_lr: float
    """LR at the reference batch after warmup, before decay."""
    warmup_steps: int
    decay: LRDecay
    min_lr_ratio: float
    scaling: LRScaling
    reference_batch_sequences: int
    """B₀: the global batch the peak LR is stated for."""
    total_steps: int | None = None
    """Decay horizon in steps (one of this and ``total_tokens``)."""
    total_tokens: int | None = None
    """Decay horizon in tokens."""
    decay_ratio: float = 0.2
    """``wsd``: the final share of the run over which the LR decays."""

    def progress(self, step: int, tokens_seen: int) -> float:
        if self.total_steps is not None:
            return min(1.0, step / self.total_steps)
        return min(1.0, tokens_seen / (self.total_tokens or 1))

    def batch_scale(self, global_batch_sequences: int) -> float:
        ratio = global_batch_sequences / self.reference_batch_sequences
        return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[self.scaling]

    def lr(self, *, step: int, tokens_seen: int, global_batch_sequences: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        p, r = self.progress(step, tokens_seen), self.min_lr_ratio
        if self.decay == "cosine":
            shape = r + (1 - r) * 0.5 * (1 + math.cos(math.pi * p))
        elif self.decay == "linear":
            shape = r + (1 - r) * (1 - p)
        elif self.decay == "wsd":
            q = max(0.0, (p - (1 - self.decay_ratio)) / self.decay_ratio)
            shape = r + (1 - r) * (1 - q)
        else:
            shape = 1.0
        return self.peak_lr * warm * shape * self.batch_scale(global_batch_sequences)
