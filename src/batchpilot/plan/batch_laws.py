"""Published batch-size laws side by side: each with its formula, units, fitted range and citation.

    >>> from batchpilot.specs.model import load_model
    >>> rows = predict_all(law_inputs(load_model("deepseek-llm-7b"), train_tokens=2e12, seq_len=4096))
    >>> [(r.law, round(r.batch_tokens / 1e6, 1)) for r in rows]
    [('deepseek-llm-2024', 9.2), ('step-law-2025', 6.1), ('zhang-cbs-2024', 10.5), ('kaplan-2020', 7.3)]

The laws disagree because they answer different questions on different data (see each law's
``conditions``): DeepSeek LLM's and Step Law's are the *loss-optimal* batch at a fixed budget; Zhang et
al.'s and Kaplan et al.'s are *critical* batches (where more parallelism stops paying), with two different
definitions. ``benchmarks/results/batch_laws.md`` checks every law against the published runs of the
registry. Laws we cite but do not evaluate, because their fitted coefficients could not be read from a
primary source when this was written: Porian et al. 2024 (arXiv:2406.19146, optimal batch and LR as
power laws in N along their compute-optimal runs, AdamW β₂ tuned at small batches) and Bergsma et al.
2025 ("Power Lines", arXiv:2505.13738: optimal and critical batch both power laws in D, independent of
N, a D-exponent of about 0.47 for B_crit according to secondary summaries).

Units: batches in tokens; N non-embedding parameters (the active ones for a mixture of experts); D
training tokens; C = M·D FLOPs with M DeepSeek's non-embedding FLOPs per token (attention included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from batchpilot.errors import BatchpilotError
from batchpilot.plan.priors import (
    deepseek_batch_tokens,
    deepseek_flops_per_token,
    deepseek_learning_rate,
    kaplan_critical_batch_tokens,
)
from batchpilot.specs.model import ModelSpec

STEP_LAW_B_COEF, STEP_LAW_B_EXP = 0.58, 0.571
"""Li et al. 2025 (Step Law), B_opt = 0.58·D^0.571 tokens: the mean of the 1000 bootstrap fits released with the
paper (github.com/step-law/steplaw, data/1004_fitted_lr_bs_scaling_model_parameters.csv at commit 32a8f4c:
exp(mean intercept) = 0.5807, mean exponent 0.5709)."""
STEP_LAW_LR_COEF, STEP_LAW_LR_N_EXP, STEP_LAW_LR_D_EXP = 1.79, -0.713, 0.307
"""Li et al. 2025, η_opt = 1.79·N^−0.713·D^0.307 (same file: exp(0.5863) = 1.797, −0.7129, 0.3075)."""
ZHANG_CBS_COEF_SEQUENCES, ZHANG_CBS_EXP, ZHANG_SEQ_LEN, ZHANG_TOKENS_PER_PARAM = 93.197, 0.4683, 512, 20.0
"""Zhang et al. 2024, CBS = 93.197·(N/10⁶)^0.4683 sequences of 512 tokens on their Chinchilla runs (D = 20·N),
printed by their notebook (github.com/hlzhang109/critical-batch-size, plots/chinchilla.ipynb at commit
c5b509d); restated in D, the variable the paper finds it depends on: N/10⁶ = D/(20·10⁶)."""
KAPLAN_ALPHA_N, KAPLAN_ALPHA_D, KAPLAN_N_C, KAPLAN_D_C = 0.076, 0.103, 6.4e13, 1.8e13
"""Kaplan et al. 2020, Eq. 1.5 with Table 2's fit: L(N, D) = ((N_c/N)^(α_N/α_D) + D_c/D)^α_D nats/token."""


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchLaw:
    """One published law."""

    key: str
    """Stable name used in records and tables."""
    citation: str
    formula: str
    quantity: str
    """What the batch is: the loss-optimal batch, or a critical batch with its definition."""
    fitted_range: str
    conditions: str
    """Data, tokenizer, optimizer and definitions under which it was fitted."""


