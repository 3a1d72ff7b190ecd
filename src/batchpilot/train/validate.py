"""Checks that need no data and no model weights: run before anything is written or launched.

Bad input fails here with one line (exit 2 in the CLI): a ``--model`` run folder without a checkpoint, whose
recorded model is gone or whose tokenizer differs, a sequence longer than the model's positions,
a global batch that is not ``micro × accum × dp``, a schedule that produces such a batch, a token
budget smaller than one sequence, a missing data path, an unknown tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from batchpilot.errors import BatchpilotError, DataError, SpecError
from batchpilot.specs.batch import BatchTriad
from batchpilot.specs.model import load_model
from batchpilot.train.config import TrainConfig
from batchpilot.train.run_folder import check_run_model
from batchpilot.train.schedule import BatchSchedule, ConstantSchedule, check_schedule
from batchpilot.train.schedule_syntax import parse_batch_schedule
from batchpilot.train.tokenizer import resolve_tokenizer


@dataclass(frozen=True, kw_only=True, slots=True)
class StaticPlan:
    """What the static checks derive."""

    schedule: BatchSchedule
    batch_multiple: int
    """Every global batch must be a multiple of this: micro × dp (fixed, packed) or dp (token-budget)."""
    max_tokens_per_micro_batch: int
    """Token-budget batching's padded tokens per micro-batch (micro × seq_len unless given)."""
    first_triad: BatchTriad | None
    """The triad of the first step (None for token-budget batching, where accumulation varies)."""


def _model_limits(model: str) -> tuple[int, int] | None:
    """(vocab, max positions) from the model's config.json; None if it is a type ModelSpec does not know."""
    try:
        spec = load_model(model)
    except SpecError as exc:
        if Path(model).is_dir() and "unsupported model_type" in str(exc):
            return None
        raise
    return spec.vocab_size, spec.max_position_embeddings


def _check_data(data: str) -> None:
    if data == "stdlib" or data.startswith("hf:"):
        return
    if not Path(data).exists():
        raise DataError(f"data path {data!r} does not exist; pass a file, a folder, 'stdlib' or hf:NAME")


def check_static(config: TrainConfig, world_size: int) -> StaticPlan:
    """Validate ``config`` for ``world_size`` processes (``world_size / --tp`` data-parallel ranks) without
    reading data or building the model."""
    dc, bc, tp = config.data, config.batch, config.parallel.tp
    if world_size % tp:
        raise BatchpilotError(f"--tp {tp} does not divide the {world_size} processes; launch a multiple of {tp} "
                              f"processes or use a --tp that divides {world_size}")
    world_size //= tp  # data-parallel ranks from here on
    _check_data(dc.data)
    kind, bpe_vocab, _ = resolve_tokenizer(dc.tokenizer)
    limits = _model_limits(check_run_model(config.model.model, dc))  # a run folder: its recorded architecture
    if limits is not None:
        vocab, positions = limits
        if dc.seq_len > positions:
            raise SpecError(f"--seq-len {dc.seq_len} exceeds the model's {positions} positions "
                            f"(max_position_embeddings); use --seq-len {positions} or less")
        needed = 256 if kind == "bytes" else bpe_vocab or 0
        if needed > vocab:
            raise SpecError(f"--tokenizer {dc.tokenizer} needs {needed} ids but the model's vocabulary is {vocab}; "
                            f"use bpe:{vocab} or a model with a larger vocab_size")
    budget = bc.max_tokens_per_micro_batch or bc.micro_batch_sequences * dc.seq_len
    if bc.batching == "token-budget" and budget < dc.seq_len:
        raise BatchpilotError(f"--max-tokens-per-micro-batch {budget} is below one {dc.seq_len}-token sequence; "
                              f"use at least {dc.seq_len}")
    if tp > 1 and bc.batch_schedule.strip().lower().startswith("adaptive"):
        raise BatchpilotError(f"--batch-schedule {bc.batch_schedule} measures the gradient noise scale from each "
                              f"rank's micro-batch gradients, which tensor parallelism splits over --tp {tp} "
                              f"ranks; use --tp 1 or a fixed schedule (constant, ramp:…, steps:…)")
    schedule = parse_batch_schedule(bc.batch_schedule, global_batch_sequences=bc.global_batch_sequences,
                                    seq_len_tokens=dc.seq_len)
    multiple = world_size if bc.batching == "token-budget" else bc.micro_batch_sequences * world_size
    triad = None
    if bc.batching != "token-budget" and isinstance(schedule, ConstantSchedule):
        triad = BatchTriad.from_global(global_batch_sequences=bc.global_batch_sequences,
                                       micro_batch_sequences=bc.micro_batch_sequences,
                                       data_parallel_ranks=world_size, seq_len_tokens=dc.seq_len)
    check_schedule(schedule, multiple)
    return StaticPlan(schedule=schedule, batch_multiple=multiple, max_tokens_per_micro_batch=budget,
                      first_triad=triad)
