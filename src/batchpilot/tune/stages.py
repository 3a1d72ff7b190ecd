"""The stages of ``batchpilot tune``: each runs one library function and returns its typed record.

probe  → the largest micro-batch that really fits, tokens/s per size, the knee, a calibration (ProbeResult)
memory → analytic and traced estimates at the probed sizes, in the probe's convention (MemoryCurve)
noise  → the gradient noise scale B_simple ≈ critical batch, on the user's model and data (NoiseRecord)
plan   → the triad for this device (calibrated by the probe) and, with --gpu/--gpus, for the cluster (PlanRecord)
verify → a short training run with the chosen plan: measured tokens/s and memory vs predicted (VerifyRecord)

Later stages read earlier ones from :class:`TuneState`, typed, whether a stage ran now or its record was
reused (:mod:`batchpilot.tune.reuse`).
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchpilot.errors import BatchpilotError
from batchpilot.estimate.calibration import DEFAULT_CALIBRATION, Calibration, calibration_from_dict
from batchpilot.measure.probe import ProgressHook
from batchpilot.measure.probe_types import Device, ProbeRequest
from batchpilot.records.memory_curve import MemoryCurve
from batchpilot.records.noise import NoiseRecord
from batchpilot.records.plan import PlanRecord, PlanRow
from batchpilot.records.probe import ProbeResult
from batchpilot.records.train_summary import TrainSummary
from batchpilot.records.verify import VerifyMeasurement, VerifyPrediction, VerifyRecord
from batchpilot.specs.finetune import format_finetune
from batchpilot.specs.model import ModelSpec, load_model
from batchpilot.tune.config import CPU_DEFAULT_BUDGET_BYTES, TIME_SHARES, TuneConfig
from batchpilot.units import format_bytes

if TYPE_CHECKING:
    from batchpilot.train.config import TrainConfig

LOCAL_EXPORTS = ("torchrun", "hf")
MIN_MEMORY_STAGE_S = 60.0
"""Traces of a small model take seconds each; give the memory curve at least this long."""
CLUSTER_EXPORTS = ("torchrun", "hf", "accelerate", "hf-deepspeed", "deepspeed", "lightning", "torchtitan", "megatron")
NOISE_KNEE_WITHOUT_PROBE = 4
"""Micro-batch (B_small) of the noise run when the probe did not run: the ``batchpilot noise`` default."""


@dataclass(kw_only=True, slots=True)
class TuneState:
    """What earlier stages found, for the later ones (set by a stage, or from its record when reused)."""

    model: ModelSpec
    """The model being tuned."""
    device: Device = "cpu"
    """The local device (``auto`` resolved)."""
    request: ProbeRequest | None = None
    """The probe's request, built once (:func:`probe_request`): its budget and the trial convention."""
    probe: ProbeResult | None = None
    """The probe record."""
    calibration: Calibration = DEFAULT_CALIBRATION
    """The probe's calibration of the local device (the default curve without a probe)."""
    peak_flops_per_s: float | None = None
    """The local device's peak the calibration's efficiencies are relative to."""
    memory: MemoryCurve | None = None
    """The memory curve."""
    noise: NoiseRecord | None = None
    """The noise measurement."""
    plan: PlanRecord | None = None
    """The local plan (and the cluster plan inside it)."""


def new_state(cfg: TuneConfig) -> TuneState:
    from batchpilot.measure.device import resolve_device

    model = load_model(cfg.model)
    if cfg.seq_len > model.max_position_embeddings:  # every measuring stage would fail on it, minutes apart
        raise BatchpilotError(f"--seq-len {cfg.seq_len} exceeds {model.name}'s max_position_embeddings "
                              f"{model.max_position_embeddings}; use --seq-len ≤ {model.max_position_embeddings}")
    if cfg.gpu:  # an unknown target accelerator fails now, not after the probe and noise stages have run
        from batchpilot.specs.hardware import load_accelerator

        load_accelerator(cfg.gpu)
    state = TuneState(model=model, device=resolve_device(cfg.device))
    if "probe" not in cfg.skip and not (cfg.reuse and (cfg.out / "probe.json").is_file()):
        from batchpilot.measure.probe_types import check_supported

        try:  # a setting the probe cannot run failed its stage only after the noise stage had trained
            check_supported(cfg.settings, state.device)
        except BatchpilotError as exc:
            raise BatchpilotError(f"tune: {str(exc).replace('; probe with another', '; tune with another')}") from None
    check_fits_here(cfg, state)
    return state


