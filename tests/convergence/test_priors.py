"""Scaling-law priors against hand-computed values and DeepSeek LLM's published 7B/67B choices."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import record_samples

from batchpilot.errors import BatchpilotError
from batchpilot.plan.priors import (
    deepseek_batch_tokens,
    deepseek_flops_per_token,
    deepseek_learning_rate,
    global_batch_from_noise,
    global_batch_from_prior,
    kaplan_critical_batch_tokens,
)
from batchpilot.records.noise import NoiseBand, NoiseRecord

# DeepSeek LLM (arXiv:2401.02954) Table 2 and README: 7B = 30 layers × 4096, 67B = 95 layers × 8192,
# sequence 4096, 2T training tokens; batch 2304 / 4608 sequences, peak lr 4.2e-4 / 3.2e-4.
DEEPSEEK_7B = dict(num_layers=30, hidden_size=4096, seq_len=4096)
DEEPSEEK_67B = dict(num_layers=95, hidden_size=8192, seq_len=4096)
TWO_T = 2e12


def test_flops_per_token_by_hand() -> None:
    # 30·4096·(72·4096 + 12·4096) = 30·4096²·84 = 42,278,584,320 (worked by hand).
    assert deepseek_flops_per_token(**DEEPSEEK_7B) == 42_278_584_320
    # 95·8192·(72·8192 + 12·4096) = 95·8192·638,976 = 497,276,682,240.
    assert deepseek_flops_per_token(**DEEPSEEK_67B) == 497_276_682_240


def test_deepseek_power_laws_by_hand() -> None:
    # C = 8.4557e22 → log10 C = 22.92715; B = 0.2920·10^(0.3271·22.92715) = 9.2226e6; η = 0.3118·10^(−2.86589) = 4.246e-4
    c7 = 42_278_584_320 * TWO_T
    assert deepseek_batch_tokens(c7) == pytest.approx(9.2226e6, rel=1e-4)
    assert deepseek_learning_rate(c7) == pytest.approx(4.246e-4, rel=1e-3)


@pytest.mark.parametrize(("shape", "published_sequences", "published_lr", "batch_tol"),
                         [(DEEPSEEK_7B, 2304, 4.2e-4, 0.03), (DEEPSEEK_67B, 4608, 3.2e-4, 0.10)])
def test_prior_matches_deepseeks_own_choices(shape: dict[str, int], published_sequences: int,
                                             published_lr: float, batch_tol: float) -> None:
    out = global_batch_from_prior(**shape, train_tokens=TWO_T)
    assert out.batch_tokens == pytest.approx(published_sequences * 4096, rel=batch_tol)
    assert out.learning_rate == pytest.approx(published_lr, rel=0.03)
    assert out.batch_sequences == round(out.batch_tokens / 4096)


def test_prior_rounds_to_whole_micro_times_dp() -> None:
    out = global_batch_from_prior(**DEEPSEEK_7B, train_tokens=TWO_T, multiple_of=64)
    assert out.batch_sequences % 64 == 0 and abs(out.batch_sequences - out.batch_tokens / 4096) <= 32


def test_kaplan_critical_batch_by_hand() -> None:
    # 2^(1/0.21) = 2^4.7619 = 27.13 → 2.1e8 / 27.13 = 7.74e6 tokens at L = 2 nats.
    assert kaplan_critical_batch_tokens(2.0) == pytest.approx(7.740e6, rel=1e-3)
    assert kaplan_critical_batch_tokens(3.0) < kaplan_critical_batch_tokens(2.0)  # grows as loss falls


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan])
def test_bad_inputs_raise(bad: float) -> None:
    with pytest.raises(BatchpilotError):
        kaplan_critical_batch_tokens(bad)
    with pytest.raises(BatchpilotError):
        deepseek_batch_tokens(bad)


def test_noise_record_round_trip_to_a_batch(tmp_path: Path) -> None:
    path = record_samples.noise(b_simple_sequences=37.5, b_simple_tokens=37.5 * 256, seq_len=256,
                                band=NoiseBand(sequences=(30.0, 47.0), tokens=(7680.0, 12032.0), level=0.95,
                                               ratio=47.0 / 30.0)).save(tmp_path / "noise.json")
    record = NoiseRecord.load(path)
    assert record.band.sequences == (30.0, 47.0) and record.seq_len == 256
    out = global_batch_from_noise(record, seq_len=256, multiple_of=4)
    assert out.batch_sequences == 36 and out.batch_tokens == 37.5 * 256  # round(37.5 / 4) = 9 micro-steps of 4


def test_noise_record_errors(tmp_path: Path) -> None:
    inf = math.inf
    path = record_samples.noise(b_simple_sequences=inf, b_simple_tokens=inf, steps_measured=3,
                                band=NoiseBand(sequences=(0.0, inf), tokens=(0.0, inf), level=0.95, ratio=inf)
                                ).save(tmp_path / "noise.json")
    assert json.loads(path.read_text())["b_simple_sequences"] is None  # ∞ is null in the file
    with pytest.raises(BatchpilotError, match=f"{path.name!s}.* has no finite B_simple .*noise-dominated"):
        global_batch_from_noise(NoiseRecord.load(path), seq_len=256, where=f"noise file {str(path)!r}")
    path.write_text("{}")
    with pytest.raises(BatchpilotError, match="no schema_version"):
        NoiseRecord.load(path)
