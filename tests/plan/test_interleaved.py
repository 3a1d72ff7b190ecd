"""The interleaved 1F1B schedule (``vpp`` virtual stages per pipeline rank) through settings, memory,
step time, planner and CLI."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from batchpilot.cli import app
from batchpilot.errors import SpecError
from batchpilot.estimate.memory import analytic_memory, first_stage_in_flight
from batchpilot.plan.planner import Pins, PlanRequest, plan
from batchpilot.specs.hardware import ClusterSpec, load_accelerator
from batchpilot.specs.model import load_model
from batchpilot.specs.settings import RunSettings

RUNNER = CliRunner()


def megatron_first_rank_in_flight(pp: int, vpp: int, microbatches: int) -> float:
    """Chunk forwards the first rank has run and not yet run backward for, at its peak, by walking
    Megatron's interleaved schedule (``schedules.py``): warm-up 2·(p − 1) + (v − 1)·p forwards, then
    each 1F1B step does one forward (peak) then one backward; in units of whole-stage micro-batches."""
    total = vpp * microbatches
    warmup = min(total, 2 * (pp - 1) + (vpp - 1) * pp)
    live = peak = warmup
    for _ in range(total - warmup):
        live += 1
        peak = max(peak, live)
        live -= 1
    return peak / vpp


@pytest.mark.parametrize(("pp", "vpp", "m"), [(4, 2, 8), (4, 4, 8), (16, 8, 16), (16, 2, 32), (4, 2, 4), (8, 4, 64)])
def test_first_stage_in_flight_walks_megatrons_schedule(pp, vpp, m):
    assert first_stage_in_flight(pp, vpp, m) == pytest.approx(megatron_first_rank_in_flight(pp, vpp, m))


def test_first_stage_in_flight_plain_and_korthikanti_factor():
    assert first_stage_in_flight(1, 1, 8) == 1.0
    assert first_stage_in_flight(4, 1, 8) == 4.0 and first_stage_in_flight(4, 1, 2) == 2.0
    # Korthikanti et al. 2022 §4.2.3: interleaving multiplies the first stage's activations by 1 + (p − 1)/(p·v)
    p, v = 16, 4
    assert first_stage_in_flight(p, v, 64) / first_stage_in_flight(p, 1, 64) == pytest.approx(1 + (p - 1) / (p * v))


def test_analytic_memory_scales_the_first_stage_activations():
    model = load_model("llama-3-8b")
    kw = dict(micro_batch=1, seq_len=4096, dp=1, grad_accum=8)
    plain = analytic_memory(model, RunSettings(tp=2, pp=4), **kw)
    inter = analytic_memory(model, RunSettings(tp=2, pp=4, vpp=2), **kw)
    # the first stage's stored layer activations: min(m, p + (p − 1)/v) = 5.5 vs min(p, m) = 4 micro-batches
    held = {name: m.details["activations_layers"] + m.details["activations_other_micro_batches"]
            for name, m in (("plain", plain), ("inter", inter))}
    assert held["inter"] / held["plain"] == pytest.approx((4 + 3 / 2) / 4)
    assert inter.total_bytes > plain.total_bytes
    with pytest.raises(SpecError, match="multiple of --pp 4, got 6"):
        analytic_memory(model, RunSettings(tp=2, pp=4, vpp=2), micro_batch=1, seq_len=4096, grad_accum=6)
    with pytest.raises(SpecError, match="--vpp 9 exceeds the 8 layers per pipeline stage"):
        analytic_memory(model, RunSettings(pp=4, vpp=9), **kw)


def test_planner_searches_interleaving_and_keeps_its_rules():
    """Llama 3 405B on 16,384 H100 at 16M tokens (the Llama 3 paper's layout space): the interleaved
    schedule divides the bubble, so it wins; every plan keeps accumulation a multiple of pp when vpp > 1."""
    cluster = ClusterSpec(accelerator=load_accelerator("h100-sxm"), devices_per_node=8, num_nodes=2048,
                          inter_node_bandwidth_bytes_per_s=50e9)
    req = PlanRequest(model=load_model("llama-3.1-405b"), cluster=cluster, seq_len=8192,
                      global_batch_tokens=16 * 2**20, settings=RunSettings(engine="megatron"), top=10)
    result = plan(req)
    best = result.plans[0]
    assert best.settings.vpp > 1
    for p in result.plans:
        s, t = p.settings, p.triad
        assert s.vpp == 1 or (s.pp > 1 and t.grad_accum_steps % s.pp == 0)
        assert s.vpp <= math.ceil(126 / s.pp)
        expected_bubble = (s.pp - 1) * (p.step.compute_s / t.grad_accum_steps)
        assert p.step.bubble_s >= expected_bubble / s.vpp * 0.999  # tp/ep time adds to a stage's time
    plain = plan(PlanRequest(**{**_fields(req), "pins": Pins(vpp=1)}))
    assert plain.plans[0].step.tokens_per_s < best.step.tokens_per_s
    assert all(p.settings.vpp == 1 for p in plain.plans)
    assert plan(PlanRequest(**{**_fields(req), "pins": Pins(pp=16, vpp=4)})).plans[0].settings.vpp == 4


def _fields(req: PlanRequest) -> dict:
    return {f: getattr(req, f) for f in req.__dataclass_fields__}


@pytest.mark.parametrize(("args", "message"), [
    (["plan", "--model", "llama-3-8b", "--gpu", "h100-sxm", "--gpus", "16", "--seq-len", "4096",
      "--global-batch", "64", "--pp", "1", "--vpp", "2"], "--vpp 2 interleaves pipeline stages and needs --pp > 1"),
    (["plan", "--model", "llama-3-8b", "--gpu", "h100-sxm", "--gpus", "16", "--seq-len", "4096",
      "--global-batch", "64", "--pp", "4", "--vpp", "9"], "--vpp 9 exceeds the 8 layers per pipeline stage"),
    (["plan", "--model", "llama-3-8b", "--gpu", "h100-sxm", "--gpus", "16", "--seq-len", "4096",
      "--global-batch", "64", "--vpp", "0"], "--vpp 0 must be a positive integer"),
    (["memory", "--model", "llama-3-8b", "--gpu", "h100-sxm", "--seq-len", "4096", "--micro-batch", "1",
      "--vpp", "2"], "needs --pp > 1"),
    (["memory", "--model", "llama-3-8b", "--gpu", "h100-sxm", "--seq-len", "4096", "--micro-batch", "1",
      "--gpus", "4", "--pp", "4", "--vpp", "2", "--grad-accum", "6"], "multiple of --pp 4, got 6; use --grad-accum 8"),
])
def test_cli_refuses_impossible_interleaving_in_one_line(args, message):
    result = RUNNER.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_plan_shows_and_exports_the_virtual_stages():
    args = ["plan", "--model", "llama-3.1-405b", "--gpu", "h100-sxm", "--gpus", "16384", "--seq-len", "8192",
            "--global-batch-tokens", "16Mi", "--engine", "megatron", "--pp", "16", "--vpp", "4"]
    shown = RUNNER.invoke(app, [*args, "--json"])
    assert shown.exit_code == 0, shown.output
    import json

    best = json.loads(shown.stdout)["plans"][0]
    assert best["vpp"] == 4 and best["settings"]["vpp"] == 4
    exported = RUNNER.invoke(app, [*args, "--export", "megatron"])
    assert exported.exit_code == 0, exported.output
    layout = exported.stdout.split("--pipeline-model-parallel-layout ")[1].split()[0].strip("'")
    assert len(layout.split("|")) == 16 * 4  # 126 layers do not split evenly: an explicit layout of p × v stages
