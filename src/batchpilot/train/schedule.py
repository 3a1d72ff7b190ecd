"""Global-batch schedules: constant, linear ramp (GPT-3 / Megatron), staged steps (Llama 3 / DeepSeek-V3).

A schedule answers one question before every optimizer step: *how many sequences is the next global
batch?* The loop then re-derives the gradient-accumulation steps with
:meth:`batchpilot.specs.batch.BatchTriad.with_global` — the micro-batch never changes.

Syntax of ``--batch-schedule`` (token counts take ``batchpilot.units.parse_count`` suffixes)::

    constant                                   the --global-batch every step
    ramp:start=32,increment=32,over=4B         Megatron ``--rampup-batch-size 32 32 <samples>``, over tokens
    ramp-tokens:start=32Ki,increment=32Ki,over=4B   the same with batch values in tokens (÷ seq_len)
    steps:0=1536,469B=15360                    from 0 tokens 1536 sequences, from 469B tokens 15360
    steps-tokens:0=4Mi,252M=8Mi,2.87T=16Mi     Llama 3 405B (§3.4.1), batch values in tokens

Thresholds (``over``, the keys of ``steps``) count input tokens consumed (padding excluded).

Adaptive schedules (:mod:`batchpilot.train.adaptive`) implement the same :class:`BatchSchedule` protocol: they
read each step's metrics record in :meth:`BatchSchedule.observe` (gradient-noise fields added by a
:class:`~batchpilot.train.hooks.TrainHook` land there), keep what they learn in ``state_dict`` for
checkpoints, return ``None`` from ``planned_batches`` and should round to
``Progress.batch_multiple_sequences``. Every rank calls ``observe`` with its own copy of the record:
decide only from fields that are equal on all ranks (``loss``, ``grad_norm``, ``tokens``, hook fields
that were all-reduced), never from ``tokens_per_s``/``peak_memory_bytes``/``elapsed_s``, or ranks
will disagree about the next global batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from batchpilot.errors import BatchpilotError


class ScheduleError(BatchpilotError):
    """A batch schedule that cannot be parsed or cannot be run with this micro-batch and world size."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Progress:
    """Where training stands before the next optimizer step."""

    step: int
    """Optimizer steps completed."""
    sequences_seen: int
    """Sequences (rows) consumed so far."""
    tokens_seen: int
    """Input tokens consumed so far (padding excluded)."""
    batch_multiple_sequences: int = 1
    """Every global batch must be a multiple of this (micro × dp, or dp for token-budget batching)."""


@runtime_checkable
class BatchSchedule(Protocol):
    """A global-batch schedule: the global batch (sequences) for the next step."""

    def global_batch(self, progress: Progress) -> int:
        """Sequences in the next global batch; a positive multiple of ``progress.batch_multiple_sequences``."""
        ...

    def observe(self, record: Mapping[str, Any]) -> None:
        """Called after every optimizer step with its ``metrics.jsonl`` record (adaptive schedules learn here)."""

    def planned_batches(self) -> list[int] | None:
        """Every global batch this schedule can produce (checked up front), or None when adaptive."""
        ...

    def describe(self) -> str:
        """One line for logs and ``summary.json``."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Serialisable state for checkpoints."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; a stateless schedule checks it is the same schedule."""


