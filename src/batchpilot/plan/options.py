"""The ``plan`` flags as values, and the one function that turns them into a :class:`PlanRequest`.

``batchpilot plan`` (the CLI) and ``batchpilot serve`` (the web page and its JSON API) both build their
request here, so a flag means the same thing, and a bad value reads the same, in the terminal and in the
browser. Each face parses its text with :mod:`batchpilot.units` (``parse_count``, ``parse_whole``,
``parse_fraction``, ``parse_choice``) and decides which models and accelerators it may load (the CLI: any
preset or file; the server: presets, the catalog and uploaded configs only).

    >>> options = PlanOptions(model="tiny-llama-1m", gpu="rtx-4090", gpus=1, seq_len=256, global_batch=32)
    >>> prepared = prepare_plan(options)
    >>> prepared.request.global_batch_sequences, prepared.request.cluster.total_devices
    (32, 1)
    >>> from batchpilot.plan.planner import plan
    >>> plan_record(prepared, plan(prepared.request)).to_dict()["target"]["global_batch_sequences"]
    32

    batchpilot plan --model tiny-llama-1m --gpu rtx-4090 --gpus 1 --seq-len 256 --global-batch 32 --json
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from batchpilot.errors import SpecError
from batchpilot.estimate.calibration import (
    DEFAULT_CALIBRATION,
    Calibration,
    check_calibration_accelerator,
    load_calibration,
)
from batchpilot.plan.batch_laws import law_inputs, predict_all, spread
from batchpilot.plan.engines import DEFAULT_ENGINE, LEGACY_ENGINES, get_engine
from batchpilot.plan.priors import global_batch_from_noise, global_batch_from_prior
from batchpilot.plan.registry import target_global_batch
from batchpilot.plan.request import DEFAULT_HEADROOM, Pins, PlanRequest, PlanResult
from batchpilot.records.noise import NoiseRecord
from batchpilot.records.plan import PlanRecord
from batchpilot.specs.hardware import AcceleratorSpec, ClusterSpec, check_device_count, load_accelerator
from batchpilot.specs.model import ModelSpec, load_model
from batchpilot.specs.network import load_network
from batchpilot.specs.settings import RunSettings
from batchpilot.units import format_count, parse_bytes

DEFAULT_INTER_NODE_BANDWIDTH = "50GB"
"""Per GPU, one direction: one 400 Gb/s InfiniBand/RoCE NIC per GPU (DGX H100 reference architecture:
8 × ConnectX-7 400 Gb/s; DeepSeek-V3 §3.1 reports the same 50 GB/s IB per H800)."""

DEFAULT_GPUS_PER_NODE = 8
"""GPUs per node when not given (HGX/DGX 8-GPU baseboards); a smaller job uses part of one node."""

SOFT_TARGET_DEVIATION = 0.10
"""Default --max-deviation for targets that are estimates (--train-tokens prior, --noise measurement):
their own uncertainty is far larger (DeepSeek LLM Fig. 3 shows a wide near-optimal band)."""

_DEFAULT_SETTINGS = RunSettings()


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanOptions:
    """Everything ``batchpilot plan`` is given, as values (the flag of each field is its name with dashes)."""

    model: str | ModelSpec
    """A preset name or config path (loaded by :func:`~batchpilot.specs.model.load_model`), or a spec already
    built (an uploaded ``config.json``)."""
    gpu: str | AcceleratorSpec
    """A catalog name or accelerator file, or a spec already loaded."""
    seq_len: int
    """Tokens per sequence."""
    gpus: int = 1
    """GPUs in the job."""
    gpus_per_node: int = DEFAULT_GPUS_PER_NODE
    inter_node_bandwidth_bytes_per_s: int = parse_bytes(DEFAULT_INTER_NODE_BANDWIDTH)
    """Per GPU, one direction."""
    network: str | None = None
    """The scale-out network between nodes (``batchpilot hardware networks``): its per-GPU link peak replaces the
    default ``inter_node_bandwidth_bytes_per_s`` and the step-time model uses its measured achieved fraction."""
    global_batch_tokens: int | None = None
    """Target global batch in tokens (one target of the five)."""
    global_batch: int | None = None
    """Target global batch in sequences."""
    like: str | None = None
    """A published model's batch (``batchpilot known``)."""
    train_tokens: int | None = None
    """Training tokens D: the DeepSeek LLM scaling-law prior."""
    noise: Path | None = None
    """A ``batchpilot noise --json`` file: its measured B_simple."""
    pins: Pins = field(default_factory=Pins)
    """Choices fixed by the user; the rest is searched."""
    precision: str = _DEFAULT_SETTINGS.precision
    optimizer: str = _DEFAULT_SETTINGS.optimizer
    engine: str = DEFAULT_ENGINE
    """The engine that will run the plan (:data:`~batchpilot.plan.engines.ENGINE_NAMES`; the memory bookkeeping
    follows from it); the earlier bookkeeping names ``torch`` and ``fsdp2`` mean ``batchpilot`` and ``torchtitan``."""
    hybrid_shard: bool = _DEFAULT_SETTINGS.hybrid_shard
    sp: bool = _DEFAULT_SETTINGS.sp
    attention: str = _DEFAULT_SETTINGS.attention
    offload: bool = _DEFAULT_SETTINGS.offload
    recompute_every: int = _DEFAULT_SETTINGS.recompute_every
    """Checkpoint 1 layer in N (applies to the searched or pinned recompute policies other than none)."""
    compile: bool = _DEFAULT_SETTINGS.compile
    fp8_recipe: str | None = _DEFAULT_SETTINGS.fp8_recipe
    fp8_all_gather: bool = _DEFAULT_SETTINGS.fp8_all_gather
    reshard_after_forward: str = _DEFAULT_SETTINGS.reshard_after_forward
    loss: str = _DEFAULT_SETTINGS.loss
    loss_chunks: int = _DEFAULT_SETTINGS.loss_chunks
    param_dtype: str = _DEFAULT_SETTINGS.param_dtype
    headroom: float = DEFAULT_HEADROOM
    """Fraction of device memory kept free."""
    max_deviation: float | None = None
    """Allowed relative deviation from the target; None: 0, or :data:`SOFT_TARGET_DEVIATION` for estimates."""
    calibration: Path | None = None
    """A ``probe --calibration-out`` file measured on ``gpu``."""
    top: int = 5
    """Plans returned."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PreparedPlan:
    """A request ready for :func:`~batchpilot.plan.planner.plan`, with what the record says about its target."""

    request: PlanRequest
    source: str = ""
    """Where the target comes from, for display (empty for a batch given directly)."""
    target_record: Mapping[str, Any] = field(default_factory=dict)
    """Extra keys of the record's ``target`` (the prior's or the measurement's suggestion)."""
    warnings: tuple[str, ...] = ()


