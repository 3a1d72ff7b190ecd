"""``--batch-schedule`` text → a :class:`~batchpilot.train.schedule.BatchSchedule`.

The syntax is documented in :mod:`batchpilot.train.schedule`; ``adaptive:…`` is parsed by
:func:`batchpilot.train.adaptive.parse_adaptive`.

    >>> parse_batch_schedule("ramp:start=32,increment=32,over=4B", global_batch_sequences=512,
    ...                      seq_len_tokens=2048).describe()
    'ramp:start=32,increment=32,final=512,over=4000000000'
"""

from __future__ import annotations

from batchpilot.specs.batch import sequences_from_tokens
from batchpilot.train.adaptive import parse_adaptive
from batchpilot.train.schedule import (
    BatchSchedule,
    ConstantSchedule,
    LinearRampSchedule,
    ScheduleError,
    StagedSchedule,
)
from batchpilot.units import parse_count


def _pairs(body: str, text: str) -> list[tuple[str, str]]:
    pairs = []
    for item in filter(None, (p.strip() for p in body.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ScheduleError(f"batch schedule {text!r}: {item!r} is not KEY=VALUE")
        pairs.append((key.strip(), value.strip()))
    return pairs


def _batch_value(value: str, in_tokens: bool, seq_len_tokens: int) -> int:
    count = parse_count(value, "batch-schedule value")
    return sequences_from_tokens(count, seq_len_tokens=seq_len_tokens, what="scheduled batch") if in_tokens else count


def parse_batch_schedule(text: str, *, global_batch_sequences: int, seq_len_tokens: int) -> BatchSchedule:
    """Parse ``--batch-schedule`` (see the module docstring); ``global_batch_sequences`` is the final batch."""
    kind, _, body = text.strip().partition(":")
    if kind == "adaptive":
        return parse_adaptive(body, global_batch_sequences=global_batch_sequences)
    if kind == "constant" and not body:
        return ConstantSchedule(global_batch_sequences=global_batch_sequences)
    if kind in ("ramp", "ramp-tokens"):
        fields = dict(_pairs(body, text))
        if set(fields) != {"start", "increment", "over"}:
            raise ScheduleError(f"batch schedule {text!r}: a ramp needs exactly start=, increment=, over=")
        in_tokens = kind == "ramp-tokens"
        return LinearRampSchedule(
            start_sequences=_batch_value(fields["start"], in_tokens, seq_len_tokens),
            increment_sequences=_batch_value(fields["increment"], in_tokens, seq_len_tokens),
            final_sequences=global_batch_sequences,
            ramp_tokens=parse_count(fields["over"], "ramp length (tokens)"),
        )
    if kind in ("steps", "steps-tokens"):
        in_tokens = kind == "steps-tokens"
        stages = tuple(
            (0 if key == "0" else parse_count(key, "stage start (tokens)"),
             _batch_value(value, in_tokens, seq_len_tokens))
            for key, value in _pairs(body, text)
        )
        return StagedSchedule(stages=stages)
    raise ScheduleError(
        f"unknown batch schedule {text!r}; use constant, ramp:start=S,increment=I,over=TOKENS, "
        f"steps:0=B0,TOKENS=B1 (or ramp-tokens:/steps-tokens: with batches in tokens)"
    )
