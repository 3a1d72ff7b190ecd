"""The one function that owns ``global = micro × accum × dp`` and tokens ↔ sequences."""

from __future__ import annotations

import pytest

from batchpilot.errors import BatchpilotError
from batchpilot.specs.batch import BatchError, BatchTriad, sequences_from_tokens, tokens_from_sequences


def test_from_global_derives_accumulation() -> None:
    t = BatchTriad.from_global(global_batch_sequences=96, micro_batch_sequences=4, data_parallel_ranks=8,
                               seq_len_tokens=2048)
    assert (t.grad_accum_steps, t.global_batch_sequences) == (3, 96)
    assert t.global_batch_tokens == 96 * 2048
    assert t.micro_batch_tokens == 4 * 2048
    assert t.local_batch_sequences == 12
    assert t.to_dict()["grad_accum_steps"] == 3


def test_with_global_keeps_micro_and_ranks() -> None:
    t = BatchTriad.from_global(global_batch_sequences=32, micro_batch_sequences=4, data_parallel_ranks=2,
                               seq_len_tokens=128)
    bigger = t.with_global(64)
    assert (bigger.micro_batch_sequences, bigger.data_parallel_ranks, bigger.grad_accum_steps) == (4, 2, 8)


def test_not_divisible_names_the_fixes() -> None:
    with pytest.raises(BatchError) as info:
        BatchTriad.from_global(global_batch_sequences=100, micro_batch_sequences=4, data_parallel_ranks=8,
                               seq_len_tokens=16)
    message = str(info.value)
    assert "100" in message and "micro 4 × dp 8 = 32" in message
    assert "--global-batch 96 or --global-batch 128" in message
    assert "--micro-batch" not in message  # 100 is not a multiple of dp 8: no micro-batch fixes it
    assert isinstance(info.value, BatchpilotError) and "\n" not in message
    with pytest.raises(BatchError, match=r"use --global-batch 32 or --global-batch 64 or --micro-batch 3$"):
        BatchTriad.from_global(global_batch_sequences=48, micro_batch_sequences=4, data_parallel_ranks=8,
                               seq_len_tokens=16)


def test_checked_matches_the_style_guide_message() -> None:
    with pytest.raises(BatchError, match=r"global batch 100 != micro 4 × accum 4 × dp 8 = 128; "
                                         r"use --grad-accum 3 or --global-batch 96"):
        BatchTriad.checked(global_batch_sequences=100, micro_batch_sequences=4, grad_accum_steps=4,
                           data_parallel_ranks=8, seq_len_tokens=16)
    ok = BatchTriad.checked(global_batch_sequences=128, micro_batch_sequences=4, grad_accum_steps=4,
                            data_parallel_ranks=8, seq_len_tokens=16)
    assert ok.global_batch_sequences == 128


def test_tokens_and_sequences() -> None:
    # Llama 2: 4M-token batches of 4096-token sequences = 1024 sequences (Touvron et al. 2023b).
    assert sequences_from_tokens(4 * 2**20, seq_len_tokens=4096) == 1024
    assert tokens_from_sequences(1024, seq_len_tokens=4096) == 4 * 2**20
    with pytest.raises(BatchError, match="4000000 tokens is not a whole number of 4096-token sequences; "
                                         "use 3997696 tokens or 4001792 tokens"):
        sequences_from_tokens(4_000_000, seq_len_tokens=4096)


@pytest.mark.parametrize("bad", [0, -1, True, 2.0])
def test_rejects_non_positive(bad: object) -> None:
    with pytest.raises(BatchError):
        BatchTriad(micro_batch_sequences=bad, grad_accum_steps=1, data_parallel_ranks=1,  # type: ignore[arg-type]
                   seq_len_tokens=8)
