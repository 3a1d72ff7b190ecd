"""Batching: which tokens form each global batch, and how it is cut into per-rank micro-batches.

Three modes (``--batching``):

- ``fixed``: every document is cut into pieces of at most ``seq_len`` tokens ("samples"); a micro-batch
  is ``micro`` samples right-padded to ``seq_len``.
- ``token-budget``: the same samples; inside a global batch they are sorted by length and packed into
  micro-batches whose padded size ``rows × longest`` stays within ``--max-tokens-per-micro-batch``
  (length bucketing as in fairseq's ``--max-tokens``); the rank with the most micro-batches sets the
  accumulation steps, the others split their largest micro-batches to match (DDP needs the same
  number of backward passes on every rank).
- ``packed``: documents are concatenated (in the epoch's shuffled order) and cut into full
  ``seq_len`` rows; position ids restart at every document and attention never crosses a document
  boundary (variable-length attention, or a block-diagonal causal mask).

The global-batch sequence depends only on the data, the seed and the global batch: row ``i`` of the
infinite stream belongs to epoch ``i // rows_per_epoch`` whose order is
``numpy.random.default_rng([seed, epoch]).permutation``; a step takes the next ``G`` rows. Micro-batch
size and world size only change how those rows are laid out, never which rows they are.

A row's target tokens are the tokens that have a next token in the same segment (the last token of a
segment predicts nothing), so the loss never reaches across documents.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from batchpilot.errors import BatchpilotError
from batchpilot.train.config import BATCHING_MODES, BatchingMode
from batchpilot.train.data import TokenizedCorpus

__all__ = ["BATCHING_MODES", "BatchingMode", "MicroBatch", "Row", "RowStream", "collate", "layout_step"]
IGNORE_INDEX = -100
"""Label value excluded from the loss (``torch.nn.functional.cross_entropy`` default)."""
PAD_ID = 0
"""Input id written into padding positions (never a target, masked from attention)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Row:
    """One sequence of a global batch: token ranges of the flat corpus array, one per document piece."""

    index: int
    """Position in the infinite row stream (epoch × rows_per_epoch + position in epoch)."""
    segments: tuple[tuple[int, int], ...]
    """``(start, end)`` ranges into ``TokenizedCorpus.tokens``; one for fixed/token-budget samples."""

    @property
    def length(self) -> int:
        return sum(end - start for start, end in self.segments)

    @property
    def target_tokens(self) -> int:
        return sum(max(0, end - start - 1) for start, end in self.segments)