def build_cluster(gpu: str | AcceleratorSpec, gpus: int, gpus_per_node: int,
                  inter_node_bandwidth_bytes_per_s: int, network: str | None = None) -> ClusterSpec:
    """The cluster the flags describe: ``gpus`` GPUs in nodes of ``gpus_per_node`` (a smaller job: part of one),
    joined by ``network`` (a scale-out catalog network or file; its per-GPU link peak is the inter-node bandwidth
    unless ``inter_node_bandwidth_bytes_per_s`` differs from the default)."""
    check_device_count(gpus)
    per_node = gpus_per_node
    if isinstance(per_node, bool) or not isinstance(per_node, int) or per_node < 1:
        raise SpecError(f"--gpus-per-node {per_node!r} must be a positive integer")
    per_node = min(per_node, gpus)  # a job smaller than a node uses part of one node
    if gpus % per_node:
        fixes = sorted({g for g in (gpus - gpus % per_node, gpus + per_node - gpus % per_node) if g > 0})
        raise SpecError(f"--gpus {gpus} is not a multiple of --gpus-per-node {per_node}; "
                        f"use --gpus {' or '.join(map(str, fixes))}")
    nodes = gpus // per_node
    bandwidth = float(inter_node_bandwidth_bytes_per_s)
    fabric = None
    if network is not None:
        fabric = load_network(network)
        if fabric.scope != "scale-out":
            raise SpecError(f"--network {network} is a {fabric.scope} NVLink domain of {fabric.gpus_per_node} GPUs, "
                            f"not a network between nodes; give its size as --gpus-per-node {fabric.gpus_per_node} "
                            f"and name the fabric between domains (batchpilot hardware networks)")
        if inter_node_bandwidth_bytes_per_s == parse_bytes(DEFAULT_INTER_NODE_BANDWIDTH):
            bandwidth = fabric.per_gpu_bandwidth_bytes_per_s
    accelerator = gpu if isinstance(gpu, AcceleratorSpec) else load_accelerator(gpu)
    return ClusterSpec(accelerator=accelerator, devices_per_node=per_node, num_nodes=nodes,
                       inter_node_bandwidth_bytes_per_s=bandwidth if nodes > 1 else None, network=fabric)