LAWS: dict[str, BatchLaw] = {law.key: law for law in (
    BatchLaw(key="deepseek-llm-2024", citation="DeepSeek-AI 2024, DeepSeek LLM (arXiv:2401.02954) §3.1",
             formula="B_opt = 0.2920·C^0.3271 tokens; η_opt = 0.3118·C^−0.1250; C = M·D",
             quantity="loss-optimal batch at compute C (and its LR)",
             fitted_range="C ≈ 1e17–3e20 FLOPs (validated by the authors at 7B/67B, C ≈ 1e23)",
             conditions="DeepSeek's 2T-token bilingual corpus and tokenizer, AdamW β = (0.9, 0.95), wd 0.1, "
                        "multi-step LR schedule"),
    BatchLaw(key="step-law-2025", citation="Li et al. 2025, Predictable Scale Part I — Step Law (arXiv:2503.04715)",
             formula="B_opt = 0.58·D^0.571 tokens; η_opt = 1.79·N^−0.713·D^0.307",
             quantity="loss-optimal batch for D training tokens (invariant to N) and its LR",
             fitted_range="dense N = 2.1e8–1.1e9 non-embedding params, D = 4e9–1e11 tokens (released data)",
             conditions="3,700 runs, their English/Chinese/code mix, AdamW, sequence 2048"),
    BatchLaw(key="zhang-cbs-2024", citation="Zhang et al. 2024, How Does Critical Batch Size Scale in Pre-training? "
                                            "(arXiv:2410.21676, ICLR 2025)",
             formula="CBS = 93.2·(D/2e7)^0.468 sequences of 512 tokens (fitted as 93.2·(N/1e6)^0.468 at D = 20N)",
             quantity="critical batch: where steps exceed linear scaling from B = 256 by 20% "
                      "(= B_noise/5 + 307 sequences in their fit, B_noise = E_min/S_min)",
             fitted_range="N = 85M–1.2B, D = 20·N = 1.7e9–2.4e10 tokens",
             conditions="C4, sequence 512, Adam with tuned β₂ and LR, constant LR + weight averaging"),
    BatchLaw(key="kaplan-2020", citation="Kaplan et al. 2020, Scaling Laws for Neural Language Models "
                                         "(arXiv:2001.08361) Eq. 5.1 and Eq. 1.5",
             formula="B_crit = 2.1e8/L^(1/0.21) tokens at L = ((6.4e13/N)^(0.076/0.103) + 1.8e13/D)^0.103",
             quantity="critical batch B_crit = E_min/S_min at the loss the run reaches",
             fitted_range="N ≤ 1.5e9 non-embedding params, D ≤ 2.3e10 tokens",
             conditions="WebText2, GPT-2 BPE (L in those nats), Adam"),
)}


@dataclass(frozen=True, kw_only=True, slots=True)
class LawInputs:
    """What the laws need about one run."""

    non_embedding_params: float
    """N (active, for a mixture of experts)."""
    train_tokens: float
    """D."""
    flops_per_token: float
    """M: DeepSeek's non-embedding FLOPs per token, attention included (for C = M·D)."""
    seq_len: int
    """Tokens per sequence of the run (to express batches in sequences)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LawPrediction:
    """One law's batch (and LR, where it has one) for one run."""

    law: str
    batch_tokens: float
    learning_rate: float | None
    in_range: bool
    """Whether the run lies inside the law's fitted range (else an extrapolation)."""
    note: str

    def batch_sequences(self, seq_len: int) -> float:
        return self.batch_tokens / seq_len


