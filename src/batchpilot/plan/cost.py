"""Time and cost to train: a token budget at a plan's modelled speed, in wall time, GPU-hours and money, with
the band the speed model's measured error gives.

    >>> cost = training_cost(tokens_per_s=1.0e6, gpus=64, train_tokens=10**12, price_per_gpu_hour=2.5)
    >>> round(cost.wall_s / 86400, 1), round(cost.gpu_hours), round(cost.cost)
    (11.6, 17778, 44444)
    >>> round(cost.gpu_hours_low), round(cost.gpu_hours_high)
    (14693, 20948)

The budget is ``--train-tokens D`` (which, as a ``plan`` target, also sets the global batch by the DeepSeek LLM
prior: one number for both, as a pretraining run plans them) or ``--epochs E × --dataset-tokens T`` (any target:
fine-tuning sets its batch itself). Wall time = D ÷ the plan's tokens/s; GPU-hours = GPUs × wall time;
cost = GPU-hours × ``--price-per-gpu-hour``.

**Band.** The step-time model's error on the 128 held-out published runs with a tokens/s figure
(``benchmarks/results/published_runs.json``, split ``heldout``; median |error| 10 %, 84 % within 20 %): the
published time is the predicted time × (predicted ÷ published tokens/s), whose 10th and 90th percentiles are
:data:`TIME_RATIO_LOW` and :data:`TIME_RATIO_HIGH` — an 80 % band. It covers the model's error on a step, not a
run's stops: restarts after failures, evaluation, checkpointing and data stalls lengthen real runs (Llama 3
§3.3.4 reports 466 job interruptions in 54 days, 90 % effective training time; ``benchmarks/results/gpu_hours.md``
compares whole published runs).
"""

from __future__ import annotations

from batchpilot.errors import SpecError
from batchpilot.records.cost import TrainingCost, format_duration

SECONDS_PER_HOUR = 3600.0
#: 10th and 90th percentiles of published ÷ predicted step time on the held-out published runs (tokens/s rows),
#: from ``benchmarks/results/published_runs.json`` (tests/finetune/test_cost.py recomputes them from that file).
TIME_RATIO_LOW = 0.8265
TIME_RATIO_HIGH = 1.1783
BAND = ("80% band: the 10th–90th percentile of published ÷ predicted step time on 128 held-out published runs "
        "(median |error| 10%, 84% within 20%); a run's stops (failures, evaluation, checkpoints) are not in it")


def budget_tokens(*, train_tokens: int | None = None, epochs: float | None = None,
                  dataset_tokens: int | None = None) -> tuple[int, str] | None:
    """The run's token budget and where it comes from, or None when none is given."""
    if (epochs is None) != (dataset_tokens is None):
        raise SpecError("--epochs and --dataset-tokens go together (tokens = epochs × dataset tokens); give both")
    if epochs is not None and dataset_tokens is not None:
        if train_tokens is not None:
            raise SpecError("give the budget once: --train-tokens D, or --epochs E with --dataset-tokens T")
        if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not 0 < epochs <= 1e6:
            raise SpecError(f"--epochs {epochs!r} must be a positive number")
        return round(epochs * dataset_tokens), f"--epochs {epochs:g} × --dataset-tokens {dataset_tokens:,}"
    if train_tokens is not None:
        return train_tokens, "--train-tokens"
    return None


def training_cost(*, tokens_per_s: float, gpus: int, train_tokens: int, price_per_gpu_hour: float | None = None,
                  tokens_source: str = "--train-tokens") -> TrainingCost:
    """:class:`TrainingCost` of ``train_tokens`` at ``tokens_per_s`` (the whole job's) on ``gpus`` GPUs."""
    if not tokens_per_s > 0:
        raise SpecError(f"a plan's throughput must be positive to cost a run, got {tokens_per_s!r} tokens/s")
    if price_per_gpu_hour is not None and not 0 <= price_per_gpu_hour < 1e6:
        raise SpecError(f"--price-per-gpu-hour {price_per_gpu_hour!r} must be a price ≥ 0 per GPU-hour")
    wall = train_tokens / tokens_per_s
    hours = gpus * wall / SECONDS_PER_HOUR
    low, high = TIME_RATIO_LOW, TIME_RATIO_HIGH
    price = price_per_gpu_hour
    return TrainingCost(
        train_tokens=train_tokens, tokens_source=tokens_source, gpus=gpus, tokens_per_s=tokens_per_s,
        wall_s=wall, wall_s_low=wall * low, wall_s_high=wall * high,
        gpu_hours=hours, gpu_hours_low=hours * low, gpu_hours_high=hours * high, band=BAND,
        price_per_gpu_hour=price, cost=None if price is None else hours * price,
        cost_low=None if price is None else hours * low * price,
        cost_high=None if price is None else hours * high * price,
    )


def describe_cost(cost: TrainingCost) -> str:
    """One line: tokens, wall time with its band, GPU-hours and cost (:meth:`TrainingCost.summary`)."""
    return cost.summary()


__all__ = ["BAND", "budget_tokens", "describe_cost", "format_duration", "training_cost"]
