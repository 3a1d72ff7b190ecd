"""Batching modes: every token once per epoch, deterministic order, budgets, document-separating masks."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from batchpilot.train.batching import (
    IGNORE_INDEX,
    MicroBatchPlan,
    RowStream,
    block_causal_mask,
    collate,
    layout_step,
)
from batchpilot.train.data import TokenizedCorpus

torch.set_num_threads(1)


def _corpus(lengths: list[int]) -> TokenizedCorpus:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    # token value = its own position modulo 2^16, so positions are identifiable in small corpora
    return TokenizedCorpus(tokens=np.arange(offsets[-1], dtype=np.int64), offsets=offsets)


LENGTHS = [5, 17, 1, 40, 8, 8, 23, 2, 64, 3]  # 171 tokens, mixed short/long documents


@pytest.mark.parametrize("mode", ["fixed", "token-budget", "packed"])
def test_every_token_exactly_once_per_epoch(mode: str) -> None:
    corpus = _corpus(LENGTHS)
    stream = RowStream(corpus, mode=mode, seq_len=16, seed=3)  # type: ignore[arg-type]
    rows = stream.rows(0, stream.rows_per_epoch)
    layout = layout_step(rows, mode=mode, dp=1 if mode != "token-budget" else 3,  # type: ignore[arg-type]
                         micro_batch_sequences=1, seq_len=16, max_tokens_per_micro_batch=32)
    seen: Counter[int] = Counter()
    for rank in layout.per_rank:
        for plan in rank:
            mb = collate(plan, corpus.tokens, mode=mode)  # type: ignore[arg-type]
            real = mb.input_ids[mb.attention_mask.bool()] if mode != "packed" else None
            if real is None:  # packed: real tokens are those on a segment (position ids or mask diagonal)
                seg_tokens = [corpus.tokens[s:e] for r in plan.rows for s, e in r.segments]
                real = torch.from_numpy(np.concatenate(seg_tokens))
            seen.update(real.tolist())
            assert plan.pad_to <= 16 and all(r.length <= 16 for r in plan.rows)
    assert seen == Counter(range(sum(LENGTHS)))
    assert layout.global_input_tokens == sum(LENGTHS)
    # the next epoch covers the corpus again, in another order
    again = stream.rows(stream.rows_per_epoch, stream.rows_per_epoch)
    covered = Counter(t for r in again for s, e in r.segments for t in range(s, e))
    assert covered == Counter(range(sum(LENGTHS)))
    assert [r.segments for r in again] != [r.segments for r in rows]


def test_packed_rows_are_full_and_targets_stay_inside_documents() -> None:
    corpus = _corpus(LENGTHS)
    stream = RowStream(corpus, mode="packed", seq_len=16, seed=0)
    assert stream.rows_per_epoch == -(-sum(LENGTHS) // 16)
    rows = stream.rows(0, stream.rows_per_epoch)
    assert all(r.length == 16 for r in rows[:-1]) and rows[-1].length == sum(LENGTHS) % 16
    mb = collate(MicroBatchPlan(rows=tuple(rows[:4]), pad_to=16), corpus.tokens, mode="packed")
    doc_of = np.searchsorted(corpus.offsets, np.arange(sum(LENGTHS)), side="right") - 1
    ids, tg = mb.input_ids.numpy(), mb.targets.numpy()
    valid = tg != IGNORE_INDEX
    # every target is the next corpus token and belongs to the same document as its input
    assert (tg[valid] == ids[valid] + 1).all()
    assert (doc_of[tg[valid]] == doc_of[ids[valid]]).all()
    assert mb.num_targets == sum(r.target_tokens for r in rows[:4])
    assert mb.position_ids is not None and mb.attention_mask is not None and mb.attention_mask.dim() == 4
    varlen = collate(MicroBatchPlan(rows=tuple(rows[:4]), pad_to=16), corpus.tokens, mode="packed", varlen=True)
    assert varlen.attention_mask is None and torch.equal(varlen.position_ids, mb.position_ids)
    starts = (varlen.position_ids == 0).sum().item()  # flash varlen derives cu_seqlens from these restarts
    assert starts == sum(len(r.segments) for r in rows[:4])


def test_global_batches_do_not_depend_on_layout() -> None:
    corpus = _corpus(LENGTHS * 4)
    a = RowStream(corpus, mode="fixed", seq_len=8, seed=7).rows(10, 12)
    b = RowStream(corpus, mode="fixed", seq_len=8, seed=7).rows(10, 12)
    c = RowStream(corpus, mode="fixed", seq_len=8, seed=8).rows(10, 12)
    assert a == b and a != c
    l1 = layout_step(a, mode="fixed", dp=1, micro_batch_sequences=12, seq_len=8, max_tokens_per_micro_batch=96)
    l2 = layout_step(a, mode="fixed", dp=2, micro_batch_sequences=3, seq_len=8, max_tokens_per_micro_batch=24)
    assert (l1.grad_accum_steps, l2.grad_accum_steps) == (1, 2)
    flat = lambda lay: sorted(r.index for rank in lay.per_rank for mb in rank for r in mb.rows)  # noqa: E731
    assert flat(l1) == flat(l2) == sorted(r.index for r in a)
    assert l1.global_target_tokens == l2.global_target_tokens


def test_token_budget_respects_budget_and_equalises_micro_steps() -> None:
    corpus = _corpus(LENGTHS * 3)
    rows = RowStream(corpus, mode="token-budget", seq_len=32, seed=1).rows(0, 24)
    layout = layout_step(rows, mode="token-budget", dp=2, micro_batch_sequences=1, seq_len=32,
                         max_tokens_per_micro_batch=64)
    assert len(layout.per_rank[0]) == len(layout.per_rank[1])
    for rank in layout.per_rank:
        for plan in rank:
            assert len(plan.rows) * plan.pad_to <= 64
    fixed = layout_step(rows, mode="fixed", dp=2, micro_batch_sequences=2, seq_len=32,
                        max_tokens_per_micro_batch=64)
    assert layout.padding_fraction < fixed.padding_fraction
    # fixed pads every row to seq_len: padding = 1 − real / (rows × seq_len)
    assert fixed.padding_fraction == pytest.approx(1 - sum(r.length for r in rows) / (24 * 32))


def test_block_causal_mask_separates_documents() -> None:
    seg = np.array([[0, 0, 1, 1, 1, -1]])
    mask = block_causal_mask(seg)[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_packed_model_output_equals_documents_run_alone() -> None:
    """With the block mask and reset positions, a packed document's logits equal those of it alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from batchpilot.specs.model import load_model

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(**dict(load_model("tiny-llama-1m").hf_config))
    model = AutoModelForCausalLM.from_config(cfg).eval()
    corpus = _corpus([7, 9])  # one packed row of 16 holds both documents
    row = RowStream(corpus, mode="packed", seq_len=16, seed=0).row(0)
    mb = collate(MicroBatchPlan(rows=(row,), pad_to=16), corpus.tokens, mode="packed")
    with torch.no_grad():
        packed = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                       position_ids=mb.position_ids).logits[0]
        col = 0
        for start, end in row.segments:
            alone = model(input_ids=torch.arange(start, end)[None]).logits[0]
            assert torch.allclose(packed[col:col + end - start], alone, atol=1e-5)
            col += end - start
        # without the mask the second document would see the first: the logits differ. (transformers
        # 5.24's sdpa path does not separate documents from position ids alone — hence the explicit
        # mask everywhere but flash-attention's variable-length kernels.)
        leaky = model(input_ids=mb.input_ids).logits[0]
        assert not torch.allclose(leaky[7:], packed[7:], atol=1e-3)


def test_token_budget_gives_every_rank_the_same_number_of_micro_steps() -> None:
    """One long row and many short ones on 2 ranks: the light rank splits, down to an empty micro-batch."""
    corpus = _corpus([16, 16, 2])  # rank 0 gets 16 + 2 (two micro-batches), rank 1 a single row
    rows = RowStream(corpus, mode="token-budget", seq_len=16, seed=0).rows(0, 3)
    layout = layout_step(rows, mode="token-budget", dp=2, micro_batch_sequences=1, seq_len=16,
                         max_tokens_per_micro_batch=16)
    assert [len(r) for r in layout.per_rank] == [2, 2]
    empty = [p for r in layout.per_rank for p in r if not p.rows]
    assert empty, "the layout should need an empty micro-batch here"
    mb = collate(empty[0], corpus.tokens, mode="token-budget")
    assert mb.num_targets == 0 and mb.input_ids.shape == (1, 1)  # a forward with no loss keeps DDP in step
