"""vLLM's scheduler, simulated: admission, preemption of the newest, waves when the cache is short."""

from __future__ import annotations

import pytest

from batchpilot.rl.kv import BLOCK_SIZE_TOKENS, RolloutMemory
from batchpilot.rl.rollout import (
    EngineModel,
    Workload,
    _rate_for_mean,
    _truncated_mean,
    response_lengths,
    simulate_rollout,
)
from batchpilot.specs.hardware import load_accelerator
from batchpilot.specs.model import load_model


def _memory(blocks: int) -> RolloutMemory:
    return RolloutMemory(total_bytes=1.0, gpu_memory_utilization=0.5, requested_bytes=1.0, weights_bytes=0.0,
                         activation_peak_bytes=0.0, non_torch_bytes=0.0, kv_cache_bytes=1.0, kv_bytes_per_token=1,
                         num_blocks=blocks)


class _UnitEngine(EngineModel):
    """Every step costs 1 s: the simulated time counts scheduler steps."""

    def step_time_s(self, tokens: float, context_tokens: float) -> float:
        return 1.0 if tokens > 0 else 0.0


def _engine() -> EngineModel:
    base = EngineModel.build(load_model("tiny-llama-1m"), load_accelerator("h100-sxm"), tp=1)
    return _UnitEngine(**{f: getattr(base, f) for f in EngineModel.__dataclass_fields__})


def test_everything_fits_one_wave() -> None:
    # 4 requests × (16 prompt + 32 response) = 192 tokens = 12 blocks of a 100-block cache: no preemption.
    # Step 1 prefills all four prompts (budget 64 = 4 × 16) and samples their first tokens; 31 decode steps follow.
    r = simulate_rollout(_engine(), _memory(100), Workload(requests=4, prompt_tokens=16, response_tokens=(32,) * 4),
                         max_num_batched_tokens=64)
    assert (r.preemptions, r.peak_running, r.steps) == (0, 4, 32)
    assert r.time_s == 32


def test_short_cache_preempts_newest_and_runs_in_waves() -> None:
    # Each request needs 64 tokens = 4 blocks at full length; the cache has 8 blocks: 2 fit at once.
    # Admission only checks the prompt (1 block each), so all 4 start, then the newest are preempted.
    work = Workload(requests=4, prompt_tokens=16, response_tokens=(48,) * 4)
    r = simulate_rollout(_engine(), _memory(8), work, max_num_batched_tokens=64)
    assert r.peak_running == 4 and r.preemptions > 0 and r.recomputed_tokens > 0
    assert r.waves == pytest.approx(4 * 64 / (8 * BLOCK_SIZE_TOKENS))
    # More than one wave of 48 decode steps; a preempted request keeps its generated tokens (recompute
    # rebuilds their KV in one prefill), so the second wave decodes only what is left: at most 2 × 48.
    assert 48 < r.steps <= 2 * 48


def test_bigger_cache_is_never_slower() -> None:
    work = Workload(requests=16, prompt_tokens=32, response_tokens=response_lengths(16, max_tokens=256, mean_tokens=80))
    times = [simulate_rollout(_engine(), _memory(b), work, max_num_batched_tokens=512).time_s for b in (20, 40, 80, 400)]
    assert times == sorted(times, reverse=True)


def test_max_num_seqs_caps_the_batch() -> None:
    work = Workload(requests=8, prompt_tokens=16, response_tokens=(16,) * 8)
    r = simulate_rollout(_engine(), _memory(1000), work, max_num_batched_tokens=1024, max_num_seqs=2)
    assert r.peak_running == 2 and r.steps == 4 * 16


def test_response_lengths_mean_and_tail() -> None:
    lengths = response_lengths(1000, max_tokens=32768, mean_tokens=8000)
    assert max(lengths) == 32768                       # the longest response sets the tail
    assert sum(lengths) / 1000 == pytest.approx(8000, rel=0.02)
    assert response_lengths(3, max_tokens=100, mean_tokens=None) == (100, 100, 100)
    for mean in (0.1, 0.5, 0.8):
        assert _truncated_mean(_rate_for_mean(mean)) == pytest.approx(mean, abs=1e-6)


def test_decode_step_is_bandwidth_bound() -> None:
    # One 8B decode token on one H100: reading 16 GB of bf16 weights at 3.35 TB/s × 0.7 ≈ 6.8 ms.
    model, gpu = load_model("llama-3-8b"), load_accelerator("h100-sxm")
    engine = EngineModel.build(model, gpu, tp=1)
    expected = model.params_total * 2 / (gpu.memory_bandwidth_bytes_per_s * 0.7)
    assert engine.step_time_s(1, 0) == pytest.approx(expected, rel=1e-6)
