"""Global-batch schedules: the exact batch at every step."""

from __future__ import annotations

import pytest

from batchpilot.train.schedule import (
    ConstantSchedule,
    LinearRampSchedule,
    Progress,
    ScheduleError,
    StagedSchedule,
    check_schedule,
)
from batchpilot.train.schedule_syntax import parse_batch_schedule


def _simulate(schedule: object, steps: int, seq_len: int) -> list[int]:
    """Batches per step when every sequence is a full ``seq_len`` row (tokens_seen = sequences × seq_len)."""
    batches, seqs = [], 0
    for step in range(steps):
        b = schedule.global_batch(Progress(step=step, sequences_seen=seqs, tokens_seen=seqs * seq_len))  # type: ignore[attr-defined]
        batches.append(b)
        seqs += b
    return batches


def test_constant() -> None:
    s = parse_batch_schedule("constant", global_batch_sequences=16, seq_len_tokens=8)
    assert isinstance(s, ConstantSchedule)
    assert _simulate(s, 4, 8) == [16, 16, 16, 16]


def test_linear_ramp_matches_megatron_formula_step_by_step() -> None:
    # start 2, +2, final 8, ramp over 300 tokens: 3 increments, one per 100 tokens (Megatron
    # RampupBatchsizeNumMicroBatchesCalculator). With 10-token rows: 5 steps of 2 reach 100 tokens,
    # 3 steps of 4 reach 220, 2 steps of 6 reach 340 > 300 → 8 from then on.
    s = parse_batch_schedule("ramp:start=2,increment=2,over=300", global_batch_sequences=8, seq_len_tokens=10)
    assert isinstance(s, LinearRampSchedule)
    assert _simulate(s, 13, 10) == [2, 2, 2, 2, 2, 4, 4, 4, 6, 6, 8, 8, 8]
    assert s.planned_batches() == [2, 4, 6, 8]


def test_ramp_in_tokens_converts_through_seq_len() -> None:
    s = parse_batch_schedule("ramp-tokens:start=64,increment=64,over=1K", global_batch_sequences=16,
                             seq_len_tokens=16)
    assert s.planned_batches() == [4, 8, 12, 16]
    with pytest.raises(ScheduleError, match="not a whole number of increments"):
        parse_batch_schedule("ramp:start=2,increment=4,over=10", global_batch_sequences=8, seq_len_tokens=8)


def test_staged_deepseek_v3_style() -> None:
    s = parse_batch_schedule("steps:0=1536,469B=15360", global_batch_sequences=15360, seq_len_tokens=4096)
    assert isinstance(s, StagedSchedule)
    assert s.global_batch(Progress(step=0, sequences_seen=0, tokens_seen=0)) == 1536
    assert s.global_batch(Progress(step=9, sequences_seen=1, tokens_seen=469 * 10**9 - 1)) == 1536
    assert s.global_batch(Progress(step=9, sequences_seen=1, tokens_seen=469 * 10**9)) == 15360


def test_staged_llama3_in_tokens_and_exact_steps() -> None:
    s = parse_batch_schedule("steps-tokens:0=4Mi,252M=8Mi,2.87T=16Mi", global_batch_sequences=1,
                             seq_len_tokens=4096)
    assert s.planned_batches() == [1024, 2048, 4096]
    small = parse_batch_schedule("steps:0=2,40=4,100=8", global_batch_sequences=8, seq_len_tokens=10)
    # tokens 0,20 → 2; 40,80 → 4; 120, 200 → 8
    assert _simulate(small, 6, 10) == [2, 2, 4, 4, 8, 8]


def test_check_schedule_and_state() -> None:
    s = parse_batch_schedule("steps:0=6,100=8", global_batch_sequences=8, seq_len_tokens=10)
    with pytest.raises(ScheduleError, match="global batch of 6 sequences, not a multiple of micro × dp = 4"):
        check_schedule(s, 4)
    check_schedule(s, 2)
    s.load_state_dict(s.state_dict())
    other = parse_batch_schedule("constant", global_batch_sequences=8, seq_len_tokens=10)
    with pytest.raises(ScheduleError, match="resume with the same --batch-schedule"):
        other.load_state_dict(s.state_dict())


@pytest.mark.parametrize("text", ["linear", "ramp:start=2", "steps:5=2", "steps:0=2,0=4", "steps:0"])
def test_bad_schedules(text: str) -> None:
    with pytest.raises(ScheduleError):
        parse_batch_schedule(text, global_batch_sequences=8, seq_len_tokens=8)
