"""Step-time model: FLOPs pinned to Narayanan et al. 2021 (Eq. 2 and 3), the assembly of a step from its
parts (compute, exposed communication, bubble, optimizer) derived independently here, the MFU definition of
PaLM (App. B), and the calibration path. The per-op compute and the collectives: test_steptime_ops.py."""

from __future__ import annotations

import dataclasses

import pytest
from plan_fixtures import a100_cluster, gpt

from batchpilot.errors import SpecError
from batchpilot.estimate.calibration import Calibration, EfficiencyPoint
from batchpilot.estimate.steptime import (
    StepTimeModel,
    pipeline_bubble_fraction,
    recompute_flops_per_token,
    ring_all_reduce_bytes,
    ring_gather_bytes,
    training_flops_per_token,
)
from batchpilot.specs.batch import BatchTriad
from batchpilot.specs.model import load_model
from batchpilot.specs.settings import Recompute, RunSettings

# Narayanan et al. 2021, Table 1: (parameters in billions, heads, hidden, layers).
TABLE_1 = [
    (1.7, 24, 2304, 24), (3.6, 32, 3072, 30), (7.5, 32, 4096, 36), (18.4, 48, 6144, 40),
    (39.1, 64, 8192, 48), (76.1, 80, 10240, 60), (145.6, 96, 12288, 80), (310.1, 128, 16384, 96),
    (529.6, 128, 20480, 105), (1008.0, 160, 25600, 128),
]
V, S = 51200, 2048


def eq2_params(n_l: int, h: int) -> float:
    """Narayanan et al. 2021 Eq. 2: P = 12·l·h²·(1 + 13/(12h) + (V + s)/(12·l·h))."""
    return 12 * n_l * h**2 * (1 + 13 / (12 * h) + (V + S) / (12 * n_l * h))


def eq3_flops(batch: int, n_l: int, h: int, *, recompute: bool) -> float:
    """Eq. 3 with full recompute: 96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h)). Without recompute the layer
    forward is not repeated: 72·B·s·l·h²·(1 + s/(6h) + V/(12·l·h)) (the head keeps 6·B·s·h·V)."""
    if recompute:
        return 96 * batch * S * n_l * h**2 * (1 + S / (6 * h) + V / (16 * n_l * h))
    return 72 * batch * S * n_l * h**2 * (1 + S / (6 * h) + V / (12 * n_l * h))


@pytest.mark.parametrize(("billions", "heads", "hidden", "layers"), TABLE_1)
def test_gpt_parameters_match_eq2_and_table1(billions, heads, hidden, layers):
    model = gpt(layers=layers, hidden=hidden, heads=heads)
    assert model.params_total == pytest.approx(eq2_params(layers, hidden), rel=0.01)
    assert model.params_total / 1e9 == pytest.approx(billions, abs=0.051 + 0.001 * billions)


@pytest.mark.parametrize(("billions", "heads", "hidden", "layers"), TABLE_1)
@pytest.mark.parametrize("recompute", [False, True])
def test_flops_per_step_match_eq3(billions, heads, hidden, layers, recompute):
    model = gpt(layers=layers, hidden=hidden, heads=heads)
    nodes = 4
    step_model = StepTimeModel(model, a100_cluster(nodes), seq_len=S)
    settings = RunSettings(tp=8, recompute="full" if recompute else "none", zero_stage=1)
    triad = BatchTriad(micro_batch_sequences=1, grad_accum_steps=128, data_parallel_ranks=nodes,
                       seq_len_tokens=S)
    step = step_model.estimate(settings, triad)
    batch = triad.global_batch_sequences
    assert step.flops_per_step == pytest.approx(eq3_flops(batch, layers, hidden, recompute=recompute), rel=0.01)
    assert step.model_flops_per_step == pytest.approx(eq3_flops(batch, layers, hidden, recompute=False), rel=0.01)


def test_selective_recompute_repeats_only_the_attention_core_forward():
    model = gpt(layers=24, hidden=2304, heads=24)
    # attention core forward per token per layer: 2·s·h (scores) + 2·s·h (values) = 4·s·h
    assert recompute_flops_per_token(model, S, "selective") == 24 * 4 * S * 2304
    assert recompute_flops_per_token(model, S, "none") == 0


