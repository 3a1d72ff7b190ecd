"""Planner: the triad invariant (property-tested), memory feasibility, pruning == exhaustive, pins,
deviation, and one-line errors that name the values, the rule and a fix."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchpilot.errors import BatchpilotError, InfeasibleError, SpecError
from batchpilot.estimate.calibration import Calibration, EfficiencyPoint
from batchpilot.plan.planner import Pins, PlanRequest, plan
from batchpilot.specs.batch import BatchError
from batchpilot.specs.hardware import ClusterSpec, load_accelerator
from batchpilot.specs.model import load_model
from batchpilot.specs.settings import RunSettings

H100 = load_accelerator("h100-sxm")
SMALL = load_accelerator("rtx-4090")


def cluster(gpus: int, per_node: int = 8, accel=H100) -> ClusterSpec:
    per_node = min(per_node, gpus)
    return ClusterSpec(accelerator=accel, devices_per_node=per_node, num_nodes=gpus // per_node,
                       inter_node_bandwidth_bytes_per_s=50e9)


def request(**kw) -> PlanRequest:
    base = dict(model=load_model("tiny-llama-15m"), cluster=cluster(8), seq_len=1024, global_batch_sequences=64)
    base.update(kw)
    return PlanRequest(**base)


@settings(max_examples=40, deadline=None)
@given(nodes=st.sampled_from([1, 2, 4]), per_node=st.sampled_from([1, 2, 4, 8]),
       global_batch=st.integers(min_value=1, max_value=512), seq_exp=st.integers(min_value=6, max_value=11))
def test_every_plan_multiplies_out(nodes, per_node, global_batch, seq_exp):
    req = request(cluster=cluster(nodes * per_node, per_node), seq_len=2**seq_exp,
                  global_batch_sequences=global_batch, top=50)
    try:
        result = plan(req)
    except BatchError as exc:  # the message lists the data-parallel sizes the layouts allow: none divides it
        listed = str(exc).split("dp ∈ {")[1].split("}")[0]
        assert all(global_batch % int(dp) for dp in listed.split(", "))
        return
    for p in result.plans:
        t, s = p.triad, p.settings
        assert t.micro_batch_sequences * t.grad_accum_steps * t.data_parallel_ranks == t.global_batch_sequences
        assert t.global_batch_sequences == global_batch and p.deviation == 0
        assert t.global_batch_tokens == global_batch * 2**seq_exp
        assert t.data_parallel_ranks * s.tp * s.pp == nodes * per_node
        assert p.memory.total_bytes <= req.budget_bytes
    speeds = [p.step.tokens_per_s for p in result.plans]
    assert speeds == sorted(speeds, reverse=True)


@settings(max_examples=25, deadline=None)
@given(target=st.integers(min_value=10, max_value=3000), deviation=st.sampled_from([0.01, 0.05, 0.2]))
def test_deviation_is_stated_and_bounded(target, deviation):
    req = request(cluster=cluster(16), global_batch_sequences=target, max_deviation=deviation, top=20)
    try:
        result = plan(req)
    except BatchError:
        return
    for p in result.plans:
        g = p.triad.global_batch_sequences
        assert p.deviation == pytest.approx((g - target) / target)
        assert abs(g - target) <= deviation * target + 1e-9


@pytest.mark.parametrize(("model", "gpus", "accel", "seq", "batch"), [
    ("llama-3-8b", 64, H100, 8192, 512),
    ("mixtral-8x7b", 32, H100, 4096, 512),
    ("llama-2-7b", 16, SMALL, 4096, 256),
])
def test_pruned_search_ranks_like_the_exhaustive_one(model, gpus, accel, seq, batch):
    req = request(model=load_model(model), cluster=cluster(gpus, accel=accel), seq_len=seq,
                  global_batch_sequences=batch, settings=RunSettings(engine="deepspeed"), top=5)
    fast, full = plan(req), plan(dataclasses.replace(req, exhaustive=True))
    assert [p.to_dict() for p in fast.plans] == [p.to_dict() for p in full.plans]
    assert fast.memory_evaluations < full.memory_evaluations and full.pruned == 0


def test_headroom_and_calibrated_overhead_are_respected():
    req = request(model=load_model("llama-3-8b"), cluster=cluster(8), seq_len=8192, global_batch_sequences=64,
                  settings=RunSettings(engine="deepspeed"), headroom=0.3)
    result = plan(req)
    assert all(p.memory.total_bytes <= 0.7 * H100.memory_bytes for p in result.plans)
    extra = 5 * 2**30
    cal = Calibration(points=(EfficiencyPoint(tokens_per_micro_batch=1, efficiency=0.4),),
                      memory_overhead_bytes=extra)
    pinned = Pins(tp=1, pp=1, zero_stage=3, recompute="full", micro_batch=1)
    a = plan(dataclasses.replace(req, pins=pinned)).plans[0]
    b = plan(dataclasses.replace(req, pins=pinned, calibration=cal)).plans[0]
    assert b.memory.total_bytes - a.memory.total_bytes == extra
    assert b.step.efficiency == 0.4


def test_pins_are_honoured():
    pins = Pins(tp=2, pp=2, zero_stage=1, recompute="selective", micro_batch=2)
    result = plan(request(cluster=cluster(16), global_batch_sequences=64, pins=pins, top=10,
                          settings=RunSettings(engine="deepspeed")))
    for p in result.plans:
        s, t = p.settings, p.triad
        assert (s.tp, s.pp, s.zero_stage, s.recompute, t.micro_batch_sequences) == (2, 2, 1, "selective", 2)
        assert t.grad_accum_steps == 64 // (2 * 4)


def test_tokens_target_and_mi_suffix():
    result = plan(request(global_batch_sequences=None, global_batch_tokens=64 * 1024))
    assert result.plans[0].triad.global_batch_tokens == 64 * 1024


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


@pytest.mark.parametrize(("kw", "exc", "fragments"), [
    (dict(pins=Pins(tp=4)), SpecError, ["--tp 4", "6 attention heads", "divisor of 6"]),
    (dict(pins=Pins(pp=7)), SpecError, ["--pp 7", "6 layers", "--pp ≤ 6"]),
    (dict(pins=Pins(pp=3)), SpecError, ["--gpus 8", "pp 3", "multiple of 3"]),
    (dict(global_batch_sequences=-4), SpecError, ["--global-batch -4", "positive"]),
    (dict(seq_len=0), SpecError, ["--seq-len 0", "positive"]),
    (dict(global_batch_sequences=None, global_batch_tokens=1000), BatchError,
     ["1000 tokens", "1024-token", "--max-deviation"]),
    (dict(global_batch_sequences=7, pins=Pins(tp=1, pp=1)), BatchError,
     ["global batch 7", "dp ∈ {8}", "--global-batch 8", "--max-deviation"]),
    (dict(global_batch_sequences=64, pins=Pins(micro_batch=3)), BatchError,
     ["--micro-batch 3", "--global-batch 63", "--global-batch 66"]),
    (dict(pins=Pins(zero_stage=3, pp=2), settings=RunSettings(engine="deepspeed")), SpecError,
     ["--zero 3", "--pp 2", "--pp 1"]),
    (dict(pins=Pins(zero_stage=3)), SpecError, ["--zero 3", "--engine torch", "stages 0, 1", "--engine deepspeed"]),
    (dict(headroom=1.5), SpecError, ["--headroom 1.5"]),
])
def test_bad_requests_are_one_line_errors(kw, exc, fragments):
    with pytest.raises(exc) as info:
        plan(request(**kw))
    text = _one_line(info.value)
    for fragment in fragments:
        assert fragment in text


@pytest.mark.parametrize(("target", "advice"), [(12, "--max-deviation 34%"), (100, "--max-deviation 4%"),
                                              (7, "--max-deviation 15%")])
def test_unsplittable_batch_advises_a_deviation_that_reaches_a_split(target, advice):
    """12 sequences on 8 GPUs: 8 and 16 are 33.3 % away, so the advice is 34 % (a fixed 5 % was advised,
    which reaches neither, and again to a request that had it); the advice plans."""
    pins = Pins(tp=1, pp=1)
    deviation = int(advice.split()[1][:-1]) / 100
    for asked in (0.0, 0.03):
        with pytest.raises(BatchError) as info:
            plan(request(global_batch_sequences=target, pins=pins, max_deviation=asked))
        assert _one_line(info.value).endswith(advice)
    assert plan(request(global_batch_sequences=target, pins=pins, max_deviation=deviation)).plans


def test_batch_below_every_split_advises_no_deviation():
    """4 sequences on 8 GPUs: only 8 splits, 100 % away, beyond any --max-deviation (< 1)."""
    with pytest.raises(BatchError) as info:
        plan(request(global_batch_sequences=4, pins=Pins(tp=1, pp=1)))
    assert _one_line(info.value).endswith("use --global-batch 8")


def test_nothing_fits_says_why_and_what_would():
    req = request(model=load_model("llama-3-70b"), cluster=cluster(8, accel=SMALL), seq_len=4096,
                  global_batch_sequences=64, settings=RunSettings(engine="deepspeed"))
    with pytest.raises(InfeasibleError) as info:
        plan(req)
    text = _one_line(info.value)
    assert "nothing fits" in text and "GiB per GPU" in text and "rtx-4090" in text
    assert "fits with: --gpus 256 (nodes of 8)" in text  # nothing on 8 GPUs fits: the fewest GPUs that do


def test_pinned_infeasible_suggests_unpinning():
    req = request(model=load_model("llama-3-8b"), cluster=cluster(8), seq_len=8192, global_batch_sequences=64,
                  settings=RunSettings(engine="deepspeed"), pins=Pins(zero_stage=0, tp=1, pp=1, recompute="none"))
    with pytest.raises(BatchpilotError) as info:
        plan(req)
    text = _one_line(info.value)
    assert "fits with: without --tp 1 --pp 1 --zero 0 --recompute none (" in text
