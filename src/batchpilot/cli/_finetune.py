"""The fine-tuning and cost flags (``--finetune``, ``--epochs``, ``--dataset-tokens``, ``--price-per-gpu-hour``):
one definition, and what ``plan``/``memory``/``probe``/``train``/``tune`` do with them.

``--finetune SPEC`` (:func:`batchpilot.specs.finetune.parse_finetune`: ``full``, ``lora,r=16``,
``qlora,r=64,alpha=16,dropout=0.05``, ``full,frozen-layers=8``, ``full,kahan``) selects what trains; ``plan`` also
takes ``--finetune compare`` (every mode of :mod:`batchpilot.plan.finetune` planned side by side), and when nothing
fits in full training it names the fine-tuning modes that do.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated

from rich import box
from rich.table import Table

from batchpilot.cli._common import console
from batchpilot.cli._options import count, number, option
from batchpilot.errors import BatchpilotError, InfeasibleError, SpecError
from batchpilot.plan.cost import budget_tokens, describe_cost, format_duration, training_cost
from batchpilot.plan.finetune import compare_modes
from batchpilot.plan.request import PlanRequest, PlanResult
from batchpilot.records.cost import FineTuneMode, TrainingCost
from batchpilot.specs.finetune import FULL, FineTune, parse_finetune
from batchpilot.specs.settings import RunSettings
from batchpilot.units import GIB, format_count

_PANEL = "Fine-tuning and cost"
COMPARE = "compare"

FinetuneOpt = Annotated[str, option(
    "--finetune", help="What trains: full | lora | qlora, with ,key=value options (r, alpha, targets=all-linear|"
    "attention|qv|q+v…, dropout, frozen-layers, bf16-update=kahan|stochastic, paged), e.g. lora,r=16,alpha=32 or "
    "full,frozen-layers=8.", rich_help_panel=_PANEL)]
PlanFinetuneOpt = Annotated[str | None, option(
    "--finetune", show_default="full; modes that fit are named when nothing fits",
    help="What trains (full | lora | qlora with ,key=value options: r, alpha, targets, dropout, frozen-layers, "
         "bf16-update, paged), or 'compare': plan every mode (full, 8-bit AdamW, pure bf16, LoRA, QLoRA) side by "
         "side with memory, speed and what each changes.", rich_help_panel=_PANEL)]
EpochsOpt = Annotated[float | None, option(
    "--epochs", number("--epochs"), help="Epochs over --dataset-tokens: the token budget for time and cost.", rich_help_panel=_PANEL)]
DatasetTokensOpt = Annotated[int | None, option(
    "--dataset-tokens", count("--dataset-tokens"), help="Tokens in the dataset (with --epochs).",
    rich_help_panel=_PANEL)]
PriceOpt = Annotated[float | None, option(
    "--price-per-gpu-hour", number("--price-per-gpu-hour"), help="Price of one GPU-hour: the cost of the run (with a token budget).",
    rich_help_panel=_PANEL)]


def finetune_of(text: str | None) -> FineTune:
    """The ``--finetune`` value (``compare`` and None mean full training for the search itself)."""
    if text is None or text.strip().lower() == COMPARE:
        return FULL
    return parse_finetune(text)


def with_finetune(settings: RunSettings, text: str | None) -> RunSettings:
    """``settings`` with ``--finetune``."""
    ft = finetune_of(text)
    return replace(settings, finetune=ft)


def request_with_finetune(request: PlanRequest, text: str | None) -> PlanRequest:
    """The plan request with ``--finetune`` in its settings."""
    return replace(request, settings=with_finetune(request.settings, text))


@dataclass(frozen=True, kw_only=True, slots=True)
class Budget:
    """The token budget and price flags."""

    train_tokens: int | None = None
    epochs: float | None = None
    dataset_tokens: int | None = None
    price: float | None = None


def plan_cost(result: PlanResult, flags: Budget) -> TrainingCost | None:
    """The winner's time and cost for the budget the flags give (None without a budget)."""
    budget = budget_tokens(train_tokens=flags.train_tokens, epochs=flags.epochs, dataset_tokens=flags.dataset_tokens)
    price = flags.price
    if budget is None:
        if price is not None:
            raise SpecError("--price-per-gpu-hour needs a token budget: --train-tokens D, or --epochs with "
                            "--dataset-tokens")
        return None
    best = result.plans[0]
    return training_cost(tokens_per_s=best.step.tokens_per_s, gpus=result.request.cluster.total_devices,
                         train_tokens=budget[0], tokens_source=budget[1], price_per_gpu_hour=price)


def modes_for(request: PlanRequest, flags: Budget) -> tuple[FineTuneMode, ...]:
    """:func:`compare_modes` with the flags' budget."""
    budget = budget_tokens(train_tokens=flags.train_tokens, epochs=flags.epochs, dataset_tokens=flags.dataset_tokens)
    return compare_modes(request, train_tokens=budget[0] if budget else None,
                         tokens_source=budget[1] if budget else "", price_per_gpu_hour=flags.price)


def suggest_modes(exc: InfeasibleError, request: PlanRequest) -> BatchpilotError:
    """Full training does not fit: the same one-line error, naming the fine-tuning modes that do."""
    if request.settings.finetune != FULL:
        return exc
    try:
        modes = [m for m in compare_modes(request) if m.fits and m.name != "full"]
    except BatchpilotError:  # a model the adapters are not modelled for
        return exc
    if not modes:
        return exc
    shown = "; ".join(f"{m.flags} ({(m.memory_bytes or 0) / GIB:.1f} GiB, {format_count(m.tokens_per_s or 0)} "
                      f"tokens/s)" for m in modes)
    return InfeasibleError(f"{exc}; fine-tuning modes that fit: {shown} (plan --finetune compare)")


def render_modes(modes: tuple[FineTuneMode, ...], budget_gpus: int | None = None) -> None:
    """The modes table (``plan --finetune compare``)."""
    table = Table("mode", "fits", "GiB", "m×acc", "recompute", "tokens/s", "trainable", "time", box=box.SIMPLE_HEAD,
                  pad_edge=False, padding=(0, 1, 0, 0), caption="per GPU; tokens/s for the whole job")
    for m in modes:
        table.add_row(m.name, "yes" if m.fits else "no",
                      f"{m.memory_bytes / GIB:.1f}" if m.memory_bytes else "—",
                      f"{m.micro_batch}×{m.grad_accum}" if m.fits else "—", m.recompute or "—",
                      format_count(m.tokens_per_s) if m.tokens_per_s else "—", format_count(m.trainable_params),
                      format_duration(m.cost.wall_s) if m.cost else "—")
    console.print(table)
    for m in modes:
        line = f"[bold]{m.name}[/] ({m.flags}): optimizer — {m.optimizer}; result — {m.result}"
        if not m.fits:
            line += f"; does not fit: {m.reason}"
        console.print(line, soft_wrap=True, highlight=False)


def render_cost(cost: TrainingCost) -> None:
    console.print(f"[bold]time and cost[/]: {describe_cost(cost)}", soft_wrap=True, highlight=False)
