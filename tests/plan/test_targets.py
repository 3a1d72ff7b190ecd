"""Targets: within ``--max-deviation`` the planner takes the nearest global batch that splits over the most
data-parallel ranks and says so; an exact target that does not split over every GPU says which would; a count
given with a unit is echoed as read, with a warning when it is implausible."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from batchpilot.cli import app
from batchpilot.plan.explain import as_read
from batchpilot.plan.planner import PlanRequest, plan
from batchpilot.plan.priors import global_batch_from_prior
from batchpilot.plan.space import clean_global_batch
from batchpilot.specs.hardware import ClusterSpec, load_accelerator
from batchpilot.specs.model import load_model


def cluster(gpus: int) -> ClusterSpec:
    return ClusterSpec(accelerator=load_accelerator("h100-sxm"), devices_per_node=min(8, gpus),
                       num_nodes=max(1, gpus // 8), inter_node_bandwidth_bytes_per_s=50e9 if gpus > 8 else None)


def test_train_tokens_target_takes_a_batch_every_gpu_shares():
    """Llama 3 8B, 15T tokens: the DeepSeek LLM prior gives 2,322 sequences of 8192; 2,322 = 2 × 3³ × 43 splits over
    at most 2 data-parallel ranks (the plan used to be micro 1 × accumulation 1,161 × dp 2). Within 10%, 2,304 =
    36 × 64 is the nearest multiple of the 64 GPUs."""
    model = load_model("llama-3-8b")
    prior = global_batch_from_prior(num_layers=model.num_layers, hidden_size=model.hidden_size, seq_len=8192,
                                    train_tokens=15 * 10**12)
    assert prior.batch_sequences == 2322
    for engine in ("megatron", "hf"):
        req = PlanRequest(model=model, cluster=cluster(64), seq_len=8192, global_batch_sequences=2322,
                          max_deviation=0.10, engine=engine)
        result = plan(req)
        for p in result.plans:
            assert p.triad.global_batch_sequences == 2304 and p.triad.grad_accum_steps != 1161
        assert "global batch 2,304 sequences (-0.78%): the nearest to the target 2,322 within 10% that splits over " \
               "every GPU" in result.rationale


def test_a_batch_that_does_not_divide_does_not_bend_the_layout():
    """500 sequences on 16 GPUs: within 5%, 496 = 31 × 16 splits over all 16 (it used to become tp 2 · pp 4 · dp 2);
    exactly 500 (no deviation) splits over at most 4, and the plan says which batches split over every GPU."""
    req = PlanRequest(model=load_model("llama-3-8b"), cluster=cluster(16), seq_len=4096, global_batch_sequences=500,
                      max_deviation=0.05, engine="megatron")
    assert clean_global_batch(req, 500.0) == (496, 16)
    assert all(p.triad.global_batch_sequences == 496 for p in plan(req).plans)
    exact = plan(PlanRequest(model=load_model("llama-3-8b"), cluster=cluster(16), seq_len=4096,
                             global_batch_sequences=500, engine="megatron"))
    assert exact.plans[0].triad.data_parallel_ranks <= 4
    assert "--global-batch 496 or 512 or --max-deviation 1% splits over every GPU" in exact.rationale


def test_fewer_sequences_than_gpus_warns_only_where_the_batch_bounds_data_parallelism():
    """Llama 3.1 405B on 16,384 GPUs at 2,048 sequences (Meta's batch, arXiv:2407.21783 Table 4) is tp 8 × pp 16 ×
    dp 128: memory, not the batch, sets the model parallelism, so neither a warning nor a note about splitting
    over every GPU. Llama 3 8B, 8 sequences on 64 GPUs with pipeline parallelism off the table, is bounded by
    the batch: dp 8 and 8-way tensor parallelism the model does not need for memory."""
    big = plan(PlanRequest(model=load_model("llama-3.1-405b"), cluster=cluster(16384), seq_len=8192,
                           global_batch_sequences=2048, engine="megatron"))
    assert big.plans[0].triad.data_parallel_ranks < 2048
    assert not any("fewer than" in w for w in big.warnings)
    assert "splits over every GPU" not in big.rationale
    req = PlanRequest(model=load_model("llama-3-8b"), cluster=cluster(64), seq_len=4096, global_batch_sequences=8,
                      engine="megatron")
    small = plan(dataclasses.replace(req, pins=dataclasses.replace(req.pins, pp=1, cp=1)))
    assert small.plans[0].triad.data_parallel_ranks == 8
    assert any(w.startswith("target 8 sequences is fewer than the 64 GPUs: data parallelism stops at 8 ranks")
               for w in small.warnings)


def test_a_window_without_a_multiple_of_the_gpus_takes_the_widest_split():
    req = PlanRequest(model=load_model("qwen2.5-0.5b"), cluster=cluster(16), seq_len=1024, global_batch_sequences=150,
                      max_deviation=0.03, engine="megatron")
    assert clean_global_batch(req, 150.0) == (152, 8)  # 144 and 160 are 4% and 6.7% off; 152 = 19 × 8 is within 3%
    assert math.isclose(plan(req).plans[0].deviation, 2 / 150)
    assert clean_global_batch(req, 100.0) == (100, 4)  # no multiple of 8 in [97, 103]


@pytest.mark.parametrize(("count", "read"), [(4_000_000, "4M"), (4 * 2**20, "4Mi"), (15 * 10**12, "15T"),
                                             (2322, "2,322"), (1000, "1K")])
def test_counts_are_echoed_as_read(count, read):
    assert as_read(count) == read


def test_cli_echoes_a_count_with_a_unit_and_warns_when_it_is_implausible(cli_runner):
    """--global-batch counts sequences: 4M of them at 4096 tokens is 16B tokens per step, far above any published
    pretraining batch (the registry's largest is DeepSeek-V3's 62.9M tokens)."""
    args = ["plan", "--model", "qwen2.5-0.5b", "--gpu", "h100-sxm", "--gpus", "64", "--seq-len", "4096",
            "--global-batch", "4M", "--engine", "hf"]
    result = cli_runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "target 4M sequences = 4,000,000 sequences × 4096 tokens" in " ".join(result.stdout.split())
    assert "did you mean --global-batch-tokens?" in result.stderr
    record = json.loads(cli_runner.invoke(app, [*args, "--json"]).stdout)
    assert any("exceeds the largest published pretraining batch" in w for w in record["warnings"])