@pytest.mark.parametrize(("billions", "heads", "hidden", "layers"), TABLE_1)
def test_training_flops_per_token_is_eq3_per_token(billions, heads, hidden, layers):
    """Per token, Eq. 3 is 96·l·h² + 16·l·h·s + 6·V·h with full recompute and 72·l·h² + 12·l·h·s + 6·V·h
    without: exact up to float rounding (the GPT spec counts no bias FLOPs)."""
    model = gpt(layers=layers, hidden=hidden, heads=heads)
    cases: tuple[tuple[Recompute, bool], ...] = (("none", False), ("full", True))
    for recompute, full in cases:
        eq3_per_token = eq3_flops(1, layers, hidden, recompute=full) / S
        assert training_flops_per_token(model, S, recompute) == pytest.approx(eq3_per_token, rel=1e-12)


@pytest.mark.parametrize(("name", "seq", "none", "full"), [
    # tiny-llama-1m (h 128, 4 heads of 32, 2 KV heads, I 448, V 512, 4 layers, untied head):
    # per layer q + k + v + o + SwiGLU = 128·128 + 2·128·64 + 128·128 + 3·128·448 = 221,184 weights;
    # head 512·128 = 65,536; attention 6·L·s·n·(d_qk + d_v) = 6·4·64·4·64 = 393,216 at s = 64.
    # none = 6·(4·221,184 + 65,536) + 393,216 = 6,094,848;
    # full = none + one layer forward 2·4·221,184 + 393,216/3 = 6,094,848 + 1,769,472 + 131,072.
    ("tiny-llama-1m", 64, 6_094_848, 7_995_392),
    # llama-3-8b (h 4096, 32 heads of 128, 8 KV heads, I 14336, V 128,256, 32 layers, untied head):
    # per layer 2·4096² + 2·4096·1024 + 3·4096·14336 = 218,103,808; head 525,336,576;
    # attention at s = 8192: 6·32·8192·32·256 = 12,884,901,888.
    # none = 6·(32·218,103,808 + 525,336,576) + 12,884,901,888 = 57,912,852,480;
    # full = none + 2·32·218,103,808 + 12,884,901,888/3 = none + 13,958,643,712 + 4,294,967,296.
    ("llama-3-8b", 8192, 57_912_852_480, 76_166_463_488),
])
def test_full_recompute_repeats_the_layers_forward_not_the_head(name, seq, none, full):
    model = load_model(name)
    assert training_flops_per_token(model, seq, "none") == none
    assert training_flops_per_token(model, seq, "full") == full
    # the ratio is below 4/3 by the head's share: (4/3 − ratio)·none = head forward 2·V·h
    head_forward = 2 * model.vocab_size * model.hidden_size
    assert 4 / 3 * none - full == pytest.approx(head_forward, rel=1e-12)
    assert training_flops_per_token(model, seq, "selective") == none + model.attention_flops_per_token(seq) // 3


def test_ring_collective_volumes():
    assert ring_all_reduce_bytes(1000.0, 4) == 1500.0  # 2·3/4·G
    assert ring_gather_bytes(1000.0, 4) == 750.0
    assert ring_all_reduce_bytes(1000.0, 1) == 0.0


@pytest.mark.parametrize(("p", "m", "fraction"), [(1, 8, 0.0), (4, 4, 3 / 7), (8, 64, 7 / 71)])
def test_bubble_fraction(p, m, fraction):
    assert pipeline_bubble_fraction(p, m) == pytest.approx(fraction)


def _single_gpu():
    return StepTimeModel(gpt(layers=24, hidden=2304, heads=24), a100_cluster(1, per_node=1), seq_len=S)


def test_single_gpu_step_is_compute_plus_optimizer_and_mfu_is_palm():
    model = _single_gpu()
    triad = BatchTriad(micro_batch_sequences=4, grad_accum_steps=2, data_parallel_ranks=1, seq_len_tokens=S)
    step = model.estimate(RunSettings(), triad)
    assert step.dp_comm_s == step.tp_comm_s == step.bubble_s == step.ep_comm_s == step.cp_comm_s == 0.0
    assert step.step_time_s == pytest.approx(step.compute_s + step.optimizer_s)
    # the compute is the sum of its op classes; the efficiency is what it implies: FLOPs / (peak × compute)
    assert sum(step.compute_by_op_s.values()) == pytest.approx(step.compute_s)
    assert step.efficiency == pytest.approx(step.flops_per_step / (312e12 * step.compute_s))
    # PaLM App. B: tokens/s × model FLOPs per token / peak
    flops_per_token = model.model.flops_per_token(S)
    assert step.mfu == pytest.approx(step.tokens_per_s * flops_per_token / 312e12)
    assert step.tflops_per_gpu == pytest.approx(step.flops_per_step / step.step_time_s / 1e12)
    assert step.kernel_profile == "ampere"  # the fixture's display name is an A100's


