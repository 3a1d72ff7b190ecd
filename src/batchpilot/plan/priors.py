"""Scaling-law priors for the global batch size and learning rate, before anything is measured.

- DeepSeek LLM (DeepSeek-AI 2024, arXiv:2401.02954, §3.1, Fig. 3; §3.2 for M): the compute-optimal
  batch and learning rate as power laws of the compute budget C = M·D::

      B_opt = 0.2920 · C^0.3271   tokens
      η_opt = 0.3118 · C^−0.1250
      M     = 72·n_layer·d_model² + 12·n_layer·d_model·l_seq   (non-embedding FLOPs per token,
                                                              attention included)

  Known error: fitted on DeepSeek's own data, tokenizer and AdamW recipe (β = 0.9/0.95, weight decay
  0.1, multi-step schedule), for C in about 1e17–3e20 FLOPs and extrapolated by the authors to their 7B
  and 67B runs. Their published choices (7B: 2304 × 4096 = 9.44M tokens, lr 4.2e-4; 67B: 4608 × 4096 =
  18.9M tokens, lr 3.2e-4, both on D = 2T tokens; paper Table 2) are within 3% (7B) and 10% (67B) of
  the formula's B_opt and within 3% of its η_opt (tests/convergence/test_priors.py). The paper also
  shows a wide near-optimal band around the fit, so treat it as a prior, not a requirement.

- Kaplan et al. 2020 (arXiv:2001.08361, Eq. 5.1 and Table 5): the critical batch as a function of the
  loss, ``B_crit(L) = B* / L^(1/α_B)`` with B* ≈ 2.1e8 tokens and α_B ≈ 0.21, L in nats per token.
  Known error: fitted on WebText2 with GPT-2's tokenizer; L from another tokenizer or data set is not
  comparable, so it is a rough order-of-magnitude prior. It reproduces the qualitative law that the
  critical batch grows as the loss falls (McCandlish et al. 2018).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from batchpilot.errors import BatchpilotError
from batchpilot.records.noise import NoiseRecord

DEEPSEEK_B_COEF = 0.2920
"""DeepSeek LLM §3.1: B_opt = 0.2920 · C^0.3271 (tokens)."""
DEEPSEEK_B_EXP = 0.3271
DEEPSEEK_LR_COEF = 0.3118
"""DeepSeek LLM §3.1: η_opt = 0.3118 · C^−0.1250."""
DEEPSEEK_LR_EXP = -0.1250
KAPLAN_B_STAR_TOKENS = 2.1e8
"""Kaplan et al. 2020, Table 5: B* ≈ 2.1e8 tokens."""
KAPLAN_ALPHA_B = 0.21
"""Kaplan et al. 2020, Table 5: α_B ≈ 0.21."""


def deepseek_flops_per_token(*, num_layers: int, hidden_size: int, seq_len: int) -> float:
    """M = 72·n_layer·d_model² + 12·n_layer·d_model·l_seq (DeepSeek LLM §3.2, non-embedding FLOPs/token)."""
    for name, value in (("num_layers", num_layers), ("hidden_size", hidden_size), ("seq_len", seq_len)):
        if value < 1:
            raise BatchpilotError(f"{name} must be >= 1 for the DeepSeek prior, got {value}")
    return 72.0 * num_layers * hidden_size**2 + 12.0 * num_layers * hidden_size * seq_len


def deepseek_batch_tokens(compute_flops: float) -> float:
    """B_opt(C) = 0.2920 · C^0.3271 tokens (DeepSeek LLM §3.1)."""
    _check_compute(compute_flops)
    return DEEPSEEK_B_COEF * compute_flops**DEEPSEEK_B_EXP


def deepseek_learning_rate(compute_flops: float) -> float:
    """η_opt(C) = 0.3118 · C^−0.1250 (DeepSeek LLM §3.1)."""
    _check_compute(compute_flops)
    return DEEPSEEK_LR_COEF * compute_flops**DEEPSEEK_LR_EXP


def kaplan_critical_batch_tokens(loss_nats: float) -> float:
    """B_crit(L) = B*/L^(1/α_B), B* = 2.1e8 tokens, α_B = 0.21 (Kaplan et al. 2020, Eq. 5.1, Table 5)."""
    if not (math.isfinite(loss_nats) and loss_nats > 0):
        raise BatchpilotError(f"loss must be a positive number of nats per token, got {loss_nats}")
    return KAPLAN_B_STAR_TOKENS / loss_nats ** (1.0 / KAPLAN_ALPHA_B)


def _check_compute(compute_flops: float) -> None:
    if not (math.isfinite(compute_flops) and compute_flops > 0):
        raise BatchpilotError(f"compute budget must be positive FLOPs, got {compute_flops}")


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchSuggestion:
    """A global batch (and, where the source gives one, a learning rate) suggested by a prior or a measurement."""

    source: str
    """``deepseek-llm-2024`` or ``measured-noise-scale``."""
    batch_tokens: float
    """Suggested global batch in tokens, before rounding."""
    batch_sequences: int
    """Suggested global batch in sequences, rounded to the nearest multiple of ``multiple_of`` (at least one)."""
    learning_rate: float | None
    """Suggested peak learning rate (DeepSeek prior only; None where the source gives none)."""
    compute_flops: float | None
    """C = M·D for the prior; None for a measurement."""
    flops_per_token: float | None
    """M for the prior; None for a measurement."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record."""
        return {"source": self.source, "batch_tokens": self.batch_tokens, "batch_sequences": self.batch_sequences,
                "learning_rate": self.learning_rate, "compute_flops": self.compute_flops,
                "flops_per_token": self.flops_per_token}


