"""Records as the stages write them, for the record, report and tune tests (written through the writers).

The numbers are one consistent, hand-derived tune run of tiny-llama-1m at sequence 64 on a CPU, not
measurements: peak(b) = 100 MiB + 30 MiB·b fits a 900 MiB budget up to b = 26, so of the trials 4…32 the
largest that fits is 24; tokens/s = 1000·b/(1 + 0.05·b) rises with b (16 → 8889, 24 → 10909: 16 is not
within 3 % of the best), so the knee is 24; the noise run measures at micro-batch 24 (B_small) and 48 (B_big),
B_simple = 21.5 sequences × 64 loss tokens = 1376 tokens; tune's target round(21.5 / 24) × 24 = 24 sequences,
so the plan is 24 × 1 × 1 = 24 sequences = 1536 tokens.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from batchpilot.records.memory_curve import MemoryCurve
from batchpilot.records.noise import NoiseBand, NoisePriors, NoiseRecord, TradeoffRow, TrajectoryPoint
from batchpilot.records.plan import PlanMemory, PlanRecord, PlanRejection, PlanRow, PlanSearch, PlanTarget
from batchpilot.records.probe import ProbeResult, ProbeTrial
from batchpilot.records.train_summary import TrainNoiseScale, TrainSummary
from batchpilot.records.tune_state import StageRecord, TuneRunRecord, TuneSettings
from batchpilot.records.verify import VerifyMeasurement, VerifyPrediction, VerifyRecord
from batchpilot.specs.settings import RunSettings

MIB = 2**20
MODEL = "tiny-llama-1m"
SEQ = 64
SETTINGS = RunSettings(precision="fp32", attention="flash")
SIZES = (4, 8, 16, 24, 32)


def _fits(b: int) -> bool:
    return b <= 24


def probe(**changes: Any) -> ProbeResult:
    trials = tuple(
        ProbeTrial(micro_batch=b, fits=_fits(b), peak_bytes=(100 + 30 * b) * MIB if _fits(b) else None,
                   tokens_per_s=1000.0 * b / (1 + 0.05 * b) if _fits(b) else None, seconds=1.0,
                   phase="search" if b in (24, 32) else "knee",
                   error=None if _fits(b) else "DefaultCPUAllocator: can't allocate memory",
                   peak_source="address-space" if _fits(b) else None)
        for b in SIZES)
    result = ProbeResult(max_micro_batch=24, knee_micro_batch=24, predicted_max_micro_batch=24, search_trials=2,
                         trials=trials, device="cpu", budget_bytes=900 * MIB, model=MODEL, seq_len=SEQ,
                         wall_seconds=5.0, search_seconds=2.0, settings=SETTINGS)
    return replace(result, **changes)


def memory_curve(**changes: Any) -> MemoryCurve:
    curve = MemoryCurve(micro_batches=SIZES, analytic=tuple((95 + 31 * b) * MIB for b in SIZES),
                        traced=tuple((100 + 30 * b) * MIB for b in SIZES), model=MODEL, seq_len=SEQ, device="cpu",
                        settings=SETTINGS)
    return replace(curve, **changes)


def noise(**changes: Any) -> NoiseRecord:
    b, tokens = 21.5, 64.0
    steps = 20
    record = NoiseRecord(
        steps_measured=steps, effective_steps=float(steps), grad_sq_norm=0.2, trace_cov=0.2 * b,
        tokens_per_sequence=tokens, b_simple_sequences=b, b_simple_tokens=b * tokens,
        band=NoiseBand(sequences=(15.0, 30.0), tokens=(15.0 * tokens, 30.0 * tokens), level=0.95, ratio=2.0),
        confident=True, model=MODEL, model_source="random-init", data="stdlib", seq_len=SEQ,
        micro_batch_sequences=24, global_batch_sequences=48, seed=0, b_crit_sequences=b, b_crit_tokens=b * tokens,
        tradeoff=tuple(TradeoffRow(batch_sequences=n, batch_tokens=n * SEQ, steps_vs_min=1 + b / n,
                                   examples_vs_min=1 + n / b) for n in (5, 11, 22, 43, 48, 86)),
        priors=NoisePriors(kaplan_b_crit_tokens=1.0e6, kaplan_note="Kaplan et al. 2020 Eq. 5.1"),
        loss_first=5.6, loss_last=4.1,
        trajectory=tuple(TrajectoryPoint(step=s, loss=5.6 - 0.075 * s, b_simple=5.0 + s) for s in range(1, steps + 1)),
        noise_overhead_s=0.4, elapsed_s=12.0)
    return replace(record, **changes)


def plan_row(**changes: Any) -> PlanRow:
    memory = PlanMemory(weights=4 * MIB, gradients=4 * MIB, optimizer=8 * MIB, activations=480 * MIB, overhead=0,
                        total=496 * MIB)
    row = PlanRow(micro_batch=24, grad_accum=1, dp=1, tp=1, pp=1, vpp=1, ep=1, zero_stage=0, recompute="none",
                  global_batch_sequences=24, global_batch_tokens=24 * SEQ, deviation=0.0, memory=memory,
                  flops_per_step=1.0e11, step_time_s=0.2, tokens_per_s=24 * SEQ / 0.2, tflops_per_gpu=0.5, mfu=0.21,
                  step={"step_time_s": 0.2, "compute_s": 0.19, "optimizer_s": 0.01}, settings=SETTINGS)
    return replace(row, **changes)


def plan(**changes: Any) -> PlanRecord:
    record = PlanRecord(
        model=MODEL, cluster={"accelerator": "cpu", "devices_per_node": 1, "num_nodes": 1, "total_devices": 1},
        seq_len=SEQ, target=PlanTarget(global_batch_sequences=24, global_batch_tokens=24 * SEQ, max_deviation=0.0),
        headroom=0.0, budget_bytes=904 * MIB, calibration="batchpilot probe on cpu", pins={"micro_batch": 24},
        settings=SETTINGS, plans=(plan_row(),), rationale="micro-batch 24 is the knee",
        rejected=(PlanRejection(tp=1, pp=1, vpp=1, ep=1, dp=1, zero_stage=0, recompute="full", kind="batch",
                                reason="no micro-batch up to 24 reaches 24 sequences in whole accumulation steps"),),
        rejected_total=1, search=PlanSearch(layouts=2, memory_evaluations=4, pruned=0, feasible=1),
        target_source="noise (B_simple)")
    return replace(record, **changes)


def summary(**changes: Any) -> TrainSummary:
    record = TrainSummary(
        steps=10, tokens=10 * 24 * SEQ, target_tokens=10 * 24 * (SEQ - 1), final_loss=3.0, val_loss=3.1,
        tokens_per_s=10000.0, padding_fraction=0.0, elapsed_s=2.0, peak_memory_bytes=700 * MIB, world_size=1,
        device="cpu", model_params=1_000_000, model_source="random-init", tokenizer="bytes", train_documents=90,
        val_documents=10, corpus_tokens=500_000, batch_schedule="constant:24", stopped_by_signal=None,
        elastic_restarts=0, out="runs/tune/train",
        config={"model": {"model": MODEL}, "data": {"data": "stdlib", "seq_len": SEQ}, "optim": {"precision": "fp32"}},
        noise_scale=TrainNoiseScale(every=4, note="measured on one step in 4 (micro-batch vs global batch)",
                                    estimate=_scale()))
    return replace(record, **changes)


def _scale() -> Any:
    from batchpilot.records.noise import NoiseScale

    n = noise()
    return NoiseScale(steps_measured=2, effective_steps=2.0, grad_sq_norm=n.grad_sq_norm, trace_cov=n.trace_cov,
                      tokens_per_sequence=n.tokens_per_sequence, b_simple_sequences=n.b_simple_sequences,
                      b_simple_tokens=n.b_simple_tokens, band=n.band, confident=False)


def verify(**changes: Any) -> VerifyRecord:
    row, run = plan_row(), summary()
    record = VerifyRecord(summary=run, predicted=VerifyPrediction(tokens_per_s=row.tokens_per_s,
                                                                  step_time_s=row.step_time_s, memory=row.memory),
                          measured=VerifyMeasurement(tokens_per_s=run.tokens_per_s,
                                                     peak_memory_bytes=run.peak_memory_bytes),
                          steps=10)
    return replace(record, **changes)


def tune_run(**changes: Any) -> TuneRunRecord:
    files = {"probe": "probe.json", "memory": "memory_curve.json", "noise": "noise.json", "plan": "plan.json",
             "verify": "verify.json", "report": "report.html"}
    record = TuneRunRecord(
        config=TuneSettings(model=MODEL, data="stdlib", seq_len=SEQ, device="cpu", memory_budget_bytes=900 * MIB,
                            settings=SETTINGS, gpu=None, gpus=None, time_budget_s=300.0, skip=(), reuse=False, seed=0),
        stages=tuple(StageRecord(name=n, status="ok", seconds=1.0, record=f) for n, f in files.items()))
    return replace(record, **changes)


SAMPLES = {"probe": probe, "memory_curve": memory_curve, "noise": noise, "plan": plan, "summary": summary,
           "verify": verify, "tune": tune_run}
"""Every record type, by name: a builder of a realistic value."""