def test_optimizer_step_is_memory_bound_adamw():
    """32 bytes per parameter at the profile's achieved DRAM bandwidth (88 % of the A100's 2.039 TB/s)."""
    model = _single_gpu()
    triad = BatchTriad(micro_batch_sequences=1, grad_accum_steps=1, data_parallel_ranks=1, seq_len_tokens=S)
    step = model.estimate(RunSettings(), triad)
    assert step.optimizer_s == pytest.approx(model.model.params_total * 32 / (2.039e12 * 0.88))


def test_calibration_replaces_the_compute_and_keeps_its_split():
    flat = Calibration(points=(EfficiencyPoint(tokens_per_micro_batch=1, efficiency=0.25),))
    base = _single_gpu()
    calibrated = StepTimeModel(base.model, base.cluster, seq_len=S, calibration=flat)
    triad = BatchTriad(micro_batch_sequences=2, grad_accum_steps=1, data_parallel_ranks=1, seq_len_tokens=S)
    step, default = calibrated.estimate(RunSettings(), triad), base.estimate(RunSettings(), triad)
    assert step.efficiency == 0.25
    assert step.compute_s == pytest.approx(step.flops_per_step / (312e12 * 0.25))
    for op, seconds in default.compute_by_op_s.items():  # the per-op model's proportions, scaled
        assert step.compute_by_op_s[op] / step.compute_s == pytest.approx(seconds / default.compute_s)


def test_pipeline_bubble_is_p_minus_1_stage_times():
    model = StepTimeModel(gpt(layers=48, hidden=8192, heads=64), a100_cluster(4), seq_len=S)
    settings = RunSettings(tp=8, pp=4)
    for m in (4, 16):
        triad = BatchTriad(micro_batch_sequences=1, grad_accum_steps=m, data_parallel_ranks=1, seq_len_tokens=S)
        step = model.estimate(settings, triad)
        stage = (step.compute_s + step.tp_comm_s) / m  # TP collectives are exposed: part of a stage-time
        assert step.bubble_s == pytest.approx(3 * stage)
        pipelined = m * stage + step.bubble_s
        assert step.bubble_s / pipelined == pytest.approx(pipeline_bubble_fraction(4, m))


def test_recompute_costs_time_and_more_tp_costs_communication():
    model = StepTimeModel(gpt(layers=40, hidden=6144, heads=48), a100_cluster(4), seq_len=S)
    triad = BatchTriad(micro_batch_sequences=1, grad_accum_steps=32, data_parallel_ranks=4, seq_len_tokens=S)
    plain = model.estimate(RunSettings(tp=8), triad)
    full = model.estimate(dataclasses.replace(RunSettings(tp=8), recompute="full"), triad)
    selective = model.estimate(dataclasses.replace(RunSettings(tp=8), recompute="selective"), triad)
    assert plain.step_time_s < selective.step_time_s < full.step_time_s
    assert full.tp_comm_s == pytest.approx(plain.tp_comm_s * 6 / 4)  # 2 more collectives per layer
    # full recomputation repeats every forward op of the layers: 1/3 more GEMM time in the layers
    assert full.compute_by_op_s["attention"] > plain.compute_by_op_s["attention"]
    assert full.mfu < plain.mfu and full.tflops_per_gpu > plain.tflops_per_gpu * 0.99


def test_interleaved_schedule_divides_the_bubble_by_v():
    """Narayanan et al. 2021 §2.2.2: v model chunks per rank (settings ``vpp``) cut the bubble to (p − 1)/v
    stage-times and multiply the pipeline sends by v (overlapped with compute under interleaving); vpp = 1 (the
    default) is plain 1F1B."""
    model = StepTimeModel(gpt(layers=48, hidden=8192, heads=64), a100_cluster(4), seq_len=S)
    triad = BatchTriad(micro_batch_sequences=1, grad_accum_steps=8, data_parallel_ranks=1, seq_len_tokens=S)
    plain = model.estimate(RunSettings(tp=8, pp=4), triad)
    assert model.estimate(RunSettings(tp=8, pp=4, vpp=1), triad) == plain
    inter = model.estimate(RunSettings(tp=8, pp=4, vpp=4), triad)
    assert inter.bubble_s == pytest.approx(plain.bubble_s / 4)
    assert inter.compute_s == pytest.approx(plain.compute_s)
    assert inter.step_time_s < plain.step_time_s
    with pytest.raises(SpecError, match="--vpp 0 must be a positive integer"):
        RunSettings(tp=8, pp=4, vpp=0)
    with pytest.raises(SpecError, match="needs --pp > 1"):
        RunSettings(vpp=2)