@dataclass(frozen=True, kw_only=True, slots=True)
class _Target:
    sequences: int | None = None
    tokens: int | None = None
    source: str = ""
    soft: bool = False
    """An estimate (prior or measurement) rather than a user's exact batch."""
    record: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


def _target(options: PlanOptions, model: ModelSpec) -> _Target:
    o = options
    given = [name for name, v in (("--global-batch-tokens", o.global_batch_tokens), ("--global-batch", o.global_batch),
                                  ("--like", o.like), ("--train-tokens", o.train_tokens), ("--noise", o.noise))
             if v is not None]
    if len(given) != 1:
        raise SpecError(f"give exactly one target global batch: --global-batch-tokens, --global-batch, --like, "
                        f"--train-tokens or --noise (got {', '.join(given) or 'none'})")
    if o.global_batch_tokens is not None:
        return _Target(tokens=o.global_batch_tokens)
    if o.global_batch is not None:
        return _Target(sequences=o.global_batch)
    if o.like is not None:
        sequences, _tokens, entry = target_global_batch(o.like, o.seq_len)
        return _Target(sequences=sequences,
                       source=f"published batch of {entry.name} ({entry.source.title}, {entry.source.section})")
    if o.train_tokens is not None:
        prior = global_batch_from_prior(num_layers=model.num_layers, hidden_size=model.hidden_size,
                                        seq_len=o.seq_len, train_tokens=o.train_tokens)
        lr = f", peak LR {prior.learning_rate:.2e}" if prior.learning_rate else ""
        laws = predict_all(law_inputs(model, train_tokens=o.train_tokens, seq_len=o.seq_len))
        others = ", ".join(f"{p.law} {format_count(p.batch_tokens)}" for p in laws if p.law != "deepseek-llm-2024")
        ratio, lo, hi = spread(laws)
        return _Target(sequences=prior.batch_sequences, soft=True,
                       record={"prior": {**prior.to_dict(), "laws": [dataclasses.asdict(p) for p in laws]}},
                       source=f"DeepSeek LLM prior B_opt = 0.2920·C^0.3271 = {format_count(prior.batch_tokens)} "
                              f"tokens at C = {prior.compute_flops:.2e} FLOPs{lr}; other published laws: {others} "
                              f"tokens ({ratio:.1f}× apart, {lo} … {hi}; benchmarks/results/batch_laws.md)")
    assert o.noise is not None  # one target is given (checked above)
    return _noise_target(o.noise, o.seq_len)


def _noise_target(noise: Path, seq_len: int) -> _Target:
    record = NoiseRecord.load(noise)
    suggestion = global_batch_from_noise(record, seq_len=seq_len, where=f"noise file {str(noise)!r}")
    warnings: tuple[str, ...] = ()
    if record.seq_len is not None and record.seq_len != seq_len:
        warnings = (f"the noise file was measured at seq {record.seq_len}, planning at --seq-len {seq_len}: "
                    f"B_simple in tokens scales with the tokens per sequence",)
    return _Target(sequences=suggestion.batch_sequences, soft=True, record={"noise": suggestion.to_dict()},
                   warnings=warnings, source=f"measured B_simple ≈ B_crit = {record.b_simple_sequences:.0f} sequences "
                                             f"({record.steps_measured} steps, {noise})")