class _Stateless:
    """Shared plumbing of schedules that are pure functions of :class:`Progress`."""

    def observe(self, record: Mapping[str, Any]) -> None:
        return None

    def describe(self) -> str:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.describe()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state.get("schedule")
        if saved != self.describe():
            raise ScheduleError(
                f"the checkpoint was written with batch schedule {saved!r}, this run asks for "
                f"{self.describe()!r}; resume with the same --batch-schedule and --global-batch"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class ConstantSchedule(_Stateless):
    """The same global batch every step (LLaMA, Llama 2, DeepSeek LLM)."""

    global_batch_sequences: int
    """Sequences per step."""

    def global_batch(self, progress: Progress) -> int:
        return self.global_batch_sequences

    def planned_batches(self) -> list[int]:
        return [self.global_batch_sequences]

    def describe(self) -> str:
        return f"constant:{self.global_batch_sequences}"


@dataclass(frozen=True, kw_only=True, slots=True)
class LinearRampSchedule(_Stateless):
    """GPT-3 / Megatron-LM batch ramp-up, counted in tokens.

    Megatron-LM ``RampupBatchsizeNumMicroBatchesCalculator``
    (megatron/core/num_microbatches_calculator.py): with ``n = (final − start) / increment``
    increments spread evenly over the ramp, the batch after ``c`` consumed units is
    ``start + increment × floor(c / (ramp / n))``, and ``final`` once ``c > ramp``. Megatron counts
    samples; GPT-3 (Brown et al. 2020, App. B) states the ramp in tokens, which is what ``c`` is here.
    """

    start_sequences: int
    """First global batch."""
    increment_sequences: int
    """Step between successive batch sizes."""
    final_sequences: int
    """Batch after the ramp (``--global-batch``)."""
    ramp_tokens: int
    """Tokens over which the batch grows from start to final."""

    def __post_init__(self) -> None:
        span = self.final_sequences - self.start_sequences
        if self.start_sequences < 1 or self.increment_sequences < 1 or span < 0:
            raise ScheduleError(
                f"ramp start {self.start_sequences}, increment {self.increment_sequences}, final "
                f"{self.final_sequences}: need 1 ≤ start ≤ final and increment ≥ 1"
            )
        if span % self.increment_sequences:
            raise ScheduleError(
                f"ramp from {self.start_sequences} to {self.final_sequences} is not a whole number of "
                f"increments of {self.increment_sequences}; pick an increment that divides {span}"
            )

    @property
    def num_increments(self) -> int:
        return (self.final_sequences - self.start_sequences) // self.increment_sequences

    def global_batch(self, progress: Progress) -> int:
        if self.num_increments == 0 or progress.tokens_seen > self.ramp_tokens:
            return self.final_sequences
        tokens_per_increment = self.ramp_tokens / self.num_increments
        done = int(progress.tokens_seen / tokens_per_increment)
        return min(self.final_sequences, self.start_sequences + self.increment_sequences * done)

    def planned_batches(self) -> list[int]:
        return list(range(self.start_sequences, self.final_sequences + 1, self.increment_sequences))

    def describe(self) -> str:
        return (f"ramp:start={self.start_sequences},increment={self.increment_sequences},"
                f"final={self.final_sequences},over={self.ramp_tokens}")


@dataclass(frozen=True, kw_only=True, slots=True)
class StagedSchedule(_Stateless):
    """Piecewise-constant batch by tokens consumed (Llama 3 405B §3.4.1; DeepSeek-V3 §4.2 as stages)."""

    stages: tuple[tuple[int, int], ...]
    """``(from_tokens, global_batch_sequences)`` pairs, ``from_tokens`` strictly increasing, first 0."""

    def __post_init__(self) -> None:
        starts = [s for s, _ in self.stages]
        if not starts or starts[0] != 0:
            raise ScheduleError(f"staged batch schedule must start at 0 tokens, got stages from {starts}")
        if any(b <= a for a, b in itertools.pairwise(starts)):
            raise ScheduleError(f"staged batch schedule thresholds {starts} must be strictly increasing")

    def global_batch(self, progress: Progress) -> int:
        current = self.stages[0][1]
        for from_tokens, batch in self.stages:
            if progress.tokens_seen >= from_tokens:
                current = batch
        return current

    def planned_batches(self) -> list[int]:
        return sorted({b for _, b in self.stages})

    def describe(self) -> str:
        return "steps:" + ",".join(f"{t}={b}" for t, b in self.stages)


def check_schedule(schedule: BatchSchedule, batch_multiple_sequences: int) -> None:
    """Every planned global batch must be a multiple of ``micro × dp`` (or ``dp``): fail before training."""
    for batch in schedule.planned_batches() or []:
        if batch % batch_multiple_sequences:
            raise ScheduleError(
                f"batch schedule {schedule.describe()!r} asks for a global batch of {batch} sequences, "
                f"not a multiple of micro × dp = {batch_multiple_sequences}; change the schedule or "
                f"--micro-batch"
            )