def law_inputs(model: ModelSpec, *, train_tokens: float, seq_len: int) -> LawInputs:
    """N and M of ``model``: for a dense model M is DeepSeek's 72·l·d² + 12·l·d·s; for a mixture of experts
    (outside DeepSeek's dense fit) the model's own training FLOPs per token less the output head's."""
    if not (math.isfinite(train_tokens) and train_tokens >= 1):
        raise BatchpilotError(f"train tokens must be >= 1, got {train_tokens}; pass e.g. --train-tokens 2T")
    if model.is_moe:
        n = float(model.params_active - model.params_embedding)
        m = float(model.flops_per_token(seq_len) - 6 * model.vocab_size * model.hidden_size)
    else:
        n = float(model.params_non_embedding)
        m = deepseek_flops_per_token(num_layers=model.num_layers, hidden_size=model.hidden_size, seq_len=seq_len)
    return LawInputs(non_embedding_params=n, train_tokens=float(train_tokens), flops_per_token=m, seq_len=seq_len)


def kaplan_loss(non_embedding_params: float, train_tokens: float) -> float:
    """L(N, D) = ((N_c/N)^(α_N/α_D) + D_c/D)^α_D (Kaplan et al. 2020, Eq. 1.5, Table 2), nats per GPT-2 token."""
    return ((KAPLAN_N_C / non_embedding_params) ** (KAPLAN_ALPHA_N / KAPLAN_ALPHA_D)
            + KAPLAN_D_C / train_tokens) ** KAPLAN_ALPHA_D


def _range_note(checks: list[tuple[str, float, float, float]]) -> tuple[bool, str]:
    outside = [f"{name} = {value:.2g} outside {lo:.2g}–{hi:.2g}" for name, value, lo, hi in checks
               if not lo <= value <= hi]
    return not outside, "; ".join(outside) or "inside the fitted range"


def predict(law: str, x: LawInputs) -> LawPrediction:
    """One law's prediction for ``x`` (see :data:`LAWS`)."""
    n, d = x.non_embedding_params, x.train_tokens
    if law == "deepseek-llm-2024":
        c = x.flops_per_token * d
        ok, note = _range_note([("C", c, 1e17, 3e20)])
        return LawPrediction(law=law, batch_tokens=deepseek_batch_tokens(c), learning_rate=deepseek_learning_rate(c),
                             in_range=ok, note=note)
    if law == "step-law-2025":
        ok, note = _range_note([("N", n, 2.1e8, 1.1e9), ("D", d, 4e9, 1e11)])
        lr = STEP_LAW_LR_COEF * n**STEP_LAW_LR_N_EXP * d**STEP_LAW_LR_D_EXP
        return LawPrediction(law=law, batch_tokens=STEP_LAW_B_COEF * d**STEP_LAW_B_EXP, learning_rate=lr,
                             in_range=ok, note=note)
    if law == "zhang-cbs-2024":
        ok, note = _range_note([("D", d, 1.7e9, 2.4e10)])
        sequences = ZHANG_CBS_COEF_SEQUENCES * (d / (ZHANG_TOKENS_PER_PARAM * 1e6)) ** ZHANG_CBS_EXP
        return LawPrediction(law=law, batch_tokens=sequences * ZHANG_SEQ_LEN, learning_rate=None, in_range=ok,
                             note=note)
    if law == "kaplan-2020":
        loss = kaplan_loss(n, d)
        ok, note = _range_note([("N", n, 7.68e2, 1.5e9), ("D", d, 2.2e7, 2.3e10)])
        return LawPrediction(law=law, batch_tokens=kaplan_critical_batch_tokens(loss), learning_rate=None,
                             in_range=ok, note=f"{note}; L(N, D) = {loss:.3f} nats/GPT-2 token")
    raise BatchpilotError(f"unknown batch law {law!r}; known: {', '.join(LAWS)}")


def predict_all(x: LawInputs) -> list[LawPrediction]:
    """Every law of :data:`LAWS`, in order."""
    return [predict(key, x) for key in LAWS]


def spread(predictions: list[LawPrediction]) -> tuple[float, str, str]:
    """(largest / smallest batch, the law giving the smallest, the law giving the largest)."""
    lo = min(predictions, key=lambda p: p.batch_tokens)
    hi = max(predictions, key=lambda p: p.batch_tokens)
    return hi.batch_tokens / lo.batch_tokens, lo.law, hi.law