class RowStream:
    """The deterministic, infinite stream of rows for one corpus, mode, sequence length and seed."""

    def __init__(self, corpus: TokenizedCorpus, *, mode: BatchingMode, seq_len: int, seed: int) -> None:
        if corpus.num_tokens == 0:
            raise BatchpilotError("the training split has no tokens; add data or lower the validation fraction")
        self.corpus, self.mode, self.seq_len, self.seed = corpus, mode, seq_len, seed
        if mode == "packed":
            self.rows_per_epoch = -(-corpus.num_tokens // seq_len)
        else:
            pieces = -(-corpus.lengths // seq_len)
            self._sample_doc = np.repeat(np.arange(corpus.num_documents), pieces)
            first = np.repeat(np.cumsum(pieces) - pieces, pieces)
            self._sample_start = corpus.offsets[self._sample_doc] + (np.arange(len(first)) - first) * seq_len
            self._sample_end = np.minimum(self._sample_start + seq_len, corpus.offsets[self._sample_doc + 1])
            self.rows_per_epoch = len(self._sample_start)
        self._epoch: int | None = None
        self._order = np.zeros(0, dtype=np.int64)
        self._cum = np.zeros(1, dtype=np.int64)

    def _epoch_order(self, epoch: int) -> None:
        if self._epoch == epoch:
            return
        count = self.corpus.num_documents if self.mode == "packed" else self.rows_per_epoch
        self._order = np.random.default_rng([self.seed, epoch]).permutation(count)
        if self.mode == "packed":
            self._cum = np.concatenate([[0], np.cumsum(self.corpus.lengths[self._order])])
        self._epoch = epoch

    def row(self, index: int) -> Row:
        epoch, position = divmod(index, self.rows_per_epoch)
        self._epoch_order(epoch)
        if self.mode != "packed":
            sample = int(self._order[position])
            return Row(index=index, segments=((int(self._sample_start[sample]), int(self._sample_end[sample])),))
        return Row(index=index, segments=self._packed_segments(position))

    def _packed_segments(self, position: int) -> tuple[tuple[int, int], ...]:
        lo, hi = position * self.seq_len, min((position + 1) * self.seq_len, int(self._cum[-1]))
        k = int(np.searchsorted(self._cum, lo, side="right")) - 1
        segments = []
        while k < len(self._order) and self._cum[k] < hi:
            doc, base = int(self._order[k]), int(self._cum[k])
            start = int(self.corpus.offsets[doc])
            segments.append((start + max(lo, base) - base, start + min(hi, int(self._cum[k + 1])) - base))
            k += 1
        return tuple(segments)

    def rows(self, start: int, count: int) -> list[Row]:
        """Rows ``start … start + count − 1`` of the stream."""
        return [self.row(i) for i in range(start, start + count)]


@dataclass(frozen=True, kw_only=True, slots=True)
class MicroBatchPlan:
    """The rows of one micro-batch on one rank and the length they are padded to."""

    rows: tuple[Row, ...]
    pad_to: int
    """Padded length of every row in this micro-batch (0 for an empty micro-batch)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class StepLayout:
    """One global batch laid out as ``per_rank[rank][micro_index]``; every rank has the same count."""

    per_rank: tuple[tuple[MicroBatchPlan, ...], ...]
    global_target_tokens: int
    """Loss denominator: target tokens across all micro-batches and ranks."""
    global_input_tokens: int
    """Real (non-padding) input tokens of the global batch."""
    global_padded_tokens: int
    """Tensor slots, ``Σ rows × pad_to`` (real + padding)."""
    num_rows: int

    @property
    def grad_accum_steps(self) -> int:
        return len(self.per_rank[0])

    @property
    def padding_fraction(self) -> float:
        """Padding slots / all slots of the global batch's tensors."""
        return 1.0 - self.global_input_tokens / self.global_padded_tokens if self.global_padded_tokens else 0.0

    def local_target_tokens(self, rank: int) -> int:
        return sum(r.target_tokens for mb in self.per_rank[rank] for r in mb.rows)


def _fixed_layout(rows: list[Row], *, dp: int, micro: int, pad_to: int) -> list[list[MicroBatchPlan]]:
    if len(rows) % (dp * micro):
        raise BatchpilotError(f"global batch {len(rows)} is not divisible by micro {micro} × dp {dp}")
    local = len(rows) // dp
    return [[MicroBatchPlan(rows=tuple(rows[r * local + i:r * local + i + micro]), pad_to=pad_to)
             for i in range(0, local, micro)] for r in range(dp)]


def _budget_micro_batches(rows: list[Row], budget_tokens: int) -> list[list[Row]]:
    """Greedy fill of length-sorted rows: a micro-batch grows while rows × longest ≤ budget."""
    ordered = sorted(rows, key=lambda r: (-r.length, r.index))
    batches: list[list[Row]] = []
    for row in ordered:
        if batches and (len(batches[-1]) + 1) * max(1, batches[-1][0].length) <= budget_tokens:
            batches[-1].append(row)
        else:
            batches.append([row])
    return batches


def _split_to(batches: list[list[Row]], count: int) -> list[list[Row]]:
    """Split the micro-batch with the most rows until there are ``count`` (empty ones if rows run out)."""
    batches = [list(b) for b in batches]
    while len(batches) < count:
        largest = max(range(len(batches)), key=lambda i: len(batches[i])) if batches else -1
        if largest < 0 or len(batches[largest]) < 2:
            batches.append([])
            continue
        half = len(batches[largest]) // 2
        batches[largest:largest + 1] = [batches[largest][:half], batches[largest][half:]]
    return batches


def _token_budget_layout(rows: list[Row], *, dp: int, budget_tokens: int) -> list[list[MicroBatchPlan]]:
    # Longest-processing-time assignment of rows to ranks balances tokens per rank.
    per_rank: list[list[Row]] = [[] for _ in range(dp)]
    load = [0] * dp
    for row in sorted(rows, key=lambda r: (-r.length, r.index)):
        rank = min(range(dp), key=lambda i: (load[i], i))
        per_rank[rank].append(row)
        load[rank] += row.length
    batches = [_budget_micro_batches(r, budget_tokens) for r in per_rank]
    accum = max(len(b) for b in batches)
    return [[MicroBatchPlan(rows=tuple(mb), pad_to=max((r.length for r in mb), default=0))
             for mb in _split_to(b, accum)] for b in batches]


def layout_step(
    rows: list[Row], *, mode: BatchingMode, dp: int, micro_batch_sequences: int, seq_len: int,
    max_tokens_per_micro_batch: int,
) -> StepLayout:
    """Lay one global batch out over ``dp`` ranks and their micro-batches (see the module docstring)."""
    if mode == "token-budget":
        per_rank = _token_budget_layout(rows, dp=dp, budget_tokens=max_tokens_per_micro_batch)
    else:
        per_rank = _fixed_layout(rows, dp=dp, micro=micro_batch_sequences, pad_to=seq_len)
    padded = sum(len(mb.rows) * mb.pad_to for r in per_rank for mb in r)
    return StepLayout(
        per_rank=tuple(tuple(r) for r in per_rank),
        global_target_tokens=sum(r.target_tokens for r in rows),
        global_input_tokens=sum(r.length for r in rows),
        global_padded_tokens=padded,
        num_rows=len(rows),
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class MicroBatch:
    """Tensors of one micro-batch, ready for the model."""

    input_ids: torch.Tensor
    """``(rows, pad_to)`` int64."""
    targets: torch.Tensor
    """``(rows, pad_to)`` int64 next-token ids, ``IGNORE_INDEX`` where nothing is predicted."""
    attention_mask: torch.Tensor | None
    """2-D padding mask (fixed/token-budget), 4-D block-diagonal causal bool mask (packed), or None
    (packed with variable-length attention: documents are told apart by ``position_ids``)."""
    position_ids: torch.Tensor | None
    """Per-document positions (packed), else None (the model counts from 0)."""
    num_targets: int
    num_input_tokens: int


def block_causal_mask(segment_ids: np.ndarray) -> torch.Tensor:
    """``(rows, 1, L, L)`` bool: query i may attend key j iff j ≤ i and both are in the same segment.

    Padding positions (segment −1) attend only to themselves so that no softmax row is empty.
    """
    seg = torch.from_numpy(segment_ids)
    same = seg[:, :, None] == seg[:, None, :]
    length = seg.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    eye = torch.eye(length, dtype=torch.bool)
    mask = (same & causal & (seg[:, :, None] >= 0)) | eye
    return mask[:, None, :, :]


def collate(plan: MicroBatchPlan, tokens: np.ndarray, *, mode: BatchingMode, varlen: bool = False) -> MicroBatch:
    """Build the tensors of ``plan`` from the flat corpus ``tokens``.

    An empty plan becomes one padding token with no target: the rank still runs a forward/backward
    (a zero gradient), which keeps DDP/FSDP collectives in step across ranks.
    """
    rows, length = max(len(plan.rows), 1), max(plan.pad_to, 1)
    ids = np.full((rows, length), PAD_ID, dtype=np.int64)
    targets = np.full((rows, length), IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros((rows, length), dtype=np.int64)
    segment = np.full((rows, length), -1, dtype=np.int64)
    for i, row in enumerate(plan.rows):
        col = 0
        for s, (start, end) in enumerate(row.segments):
            n = end - start
            piece = tokens[start:end]
            ids[i, col:col + n] = piece
            targets[i, col:col + n - 1] = piece[1:]
            positions[i, col:col + n] = np.arange(n)
            segment[i, col:col + n] = s
            col += n
    num_inputs = int((segment >= 0).sum())
    if mode == "packed":
        mask = None if varlen else block_causal_mask(segment)
        pos: torch.Tensor | None = torch.from_numpy(positions)
    else:
        mask, pos = torch.from_numpy((segment >= 0).astype(np.int64)), None
    return MicroBatch(
        input_ids=torch.from_numpy(ids), targets=torch.from_numpy(targets), attention_mask=mask,
        position_ids=pos, num_targets=int((targets != IGNORE_INDEX).sum()), num_input_tokens=num_inputs,
    )