MEASURING_STAGES = ("probe", "noise", "verify")
"""The stages that train on this machine."""


def check_fits_here(cfg: TuneConfig, state: TuneState) -> None:
    """Refuse, before any stage starts, a model whose smallest training step (micro-batch 1, analytic) exceeds
    this machine — the available RAM on a CPU (``MemAvailable``), the free memory on a GPU — or, when the
    probe runs, the probe's budget: such trials run for minutes and the noise run is then killed by the
    kernel's out-of-memory killer, before any record is written. The fixes are ``tune``'s own flags."""
    from batchpilot.measure.device import device_memory_bytes
    from batchpilot.measure.predict import analytic_trial_bytes

    measuring = [s for s in MEASURING_STAGES if s not in cfg.skip]
    if not measuring or (cfg.reuse and all((cfg.out / f"{s}.json").is_file() for s in measuring)):
        return
    cpu = state.device == "cpu"
    need = _step_bytes(state.model, cfg, cfg.seq_len, cpu)
    have = device_memory_bytes(state.device)
    what = "available RAM (MemAvailable)" if cpu else "free memory on the GPU"
    if need > have:
        fixes = _fixes_here(state.model, cfg, cpu, have)
        raise BatchpilotError(
            f"{state.model.name} at --seq-len {cfg.seq_len} needs {format_bytes(need)} for one training step at "
            f"micro-batch 1 ({cfg.settings.precision}, {cfg.settings.optimizer}; analytic: estimate.memory) but this "
            f"machine has {format_bytes(have)} of {what}: {', '.join(measuring)} would run out of memory; {fixes}")
    if "probe" in measuring and cfg.memory_budget_bytes is not None:
        request = probe_request(cfg, state)
        trial = analytic_trial_bytes(request, 1)
        if trial > request.budget_bytes:
            raise BatchpilotError(
                f"--memory-budget {format_bytes(request.budget_bytes)} holds no micro-batch of {state.model.name} at "
                f"--seq-len {cfg.seq_len}: micro-batch 1 needs {format_bytes(trial)} above the weights (analytic); "
                f"give --memory-budget {format_bytes(trial * 5 // 4)} or more (this machine has {format_bytes(have)} "
                f"of {what}), or a shorter --seq-len")


def _step_bytes(model: ModelSpec, cfg: TuneConfig, seq_len: int, cpu: bool) -> int:
    from batchpilot.estimate.memory import analytic_memory
    from batchpilot.estimate.overhead import OverheadModel

    return analytic_memory(model, cfg.settings, micro_batch=1, seq_len=seq_len, dp=1,
                           overhead=OverheadModel.cpu() if cpu else None).total_bytes