def _round_sequences(batch_tokens: float, seq_len: int, multiple_of: int) -> int:
    if multiple_of < 1:
        raise BatchpilotError(f"multiple_of must be >= 1 (micro × dp), got {multiple_of}")
    steps = max(1, round(batch_tokens / seq_len / multiple_of))
    return steps * multiple_of


def global_batch_from_prior(*, num_layers: int, hidden_size: int, seq_len: int, train_tokens: float,
                            multiple_of: int = 1) -> BatchSuggestion:
    """The DeepSeek LLM prior for a model trained on ``train_tokens`` tokens at ``seq_len``.

    ``multiple_of`` (typically micro-batch × data-parallel ranks) rounds the sequence count so that the
    planner can derive whole accumulation steps.
    """
    if not (math.isfinite(train_tokens) and train_tokens >= 1):
        raise BatchpilotError(f"train tokens must be >= 1, got {train_tokens}; pass e.g. --train-tokens 2T")
    m = deepseek_flops_per_token(num_layers=num_layers, hidden_size=hidden_size, seq_len=seq_len)
    compute = m * train_tokens
    tokens = deepseek_batch_tokens(compute)
    return BatchSuggestion(source="deepseek-llm-2024", batch_tokens=tokens,
                           batch_sequences=_round_sequences(tokens, seq_len, multiple_of),
                           learning_rate=deepseek_learning_rate(compute), compute_flops=compute, flops_per_token=m)


def global_batch_from_noise(record: NoiseRecord, *, seq_len: int, multiple_of: int = 1,
                            where: str = "the noise record") -> BatchSuggestion:
    """B ≈ B_crit ≈ B_simple from a measured noise record: where steps and examples both cost 2× their minimum.

    McCandlish et al. 2018 §2.3: training at B = B_crit needs 2·S_min steps and 2·E_min examples, the
    balanced point of the steps/examples trade-off. Tokens are B_simple in sequences × ``seq_len``.
    """
    if not math.isfinite(record.b_simple_sequences) or record.b_simple_sequences <= 0:
        raise BatchpilotError(
            f"{where} has no finite B_simple ({record.b_simple_sequences}); the gradient was "
            "noise-dominated — measure over more steps (--steps) or later in training (from a checkpoint)")
    tokens = record.b_simple_sequences * seq_len
    return BatchSuggestion(source="measured-noise-scale", batch_tokens=tokens,
                           batch_sequences=_round_sequences(tokens, seq_len, multiple_of),
                           learning_rate=None, compute_flops=None, flops_per_token=None)
