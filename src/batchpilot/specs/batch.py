"""The batch-size triad: ``global = micro × accum × dp``, in sequences and tokens.

This module is the ONE place that owns the relation between the global batch, the micro-batch, the
gradient-accumulation steps and the data-parallel ranks, and the conversion between a batch counted
in sequences and one counted in tokens (``tokens = sequences × seq_len``). The planner, the runner
and the CLI all go through it, so the error messages (and their suggested fixes) are the same
everywhere.

Examples::

    >>> t = BatchTriad.from_global(global_batch_sequences=96, micro_batch_sequences=4,
    ...                            data_parallel_ranks=8, seq_len_tokens=2048)
    >>> t.grad_accum_steps, t.global_batch_tokens
    (3, 196608)
    >>> sequences_from_tokens(4 * 2**20, seq_len_tokens=4096)   # Llama 2: 4Mi tokens of 4096
    1024

The error wording follows torchtitan's ``parallel_dims.py:_validate``: values, rule and a fix, e.g.
``global batch 100 != micro 4 × accum 4 × dp 8 = 128; use --grad-accum 3 or --global-batch 96``.
"""

from __future__ import annotations

from dataclasses import dataclass

from batchpilot.errors import BatchpilotError, SpecError

MAX_SEQ_LEN_TOKENS = 2**24
"""Longest sequence accepted (16Mi tokens): above the longest context of a released model (Llama 4 Scout,
10M tokens, Meta 2025), so no real length is refused, while ``--seq-len 10^20`` is refused in one line instead of an estimate of
10^18 GiB."""

MAX_BATCH_SEQUENCES = 2**31
"""Most sequences in a global batch, micro-batch or accumulation: ~10^5 × the largest published global
batches (DeepSeek-V3: 15 360 sequences), so no real batch is refused, while absurd targets
(``--seq-len 1 --global-batch-tokens 2^62``) are refused in one line instead of producing plans with
10^18 accumulation steps."""


class BatchError(BatchpilotError):
    """A batch triad that does not multiply out, or a token count that is not whole sequences."""