def _fixes_here(model: ModelSpec, cfg: TuneConfig, cpu: bool, have: int) -> str:
    """``tune``'s own flags that would fit here (a shorter --seq-len, a smaller --model), and ``plan``, which
    answers for a cluster without training."""
    shorter = next((n for n in (cfg.seq_len // 2**k for k in range(1, 12)) if n >= 2
                    and _step_bytes(model, cfg, n, cpu) <= have), None)
    seq = f"--seq-len {shorter} fits" if shorter else "no --seq-len fits"
    return (f"{seq}, or a smaller --model; `batchpilot plan --model {cfg.model} --gpu NAME --gpus N --seq-len "
            f"{cfg.seq_len}` plans a cluster without training here")


def probe_request(cfg: TuneConfig, state: TuneState) -> ProbeRequest:
    """The probe's request, built once per run: every stage that speaks the probe's convention (its budget
    above a baseline that holds the weights on CPU, :func:`batchpilot.measure.predict.baseline_model_bytes`)
    uses this one. The budget: ``--memory-budget``, else a reused probe record's, else the device default."""
    if state.request is None:
        state.request = ProbeRequest(
            model=state.model, settings=cfg.settings, seq_len=cfg.seq_len, device=state.device,
            budget_bytes=cfg.memory_budget_bytes or (state.probe.budget_bytes if state.probe else None)
            or _default_budget(state.device),
            seed=cfg.seed, trial_timeout_s=max(60.0, cfg.stage_seconds("probe")),
        )
    return state.request


def _default_budget(device: Device) -> int:
    from batchpilot.measure.device import device_memory_bytes

    return CPU_DEFAULT_BUDGET_BYTES if device == "cpu" else device_memory_bytes(device)


# ------------------------------------------------------------------------------------------- probe
def probe_stage(cfg: TuneConfig, state: TuneState, progress: ProgressHook | None = None) -> ProbeResult:
    """Real trials on the device; the calibration divides measured FLOP/s by the device's peak."""
    from batchpilot.measure.calibrate import calibration_from_probe
    from batchpilot.measure.predict import analytic_trial_bytes
    from batchpilot.measure.probe import run_probe

    request = probe_request(cfg, state)
    try:
        result = run_probe(request, progress=progress)
    except BatchpilotError as exc:  # the probe's advice names probe's flags: tune sets the trial timeout itself
        raise type(exc)(str(exc).replace(
            "raise --trial-timeout", f"raise --time-budget (tune gives each trial {request.trial_timeout_s:.0f} s, "
                                     f"{TIME_SHARES['probe']:.0%} of it, at least 60 s)")) from None
    peak, name = local_peak_flops(cfg, state)
    if peak is not None:
        calibration = calibration_from_probe(
            result, request, peak_flops_per_s=peak, accelerator=name,
            analytic_bytes=lambda b: analytic_trial_bytes(request, b))
        result = replace(result, calibration=calibration.to_dict(), peak_flops_per_s=peak)
        state.calibration, state.peak_flops_per_s = calibration, peak
    state.probe = result
    return result


def absorb_probe(record: ProbeResult, state: TuneState) -> None:
    """Take a reused probe record into the state (a fresh one is taken by :func:`probe_stage`)."""
    state.probe = record
    if record.calibration is not None and record.peak_flops_per_s is not None:
        state.calibration = calibration_from_dict(record.calibration, "probe.json calibration")
        state.peak_flops_per_s = record.peak_flops_per_s


def local_peak_flops(cfg: TuneConfig, state: TuneState) -> tuple[float | None, str]:
    """CPU: this machine's measured matmul rate. CUDA: the --gpu catalog figure (never guessed)."""
    from batchpilot.measure.cpu_runner import measure_cpu_matmul_flops

    if state.device == "cpu":
        return measure_cpu_matmul_flops(cfg.settings.precision), "cpu"
    if cfg.gpu:
        from batchpilot.specs.hardware import load_accelerator

        spec = load_accelerator(cfg.gpu)
        return spec.peak_flops_per_s(cfg.settings.precision), spec.name
    return None, ""


# ------------------------------------------------------------------------------------------- memory
def memory_stage(cfg: TuneConfig, state: TuneState) -> MemoryCurve:
    """Analytic and traced estimates at every probed size, in the probe's own convention (the CPU
    trial's baseline already holds the weights, so they are subtracted from both)."""
    from batchpilot.measure.predict import analytic_trial_bytes, baseline_model_bytes
    from batchpilot.measure.traced import traced_memory

    request = probe_request(cfg, state)
    sizes = sorted({t.micro_batch for t in state.probe.trials}) if state.probe else [1, 2, 4, 8]
    baseline = baseline_model_bytes(request)
    deadline = time.monotonic() + max(MIN_MEMORY_STAGE_S, cfg.stage_seconds("memory"))
    traced: list[int | None] = []
    for size in sizes:
        if time.monotonic() > deadline:
            traced.append(None)
            continue
        total = traced_memory(state.model, cfg.settings, micro_batch=size, seq_len=cfg.seq_len,
                              target="cuda" if state.device == "cuda" else "cpu").total_bytes
        traced.append(total - baseline)
    state.memory = MemoryCurve(micro_batches=tuple(sizes), analytic=tuple(analytic_trial_bytes(request, b) for b in sizes),
                               traced=tuple(traced), model=cfg.model, seq_len=cfg.seq_len, device=state.device,
                               settings=cfg.settings)
    return state.memory


# ------------------------------------------------------------------------------------------- plan
def local_cluster(cfg: TuneConfig, state: TuneState) -> Any:
    """The local device as a one-device cluster: its budget as memory, its measured peak."""
    from batchpilot.specs.hardware import AcceleratorSpec, ClusterSpec, FigureSource, load_accelerator

    if state.device == "cuda" and cfg.gpu:
        return ClusterSpec(accelerator=load_accelerator(cfg.gpu), devices_per_node=1)
    if state.peak_flops_per_s is None:
        raise BatchpilotError("the local plan needs the probe's measured peak; run the probe stage "
                              "(or pass --gpu NAME for a CUDA device)")
    from batchpilot.measure.predict import baseline_model_bytes

    # The probe's budget sits above a baseline that already holds the weights (measure.predict): the
    # planner's analytic total counts them, so the device's memory is budget + weights.
    request = probe_request(cfg, state)
    measured = FigureSource(url="measured by batchpilot tune on this machine", says="measured", dense=True)
    precision = cfg.settings.precision
    accel = AcceleratorSpec(
        name="cpu", display_name="this machine's CPU (measured)", vendor="local",
        memory_bytes=request.budget_bytes + baseline_model_bytes(request),
        peak_flops={precision: state.peak_flops_per_s}, memory_bandwidth_bytes_per_s=10e9,
        intra_node_bandwidth_bytes_per_s=10e9, intra_node_link="none (one device)",
        sources={"memory_bytes": measured, f"peak_flops.{precision}": measured},
        notes="memory is the probe's budget; bandwidths are placeholders unused with one device",
    )
    return ClusterSpec(accelerator=accel, devices_per_node=1)


def _knee(state: TuneState, default: int = 1) -> int:
    return state.probe.knee_micro_batch if state.probe else default


def critical_batch_sequences(state: TuneState, cfg: TuneConfig) -> int:
    """The global batch the convergence measurement asks for, at least the knee, rounded to a whole number of
    knee-sized micro-batches: the longest stage of the whole-run schedule fitted from the measurement when
    ``--train-tokens`` gave one (:mod:`batchpilot.plan.schedule_advice`), else B_simple in sequences."""
    knee = _knee(state)
    advice = state.noise.schedule if state.noise else None
    b_simple = state.noise.b_simple_sequences if state.noise else math.nan
    if advice is not None and cfg.train_tokens:
        b_simple = float(_longest_stage(advice.schedule, cfg.train_tokens - advice.starts_after_tokens))
    if not math.isfinite(b_simple) or b_simple <= 0:
        return knee
    return max(1, round(b_simple / knee)) * knee


def _longest_stage(schedule: str, tokens: float) -> int:
    """The batch of the ``steps:T=B,…`` stage that covers the most of ``tokens``."""
    stages = [(float(t), int(b)) for t, _, b in (p.partition("=") for p in schedule.partition(":")[2].split(","))]
    ends = [t for t, _ in stages[1:]] + [max(tokens, stages[-1][0])]
    return max(zip(stages, ends, strict=True), key=lambda se: se[1] - se[0][0])[0][1]


def _target_source(state: TuneState) -> str:
    if state.noise and state.noise.schedule:
        return f"noise → whole-run schedule {state.noise.schedule.schedule} (its longest stage)"
    return "noise (B_simple)" if state.noise else "probe knee (no noise measurement)"


def tune_cost(result: Any, train_tokens: int | None) -> Any:
    """With ``--train-tokens``: the plan's time, GPU-hours and cost band (:mod:`batchpilot.plan.cost`)."""
    from batchpilot.plan.cost import training_cost

    if not train_tokens or not result.plans:
        return None
    return training_cost(tokens_per_s=result.plans[0].step.tokens_per_s,
                         gpus=result.request.cluster.total_devices, train_tokens=train_tokens)


def plan_stage(cfg: TuneConfig, state: TuneState, out: Path) -> PlanRecord:
    """Plan for the local device (and the target cluster), write the exports."""
    from batchpilot.estimate.memory import OverheadModel
    from batchpilot.plan.planner import plan
    from batchpilot.plan.request import Pins, PlanRequest

    request = PlanRequest(
        model=state.model, cluster=local_cluster(cfg, state), seq_len=cfg.seq_len,
        global_batch_sequences=critical_batch_sequences(state, cfg), settings=cfg.settings,
        # a policy asked for (--recompute) stays the one the probe measured; without one the plan may still
        # recompute where the analytic estimate of the knee exceeds the budget the probe met
        pins=Pins(micro_batch=_knee(state), recompute=None if cfg.settings.recompute == "none" else cfg.settings.recompute),
        calibration=state.calibration, headroom=0.0,
        overhead=OverheadModel.cpu() if state.device == "cpu" else None, top=5, engine="batchpilot",
    )
    result = plan(request)  # what verify trains: batchpilot's runner
    _write_exports(result, out / "exports", "local", LOCAL_EXPORTS, cfg.data)
    cluster = _cluster_plan(cfg, state, out) if cfg.gpu and cfg.gpus else None
    state.plan = replace(result.to_record(), target_source=_target_source(state), cluster_plan=cluster,
                         cost=tune_cost(result, cfg.train_tokens))
    return state.plan


def _cluster_plan(cfg: TuneConfig, state: TuneState, out: Path) -> PlanRecord:
    from batchpilot.plan.planner import plan
    from batchpilot.plan.request import PlanRequest
    from batchpilot.specs.hardware import ClusterSpec, load_accelerator

    assert cfg.gpu is not None and cfg.gpus is not None
    per_node = min(cfg.gpus_per_node, cfg.gpus)
    if cfg.gpus % per_node:
        raise BatchpilotError(f"--gpus {cfg.gpus} is not a multiple of --gpus-per-node {per_node}")
    nodes = cfg.gpus // per_node
    cluster = ClusterSpec(accelerator=load_accelerator(cfg.gpu), devices_per_node=per_node, num_nodes=nodes,
                          inter_node_bandwidth_bytes_per_s=50e9 if nodes > 1 else None)
    tokens, source = _cluster_target_tokens(cfg, state)
    settings = cfg.settings if cfg.settings.precision != "fp32" else replace(cfg.settings, precision="bf16")
    request = PlanRequest(model=state.model, cluster=cluster, seq_len=cfg.seq_len, global_batch_tokens=tokens,
                          settings=settings, max_deviation=0.25, top=5, engine=cfg.engine)
    result = plan(request)
    _write_exports(result, out / "exports", "cluster", CLUSTER_EXPORTS, cfg.data)
    return replace(result.to_record(), target_source=source, cost=tune_cost(result, cfg.train_tokens))


def _cluster_target_tokens(cfg: TuneConfig, state: TuneState) -> tuple[int, str]:
    """The cluster plan's global batch in tokens, and where it came from: the DeepSeek LLM prior when
    --train-tokens is given, else the measured B_simple — but at least one sequence per GPU. B_simple
    measured over a few steps from random weights is a lower bound (the noise scale grows as the loss
    falls, McCandlish et al. 2018 §4), so below one sequence per GPU it would leave data-parallel ranks
    idle or push a model that fits on one GPU into model parallelism."""
    if cfg.train_tokens:
        from batchpilot.plan.priors import global_batch_from_prior

        suggestion = global_batch_from_prior(num_layers=state.model.num_layers, hidden_size=state.model.hidden_size,
                                             seq_len=cfg.seq_len, train_tokens=cfg.train_tokens)
        return int(suggestion.batch_tokens), "DeepSeek LLM prior (--train-tokens)"
    measured = critical_batch_sequences(state, cfg)
    floor = cfg.gpus or 1
    if measured >= floor:
        return measured * cfg.seq_len, _target_source(state)
    b_simple = state.noise.b_simple_sequences if state.noise else math.nan
    local = (f"B_simple {b_simple:.3g} from the first steps of a fresh model, in whole micro-batches of the knee "
             f"{_knee(state)}" if math.isfinite(b_simple) and b_simple > 0 else "the probe's knee; no noise measurement")
    return floor * cfg.seq_len, (f"one sequence per GPU ({floor}): the local plan's batch ({measured} sequences: "
                                 f"{local}) is below it; give --train-tokens for the scaling-law prior")


def _write_exports(result: Any, folder: Path, prefix: str, formats: tuple[str, ...], data: str) -> None:
    """Each format's export of the winner with the run's ``--data``; a format that cannot express the plan gets
    its one-line refusal as a comment."""
    from batchpilot.plan.exports import SUFFIXES, ExportError, ExportOptions, export_text

    if not result.plans:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for fmt in formats:
        try:
            text = export_text(result.plans[0], result.request, fmt, ExportOptions(data=data))
        except ExportError as exc:
            text = f"# not exportable: {exc}"
        (folder / f"{prefix}-{fmt}.{SUFFIXES[fmt]}").write_text(text + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------- noise
def _tokens_per_s_at(state: TuneState, micro_batch: int) -> float | None:
    for trial in state.probe.trials if state.probe else ():
        if trial.micro_batch == micro_batch and trial.tokens_per_s:
            return trial.tokens_per_s
    return None


def steps_within(seconds: float, tokens_per_step: int, tokens_per_s: float | None, *, lo: int, hi: int) -> int:
    """Optimizer steps that fit in ``seconds`` at the measured speed, clamped to [lo, hi]."""
    if not tokens_per_s:
        return lo
    return max(lo, min(hi, int(seconds * tokens_per_s / tokens_per_step)))


def noise_stage(cfg: TuneConfig, state: TuneState, out: Path) -> NoiseRecord:
    """B_simple over K real steps at micro-batch = the knee (B_small) and 2 × knee (B_big)."""
    from batchpilot.tune.noise_run import NoiseRunSettings, measure_noise

    knee = _knee(state, NOISE_KNEE_WITHOUT_PROBE)
    global_batch = 2 * knee
    steps = steps_within(cfg.stage_seconds("noise"), global_batch * cfg.seq_len, _tokens_per_s_at(state, knee),
                         lo=4, hi=40)
    settings = NoiseRunSettings(model=cfg.model, data=cfg.data, tokenizer=cfg.tokenizer, seq_len=cfg.seq_len,
                                micro_batch_sequences=knee, global_batch_sequences=global_batch, steps=steps,
                                seed=cfg.seed, train_tokens=float(cfg.train_tokens) if cfg.train_tokens else None,
                                out=str(_fresh_stage_dir(out / "noise-run")))
    state.noise = measure_noise(settings)
    return state.noise


def _fresh_stage_dir(path: Path) -> Path:
    """A stage's own training folder, emptied: tune re-runs a stage (unless ``--reuse``) and its earlier
    checkpoints would make the runner refuse a fresh start there."""
    shutil.rmtree(path, ignore_errors=True)
    return path


# ------------------------------------------------------------------------------------------- verify
def verify_config(cfg: TuneConfig, best: PlanRow, *, steps: int, out: Path, device: str) -> TrainConfig:
    """The verification run of the local plan ``best``: its batch and micro-batch, the tune's model, data,
    precision and fine-tuning mode, and its recomputation policy as the runner applies it (``selective``, the
    attention core, keeps what ``none`` keeps under SDPA: :class:`~batchpilot.train.config.ParallelConfig`)."""
    from batchpilot.train.config import RECOMPUTES, TrainConfig

    recompute = best.recompute if best.recompute in RECOMPUTES else "none"
    return TrainConfig().replace(
        model={"model": cfg.model, "finetune": format_finetune(cfg.settings.finetune)},
        data={"data": cfg.data, "tokenizer": cfg.tokenizer, "seq_len": cfg.seq_len},
        batch={"global_batch_sequences": best.global_batch_sequences, "micro_batch_sequences": best.micro_batch},
        optim={"precision": cfg.settings.precision if cfg.settings.precision != "fp8" else "bf16",
               "warmup_steps": max(1, steps // 10)},
        run={"steps": steps, "out": str(out), "seed": cfg.seed, "val_every": max(1, steps // 4),
             "val_rows": 16, "device": device},
        parallel={"recompute": recompute, "recompute_every": cfg.settings.recompute_every if recompute != "none" else 1},
    )


def verify_stage(cfg: TuneConfig, state: TuneState, out: Path, on_record: Any = None) -> VerifyRecord:
    """Train with the winning local plan; compare measured tokens/s and peak memory with the prediction."""
    from batchpilot.train.runner import run

    best = state.plan.best if state.plan else None
    if best is None:
        raise BatchpilotError("no plan to verify: the plan stage found none (see plan.json)")
    steps = steps_within(cfg.stage_seconds("verify"), best.global_batch_tokens,
                         _tokens_per_s_at(state, best.micro_batch), lo=5, hi=200)
    train_dir = _fresh_stage_dir(out / "train")
    config = verify_config(cfg, best, steps=steps, out=train_dir, device=state.device)
    run(config, on_record=on_record)
    summary = TrainSummary.load(train_dir / "summary.json")
    return VerifyRecord(
        summary=summary, steps=steps,
        predicted=VerifyPrediction(tokens_per_s=best.tokens_per_s, step_time_s=best.step_time_s, memory=best.memory),
        measured=VerifyMeasurement(tokens_per_s=summary.tokens_per_s, peak_memory_bytes=summary.peak_memory_bytes))