def _calibration(path: Path | None, cluster: ClusterSpec) -> tuple[Calibration, tuple[str, ...]]:
    """The --calibration file, refused unless it was measured on --gpu (warned when it records none)."""
    if path is None:
        return DEFAULT_CALIBRATION, ()
    calibration = load_calibration(path)
    warning = check_calibration_accelerator(calibration, cluster.accelerator.name,
                                            where=f"calibration file {str(path)!r}")
    return calibration, (warning,) if warning else ()


def plan_settings(options: PlanOptions) -> RunSettings:
    """The run settings of the flags (the layout comes from the search or the pins)."""
    o = options
    every = o.recompute_every
    bookkeeping = get_engine(o.engine).shardings[0].bookkeeping  # the search picks each scheme's own
    return RunSettings(precision=o.precision.lower(), optimizer=o.optimizer.lower(),  # type: ignore[arg-type]
                       engine=bookkeeping, hybrid_shard=o.hybrid_shard, sp=o.sp,
                       attention=o.attention.lower(), offload=o.offload,  # type: ignore[arg-type]
                       zero_stage=1 if o.offload else 0,
                       recompute="full" if every > 1 else "none", recompute_every=every, compile=o.compile,
                       fp8_recipe=o.fp8_recipe.lower() if o.fp8_recipe else None,  # type: ignore[arg-type]
                       fp8_all_gather=o.fp8_all_gather,
                       reshard_after_forward=o.reshard_after_forward.lower(),  # type: ignore[arg-type]
                       loss=o.loss.lower(), loss_chunks=o.loss_chunks,  # type: ignore[arg-type]
                       param_dtype=o.param_dtype.lower())  # type: ignore[arg-type]


def prepare_plan(options: PlanOptions) -> PreparedPlan:
    """The :class:`PlanRequest` of ``options``; every bad value is a one-line :class:`SpecError` (or another
    :class:`~batchpilot.errors.BatchpilotError`) naming the flag, the rule and the fix."""
    o = options
    spec = o.model if isinstance(o.model, ModelSpec) else load_model(o.model)
    target = _target(o, spec)
    deviation = o.max_deviation if o.max_deviation is not None else SOFT_TARGET_DEVIATION if target.soft else 0.0
    settings = plan_settings(o)
    cluster = build_cluster(o.gpu, o.gpus, o.gpus_per_node, o.inter_node_bandwidth_bytes_per_s, o.network)
    measured, calibration_warnings = _calibration(o.calibration, cluster)
    request = PlanRequest(
        model=spec, cluster=cluster, seq_len=o.seq_len, global_batch_sequences=target.sequences,
        global_batch_tokens=target.tokens, settings=settings, pins=o.pins, headroom=o.headroom,
        max_deviation=deviation, calibration=measured, top=o.top, engine=get_engine(o.engine).name,
    )
    legacy = o.engine.strip().lower()
    renamed = (f"--engine {legacy} named the memory bookkeeping; it now names the engine that runs the plan: "
               f"--engine {LEGACY_ENGINES[legacy]}",) if legacy in LEGACY_ENGINES else ()
    return PreparedPlan(request=request, source=target.source, target_record=target.record,
                        warnings=(*renamed, *target.warnings, *calibration_warnings))


def plan_record(prepared: PreparedPlan, result: PlanResult, *, export: str | None = None,
                out: str | None = None) -> PlanRecord:
    """The ``plan --json`` record of ``result``: the target's source, the warnings and the export named."""
    base = result.to_record()
    return replace(base, target=replace(base.target, source=prepared.source, **prepared.target_record),
                   warnings=(*prepared.warnings, *result.warnings),
                   export={"format": export, "path": str(out)} if export else None)
