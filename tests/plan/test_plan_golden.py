"""Golden plans: the key numbers of a few plans, pinned bit for bit, so that work on the planner's speed (caches,
hoisted loop invariants, reordered evaluation) cannot change a result unnoticed.

The values are the planner's own outputs at commit 8769d27, before the step-time and memory caches went in (the
same at every later commit; each cache commit was checked against 35 ``plan``/``memory``/``rl --json`` outputs byte
for byte). A deliberate change to the memory or step-time model moves them: re-pin from the values the assertion
prints, and say why in the commit.
"""

from __future__ import annotations

import dataclasses

import pytest

from batchpilot.estimate.memory import analytic_memory
from batchpilot.plan.planner import Pins, PlanRequest, plan
from batchpilot.specs.hardware import ClusterSpec, load_accelerator
from batchpilot.specs.model import load_model
from batchpilot.specs.settings import RunSettings

LAYOUT_KEYS = ("micro_batch", "grad_accum", "dp", "tp", "pp", "vpp", "ep", "zero_stage", "recompute")


def _cluster(gpu: str, gpus: int) -> ClusterSpec:
    return ClusterSpec(accelerator=load_accelerator(gpu), devices_per_node=8, num_nodes=gpus // 8,
                       inter_node_bandwidth_bytes_per_s=50e9)


def _gpt3_175b() -> PlanRequest:
    """Interleaved 1F1B with tensor parallelism (Megatron)."""
    return PlanRequest(model=load_model("gpt-3-175b"), cluster=_cluster("h100-sxm", 512), seq_len=2048,
                       global_batch_sequences=1536, settings=RunSettings(engine="megatron"), engine="megatron",
                       pins=Pins(pp=16, vpp=3))


def _llama_70b() -> PlanRequest:
    """benchmarks/plan_speed.py's dense case: every layout the memory model covers, DeepSpeed ZeRO 0-3."""
    return PlanRequest(model=load_model("llama-3-70b"), cluster=_cluster("h100-sxm", 512), seq_len=8192,
                       global_batch_tokens=4 * 2**20, settings=RunSettings(engine="deepspeed"))


def _deepseek_v2() -> PlanRequest:
    """MLA and routed experts with expert parallelism, selective recomputation (Megatron)."""
    return PlanRequest(model=load_model("deepseek-v2"), cluster=_cluster("h800", 256), seq_len=4096,
                       global_batch_sequences=2304, settings=RunSettings(engine="megatron"), engine="megatron",
                       pins=Pins(recompute="selective"))


GOLDEN = [
    (_gpt3_175b, dict(micro_batch=1, grad_accum=192, dp=8, tp=4, pp=16, vpp=3, ep=1, zero_stage=1, recompute="none"),
     (239250.76376120377, 238070.95556050653), 13.148246427918416, 0.5083122104062239, (74779342336, 74779342336)),
    (_llama_70b, dict(micro_batch=1, grad_accum=1, dp=512, tp=1, pp=1, vpp=1, ep=1, zero_stage=3, recompute="full"),
     (411700.41144866915, 395043.73660330294), 10.187757610543331, 0.39123078182652327, (34309111552, 67048541184)),
    (_deepseek_v2, dict(micro_batch=1, grad_accum=288, dp=8, tp=8, pp=4, vpp=1, ep=8, zero_stage=1,
                        recompute="selective"),
     (288574.9550576468, 285943.4849591389), 32.702713227884914, 0.2113259680827626, (74598608512, 77217427072)),
]


@pytest.mark.parametrize(("make", "layout", "tokens_per_s", "step_time_s", "mfu", "memory_total"), GOLDEN,
                         ids=["gpt-3-175b-interleaved", "llama-3-70b-deepspeed", "deepseek-v2-selective"])
def test_golden_plans_keep_their_numbers(make, layout, tokens_per_s, step_time_s, mfu, memory_total):
    rows = [p.to_dict() for p in plan(make()).plans[:2]]
    found = ({k: rows[0][k] for k in LAYOUT_KEYS}, tuple(r["tokens_per_s"] for r in rows), rows[0]["step_time_s"],
             rows[0]["mfu"], tuple(r["memory"]["total"] for r in rows))
    assert found == (layout, tokens_per_s, step_time_s, mfu, memory_total)


def test_pruned_search_ranks_as_the_exhaustive_one_with_fewer_memory_evaluations():
    """The bound is optimistic (nothing it skips could rank) and effective (it skips most memory evaluations)."""
    fast = plan(_llama_70b())
    full = plan(dataclasses.replace(_llama_70b(), exhaustive=True))
    assert [p.to_dict() for p in fast.plans] == [p.to_dict() for p in full.plans]
    assert fast.pruned > 0 and fast.memory_evaluations < full.memory_evaluations / 3


def test_golden_memory_keeps_its_numbers():
    """DeepSeek-V3 at the planner's benchmark layout (pp 16, ep 8, ZeRO-1, full recomputation, 1F1B)."""
    m = analytic_memory(load_model("deepseek-v3"), RunSettings(engine="megatron", pp=16, ep=8, zero_stage=1,
                                                               recompute="full"),
                        micro_batch=1, seq_len=4096, dp=128, grad_accum=120)
    assert (m.total_bytes, m.activations_bytes, m.weights_bytes, m.details["peak_phase"]) == (
        57352793608, 7245974948, 14575045246, 3)