def _positive(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BatchError(f"{what} must be a positive whole number, got {value!r}")
    return value


def check_seq_len(seq_len: int, flag: str = "--seq-len") -> int:
    """``seq_len`` if it is a whole number in [1, :data:`MAX_SEQ_LEN_TOKENS`]; one-line error otherwise."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise SpecError(f"{flag} {seq_len!r} must be a positive integer")
    if seq_len > MAX_SEQ_LEN_TOKENS:
        raise SpecError(f"{flag} {seq_len} is above the limit of 2^24 = {MAX_SEQ_LEN_TOKENS} tokens per sequence; "
                        f"use a real context length")
    return seq_len


def _nearest_multiples(value: int, unit: int) -> list[int]:
    """The multiples of ``unit`` just below and just above ``value`` (positive, distinct)."""
    below = (value // unit) * unit
    return [m for m in (below, below + unit) if m > 0 and m != value]


def _or_list(options: list[str]) -> str:
    return " or ".join(options)


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchTriad:
    """A consistent global batch: ``global_batch_sequences = micro × accum × dp`` (checked on creation)."""

    micro_batch_sequences: int
    """Sequences per micro-batch on one rank (one forward/backward)."""
    grad_accum_steps: int
    """Micro-steps accumulated per optimizer step on each rank."""
    data_parallel_ranks: int
    """Data-parallel replicas (DDP ranks or FSDP shards of the batch dimension)."""
    seq_len_tokens: int
    """Tokens per sequence (the context length the batch is counted in)."""

    def __post_init__(self) -> None:
        _positive(self.micro_batch_sequences, "micro-batch")
        _positive(self.grad_accum_steps, "gradient-accumulation steps")
        _positive(self.data_parallel_ranks, "data-parallel ranks")
        _positive(self.seq_len_tokens, "sequence length")

    @property
    def global_batch_sequences(self) -> int:
        """``micro × accum × dp`` sequences per optimizer step."""
        return self.micro_batch_sequences * self.grad_accum_steps * self.data_parallel_ranks

    @property
    def global_batch_tokens(self) -> int:
        """``global_batch_sequences × seq_len`` tokens per optimizer step."""
        return tokens_from_sequences(self.global_batch_sequences, seq_len_tokens=self.seq_len_tokens)

    @property
    def micro_batch_tokens(self) -> int:
        """Tokens per micro-batch on one rank."""
        return tokens_from_sequences(self.micro_batch_sequences, seq_len_tokens=self.seq_len_tokens)

    @property
    def local_batch_sequences(self) -> int:
        """Sequences one rank processes per optimizer step (``micro × accum``)."""
        return self.micro_batch_sequences * self.grad_accum_steps

    def with_global(self, global_batch_sequences: int) -> BatchTriad:
        """The same micro-batch and ranks at another global batch (accumulation re-derived)."""
        return BatchTriad.from_global(
            global_batch_sequences=global_batch_sequences,
            micro_batch_sequences=self.micro_batch_sequences,
            data_parallel_ranks=self.data_parallel_ranks,
            seq_len_tokens=self.seq_len_tokens,
        )

    def to_dict(self) -> dict[str, int]:
        """Stable JSON keys."""
        return {
            "global_batch_sequences": self.global_batch_sequences,
            "global_batch_tokens": self.global_batch_tokens,
            "micro_batch_sequences": self.micro_batch_sequences,
            "grad_accum_steps": self.grad_accum_steps,
            "data_parallel_ranks": self.data_parallel_ranks,
            "seq_len_tokens": self.seq_len_tokens,
        }

    @classmethod
    def from_global(
        cls, *, global_batch_sequences: int, micro_batch_sequences: int, data_parallel_ranks: int,
        seq_len_tokens: int,
    ) -> BatchTriad:
        """Derive ``accum = global / (micro × dp)``; a remainder is an error naming the nearest fixes."""
        g = _positive(global_batch_sequences, "global batch")
        m = _positive(micro_batch_sequences, "micro-batch")
        dp = _positive(data_parallel_ranks, "data-parallel ranks")
        per_step = m * dp
        if g % per_step:
            fixes = [f"--global-batch {v}" for v in _nearest_multiples(g, per_step)]
            micro_fixes = [d for d in range(m, 0, -1) if g % (d * dp) == 0][:1]
            fixes += [f"--micro-batch {d}" for d in micro_fixes]
            raise BatchError(
                f"global batch {g} is not divisible by micro {m} × dp {dp} = {per_step}; "
                f"use {_or_list(fixes)}"
            )
        return cls(micro_batch_sequences=m, grad_accum_steps=g // per_step, data_parallel_ranks=dp,
                   seq_len_tokens=seq_len_tokens)

    @classmethod
    def checked(
        cls, *, global_batch_sequences: int, micro_batch_sequences: int, grad_accum_steps: int,
        data_parallel_ranks: int, seq_len_tokens: int,
    ) -> BatchTriad:
        """All four given: they must multiply out, else the error names an accum and a global that do."""
        g = _positive(global_batch_sequences, "global batch")
        triad = cls(micro_batch_sequences=micro_batch_sequences, grad_accum_steps=grad_accum_steps,
                    data_parallel_ranks=data_parallel_ranks, seq_len_tokens=seq_len_tokens)
        if triad.global_batch_sequences != g:
            m, a, dp = micro_batch_sequences, grad_accum_steps, data_parallel_ranks
            per_step = m * dp
            accum = max(1, g // per_step)
            other_global = triad.global_batch_sequences if g % per_step == 0 else accum * per_step
            raise BatchError(
                f"global batch {g} != micro {m} × accum {a} × dp {dp} = {triad.global_batch_sequences}; "
                f"use --grad-accum {accum} or --global-batch {other_global}"
            )
        return triad


def tokens_from_sequences(sequences: int, *, seq_len_tokens: int) -> int:
    """``sequences × seq_len`` tokens."""
    return _positive(sequences, "sequences") * _positive(seq_len_tokens, "sequence length")


def sequences_from_tokens(tokens: int, *, seq_len_tokens: int, what: str = "global batch") -> int:
    """``tokens / seq_len`` sequences; a token count that is not whole sequences is an error with fixes."""
    t = _positive(tokens, f"{what} tokens")
    s = _positive(seq_len_tokens, "sequence length")
    if t % s:
        fixes = [f"{v} tokens" for v in _nearest_multiples(t, s)]
        raise BatchError(
            f"{what} {t} tokens is not a whole number of {s}-token sequences; use {_or_list(fixes)}"
        )
    return t // s