def test_dualpipe_bubble_is_deepseek_v3_table_2():
    """DeepSeek-V3 (arXiv:2412.19437) Table 2: DualPipe's bubble is (p/2 − 1)·(F&B + B − 3W). With F&B = F + B
    (overlapped chunks still compute both) and W = B/2: (p/2 − 1)·(F + B/2) against 1F1B's (p − 1)·(F + B)."""
    from batchpilot.estimate.steptime import default_implementation

    model = gpt(layers=48, hidden=8192, heads=64)
    settings = RunSettings(tp=8, pp=8)
    base = StepTimeModel(model, a100_cluster(8), seq_len=S)
    dual = StepTimeModel(model, a100_cluster(8), seq_len=S, implementation=dataclasses.replace(
        default_implementation(settings, base.profile), dualpipe=True))
    triad = BatchTriad(micro_batch_sequences=1, grad_accum_steps=32, data_parallel_ranks=1, seq_len_tokens=S)
    one_f_one_b, dualpipe = base.estimate(settings, triad), dual.estimate(settings, triad)
    micro = base._micro(settings, 1)
    stage = (one_f_one_b.compute_s + one_f_one_b.tp_comm_s) / 32
    assert one_f_one_b.bubble_s == pytest.approx(7 * stage)
    share = (micro.forward_s + micro.backward_s / 2) / (micro.forward_s + micro.backward_s)
    assert dualpipe.bubble_s == pytest.approx(3 * share * stage)
    assert dualpipe.step_time_s < one_f_one_b.step_time_s


def test_step_record_is_flat_numbers_with_the_parts():
    model = StepTimeModel(gpt(layers=24, hidden=2304, heads=24), a100_cluster(2), seq_len=S)
    triad = BatchTriad(micro_batch_sequences=2, grad_accum_steps=2, data_parallel_ranks=4, seq_len_tokens=S)
    step = model.estimate(RunSettings(tp=4, zero_stage=1), triad)
    record = step.to_dict()
    assert all(isinstance(v, float) for v in record.values())
    assert {"compute_gemm_s", "compute_attention_s", "compute_elementwise_s", "exposed_tp_s", "exposed_dp_s",
            "bubble_s", "step_time_s"} <= set(record)
    assert record["exposed_tp_s"] == step.tp_comm_s and record["exposed_dp_s"] == step.dp_exposed_s
    parts = sum(v for k, v in record.items() if k.startswith(("compute_", "exposed_")) and k != "compute_s")
    assert parts + step.bubble_s + step.optimizer_s == pytest.approx(step.step_time_s)


def test_gradient_reduction_hides_behind_the_backward_but_pays_the_fitted_interference():
    """ZeRO-0 across 8 nodes × 1 GPU: the bucketed all-reduce runs during the last micro-batch's backward; what
    it hides still costs ``overlap_interference`` of its time (batchpilot.estimate.fitted)."""
    from batchpilot.estimate.fitted import FittedConstants

    model = gpt(layers=24, hidden=2304, heads=24)
    triad = BatchTriad(micro_batch_sequences=8, grad_accum_steps=1, data_parallel_ranks=8, seq_len_tokens=S)
    free = FittedConstants(sustained_fraction=1.0, overlap_interference=0.0)
    costly = FittedConstants(sustained_fraction=1.0, overlap_interference=1.0)
    steps = [StepTimeModel(model, a100_cluster(8, per_node=1), seq_len=S, fitted=f).estimate(RunSettings(), triad)
             for f in (free, costly)]
    assert steps[0].dp_comm_s == pytest.approx(steps[1].dp_comm_s)
    hidden = steps[0].dp_comm_s - steps[0].dp_exposed_s
    assert hidden > 0 and steps[1].dp_exposed_s == pytest.approx(steps[0].dp_comm_s)  # interference 1: all of it
