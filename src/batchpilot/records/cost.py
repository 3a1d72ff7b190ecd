"""Records of what a run costs and of the fine-tuning modes a plan compares (``plan --json``'s ``cost`` and
``finetune_modes``, ``tune``'s plan, the report).

    >>> cost = TrainingCost(train_tokens=10**9, tokens_source="--train-tokens", gpus=8, tokens_per_s=1e5,
    ...                     wall_s=1e4, wall_s_low=8.3e3, wall_s_high=1.18e4, gpu_hours=22.2, gpu_hours_low=18.4,
    ...                     gpu_hours_high=26.2, band="", price_per_gpu_hour=2.0, cost=44.4, cost_low=36.8,
    ...                     cost_high=52.4)
    >>> from batchpilot.records.base import decode_dataclass
    >>> decode_dataclass(TrainingCost, cost.to_dict(), "") == cost
    True
"""

from __future__ import annotations

from dataclasses import dataclass

from batchpilot.records.base import JsonValue


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainingCost(JsonValue):
    """Wall time, GPU-hours and money to train a token budget at a plan's modelled speed, with the band the
    speed model's measured error on held-out published runs gives (:mod:`batchpilot.plan.cost`)."""

    train_tokens: int
    """Tokens the run trains on."""
    tokens_source: str
    """Where the budget comes from: ``--train-tokens`` or ``--epochs × --dataset-tokens``."""
    gpus: int
    """GPUs the plan uses."""
    tokens_per_s: float
    """The plan's modelled throughput, whole job."""
    wall_s: float
    """Predicted wall time (train_tokens ÷ tokens_per_s)."""
    wall_s_low: float
    """Lower end of the band."""
    wall_s_high: float
    """Upper end of the band."""
    gpu_hours: float
    """gpus × wall time in hours."""
    gpu_hours_low: float
    gpu_hours_high: float
    band: str
    """What the band is (the held-out error quantiles it comes from)."""
    price_per_gpu_hour: float | None = None
    """``--price-per-gpu-hour``; None when not given."""
    cost: float | None = None
    """gpu_hours × price."""
    cost_low: float | None = None
    cost_high: float | None = None

    def summary(self) -> str:
        """One line: tokens, wall time with its band, GPU-hours and cost (display only)."""
        text = (f"{self.train_tokens:,} tokens ({self.tokens_source}) at {self.tokens_per_s:,.0f} tokens/s on "
                f"{self.gpus} GPU{'s' if self.gpus != 1 else ''}: {format_duration(self.wall_s)} "
                f"({format_duration(self.wall_s_low)}–{format_duration(self.wall_s_high)}), "
                f"{format_amount(self.gpu_hours)} GPU-hours "
                f"({format_amount(self.gpu_hours_low)}–{format_amount(self.gpu_hours_high)})")
        if self.cost is not None and self.cost_low is not None and self.cost_high is not None:
            text += (f", {format_amount(self.cost)} at {self.price_per_gpu_hour:g}/GPU-hour "
                     f"({format_amount(self.cost_low)}–{format_amount(self.cost_high)})")
        return text + "; band: 10th–90th percentile of the speed model's held-out error"


def format_amount(x: float) -> str:
    """GPU-hours or money: whole numbers from 100 on (``2,664,000``), else 3 significant digits (``1.18``,
    ``0.0421``), so a small run's band does not collapse to ``1–1`` (display only).

    >>> format_amount(2_663_912.4), format_amount(1.1803), format_amount(2.95), format_amount(0.04213)
    ('2,663,912', '1.18', '2.95', '0.0421')
    """
    return f"{x:,.0f}" if abs(x) >= 99.95 else f"{x:.3g}"


def format_duration(seconds: float) -> str:
    """``3.2 h``, ``11.6 days``, ``45 min`` (display only)."""
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


@dataclass(frozen=True, kw_only=True, slots=True)
class FineTuneMode(JsonValue):
    """One way to train the model on the cluster: its settings, whether it fits, and what it changes."""

    name: str
    """Short name (``full``, ``full 8-bit AdamW``, ``lora``, ``qlora``...)."""
    flags: str
    """The ``plan`` flags that select it (``--finetune lora,r=16,alpha=16,targets=all-linear``)."""
    fits: bool
    """A plan exists for the target batch on this cluster."""
    trainable_params: int
    """Parameters with gradients and optimizer states."""
    optimizer: str
    """How the optimizer (and its state) changes."""
    result: str
    """How the result changes (full weights vs a low-rank adapter; precision of the update)."""
    memory_bytes: int | None = None
    """The best plan's peak memory per GPU (what must fit)."""
    micro_batch: int | None = None
    grad_accum: int | None = None
    recompute: str | None = None
    zero_stage: int | None = None
    tokens_per_s: float | None = None
    """The best plan's modelled tokens/s (whole job)."""
    step_time_s: float | None = None
    reason: str | None = None
    """Why nothing fits (when ``fits`` is false)."""
    cost: TrainingCost | None = None
    """With a token budget: time, GPU-hours and cost at this mode's speed."""
