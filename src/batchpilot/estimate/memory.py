"""Analytic per-GPU training memory: model states, activations and overhead as explicit terms.

Examples::

    >>> from batchpilot.specs.model import load_model
    >>> from batchpilot.specs.settings import RunSettings
    >>> m = analytic_memory(load_model("tiny-llama-1m"), RunSettings(precision="fp32"),
    ...                     micro_batch=4, seq_len=256, overhead=OverheadModel.cpu())
    >>> m.total_bytes > m.activations_bytes > 0
    True

The step's peak is the largest of three moments (each total is in ``details``):

- ``backward_start`` (end of forward / start of backward): weights (plus 16-bit compute copies),
  optimizer states, the gradients alive then and every tensor saved for backward plus the logits/loss
  buffers (:func:`activation_terms`, :func:`logits_terms`).
- ``backward_end``: all gradients (activations freed), plus the tied input embedding's dense gradient
  before it is added into the head's.
- ``optimizer_step``: weights, all gradients, optimizer states and the step's temporaries
  (``torch.optim.AdamW(foreach=True)`` materialises one fp32 state-sized list, ``sqrt(v)``:
  :data:`OPTIMIZER_STEP_TRANSIENT_BYTES`, measured).

Categories of the returned :class:`MemoryBreakdown` are those *of the peak moment*, so they always sum
to the peak; ``details["activations_peak"]`` keeps the activation peak even when a later moment wins and
``details["peak_phase"]`` says which won (0 backward start, 1 backward end, 2 optimizer step).

The parts: model states per engine × precision × optimizer and ZeRO stage
(:mod:`batchpilot.estimate.model_states`), activations per layer and the logits/loss buffers
(:mod:`batchpilot.estimate.activations`), and what neither counts (:mod:`batchpilot.estimate.overhead`).
This module lays them out over the pipeline stages and phases of one step.

Known error: checked against measured CPU peaks of real steps (tests/estimate/test_memory_crosscheck.py,
within 10 %); kernels that fuse more (Megatron/TE fused norms, fused cross-entropy) save less.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

from batchpilot.errors import SpecError
from batchpilot.estimate.activations import activation_terms, dropout_enabled, logits_terms
from batchpilot.estimate.breakdown import MemoryBreakdown
from batchpilot.estimate.dtypes import ACTIVATION_BYTES
from batchpilot.estimate.model_states import (
    LOOP_STEP_TRANSIENT_TENSORS,
    OPTIMIZER_STEP_TRANSIENT_BYTES,
    ModelStates,
    bytes_per_param,
    model_state_bytes,
)
from batchpilot.estimate.overhead import OverheadModel
from batchpilot.specs.batch import MAX_BATCH_SEQUENCES, check_seq_len
from batchpilot.specs.hardware import MAX_DEVICES
from batchpilot.specs.model import ModelSpec
from batchpilot.specs.settings import RunSettings, check_interleaving, validate_for_model


# ---------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True, kw_only=True, slots=True)
class _StageLayout:
    """How the run splits the model over GPUs, as far as one GPU's memory needs it."""

    tp: int
    pp: int
    ep: int
    sp: bool
    dp: int
    shard: int
    """Ranks one dense parameter's states are sharded over (ZeRO/FSDP group)."""
    expert_shard: int
    """Ranks one routed expert's states are sharded over (the expert data-parallel group)."""
    layers_per_stage: int
    in_flight: float
    """Micro-batches' worth of a whole stage's activations the first pipeline stage holds at its peak
    (:func:`first_stage_in_flight`)."""


def _stage_layout(model: ModelSpec, settings: RunSettings, dp: int, grad_accum: int, gpus_per_node: int) -> _StageLayout:
    shard = min(dp, gpus_per_node) if settings.hybrid_shard else dp
    if settings.ep > dp or dp % settings.ep:
        raise SpecError(
            f"--ep {settings.ep} must divide the {dp} data-parallel ranks experts are spread over; "
            f"use a divisor of {dp} or more GPUs"
        )
    return _StageLayout(
        tp=settings.tp, pp=settings.pp, ep=settings.ep, sp=settings.sp and settings.tp > 1, dp=dp,
        shard=max(1, shard), expert_shard=max(1, shard // settings.ep),
        layers_per_stage=math.ceil(model.num_layers / settings.pp),
        in_flight=first_stage_in_flight(settings.pp, settings.vpp, grad_accum),
    )


def first_stage_in_flight(pp: int, vpp: int, grad_accum: int) -> float:
    """Micro-batches of activations (in units of one micro-batch through all of a stage's layers) that the
    first pipeline stage holds at its peak.

    Plain 1F1B (Narayanan et al. 2021 §2.2.1): the first stage runs ``pp − 1`` warm-up forwards, then one
    more before its first backward: min(pp, m) micro-batches of m per step. Interleaved (``vpp`` = v > 1,
    §2.2.2): Megatron's warm-up on the first rank is 2·(p − 1) + (v − 1)·p chunk forwards, +1 in the steady
    state (``megatron/core/pipeline_parallel/schedules.py``), of v·m in all, each chunk L/(p·v) layers:
    min(v·m, v·p + p − 1) / v = min(m, p + (p − 1)/v) — at m ≥ p + 1 the 1F1B memory times
    1 + (p − 1)/(p·v) (Korthikanti et al. 2022 §4.2.3)."""
    if pp == 1:
        return 1.0
    if vpp == 1:
        return float(min(pp, grad_accum))
    return min(float(grad_accum), pp + (pp - 1) / vpp)


# ---------------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True, kw_only=True, slots=True)
class _StageParams:
    """Parameters one GPU of a pipeline stage holds (before ZeRO sharding)."""

    dense: float
    """Parameters replicated across data-parallel ranks (attention, dense FFNs, shared experts, router,
    norms, embeddings), already divided by tp."""
    expert: float
    """Routed-expert parameters on this GPU (divided by ep and tp)."""
    largest_layer: float
    """The largest layer's parameters on this GPU (ZeRO-3 gathers one at a time)."""
    matmul: float
    """Parameters that are matmul weights (autocast keeps 16-bit copies of these)."""


def _stage_params(model: ModelSpec, lay: _StageLayout, first: bool, last: bool) -> _StageParams:
    t, layers = lay.tp, lay.layers_per_stage
    norms = model.params_norms_per_layer
    moe_share = model.num_moe_layers / model.num_layers
    routed = model.num_experts * model.params_expert
    dense_layer = (model.params_dense_layer - norms) / t + norms
    moe_layer = (model.params_moe_layer - routed - norms) / t + norms if model.is_moe else 0.0
    routed_here = routed / (lay.ep * t)
    layers_dense = layers * ((1 - moe_share) * dense_layer + moe_share * moe_layer)
    expert = layers * moe_share * routed_here
    table = model.vocab_size * model.hidden_size / t
    positions = model.max_position_embeddings * model.hidden_size if model.learned_positions else 0
    embed = 0.0
    if lay.pp == 1:
        embed = (model.params_embedding - positions) / t + positions + model.params_final_norm
    else:
        if first:
            embed += table + positions
        if last:
            embed += table + model.params_final_norm
    largest = max(dense_layer, moe_layer + routed_here if model.is_moe else 0.0)
    return _StageParams(dense=layers_dense + embed, expert=expert, largest_layer=largest,
                        matmul=layers_dense + expert - layers * norms + embed)


# ---------------------------------------------------------------------------------------------- assembly
def _layer_bytes_per_token(model: ModelSpec, settings: RunSettings, seq_len: int, moe_layer: bool) -> float:
    """Sum of :func:`activation_terms`, cached (the planner evaluates thousands of micro-batch sizes).

    ``ModelSpec`` equality ignores ``hf_config``, so the config fields the terms read (dropout rates, the
    GELU variant) are part of the cache key.
    """
    config_key = (dropout_enabled(model), str(model.hf_config.get("activation_function")))
    return _cached_layer_bytes(model, settings, seq_len, moe_layer, config_key)


@functools.lru_cache(maxsize=4096)
def _cached_layer_bytes(model: ModelSpec, settings: RunSettings, seq_len: int, moe_layer: bool,
                        config_key: tuple[bool, str]) -> float:
    return sum(activation_terms(model, settings, seq_len=seq_len, moe_layer=moe_layer).values())


def _activation_bytes(model: ModelSpec, settings: RunSettings, lay: _StageLayout, *, micro_batch: int,
                      seq_len: int, first: bool, last: bool) -> dict[str, float]:
    """Activation terms (bytes) of one GPU of a pipeline stage at the fwd/bwd peak."""
    tokens = float(micro_batch * seq_len)
    moe_share = model.num_moe_layers / model.num_layers
    in_flight = lay.in_flight if first else 1
    dense = _layer_bytes_per_token(model, settings, seq_len, False)
    moe = _layer_bytes_per_token(model, settings, seq_len, True) if model.is_moe else 0.0
    per_layer = (1 - moe_share) * dense + moe_share * moe
    out: dict[str, float] = {"layers": per_layer * lay.layers_per_stage * tokens * in_flight}
    if settings.recompute == "full":
        none = dataclasses.replace(settings, recompute="none")
        working = max(_layer_bytes_per_token(model, none, seq_len, m)
                      for m in ((False, True) if model.is_moe else (False,)))
        out["recompute_working_layer"] = working * tokens
    if last:
        out["logits_loss"] = sum(logits_terms(model, settings).values()) * tokens
    if first and dropout_enabled(model):
        out["embedding_dropout_mask"] = model.hidden_size * tokens
    return out


def _check_sizes(micro_batch: int, seq_len: int, dp: int, grad_accum: int) -> None:
    """Positive whole numbers within the plausibility limits (:mod:`batchpilot.specs.batch`, ``hardware``)."""
    check_seq_len(seq_len)
    for name, value, limit in (("micro-batch", micro_batch, MAX_BATCH_SEQUENCES), ("dp", dp, MAX_DEVICES),
                               ("grad-accum", grad_accum, MAX_BATCH_SEQUENCES)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecError(f"--{name} {value!r} must be a positive integer")
        if value > limit:
            raise SpecError(f"--{name} {value} is above the limit of 2^{limit.bit_length() - 1} = {limit}; "
                            f"use a realistic value")


def analytic_memory(model: ModelSpec, settings: RunSettings, *, micro_batch: int, seq_len: int, dp: int = 1,
                    grad_accum: int = 1, overhead: OverheadModel | None = None,
                    gpus_per_node: int = 8) -> MemoryBreakdown:
    """Peak memory of the busiest GPU during one training step (bytes, per category of the peak phase).

    ``dp`` data-parallel ranks (ZeRO/FSDP shard over them; with ``hybrid_shard`` over
    ``min(dp, gpus_per_node)``), ``grad_accum`` micro-batches per step (the first pipeline stage holds
    :func:`first_stage_in_flight` of them). With pipeline parallelism the first and the last stage
    are both evaluated and the larger is returned.
    """
    _check_sizes(micro_batch, seq_len, dp, grad_accum)
    validate_for_model(settings, model)
    check_interleaving(settings, grad_accum)
    overhead = OverheadModel() if overhead is None else overhead
    lay = _stage_layout(model, settings, dp, grad_accum, gpus_per_node)
    stages = [(True, True)] if settings.pp == 1 else [(True, False), (False, True)]
    results = [_stage_memory(model, settings, lay, overhead, micro_batch, seq_len, first, last)
               for first, last in stages]
    return max(results, key=lambda r: r.total_bytes)


@dataclass(frozen=True, kw_only=True, slots=True)
class _Phase:
    """What one GPU holds at one moment of the step (bytes per category)."""

    weights: float
    gradients: float
    activations: float
    extra: float
    """Transient buffers counted as overhead (ZeRO-3 gathers, optimizer temporaries, embedding gradient)."""

    def total(self, optimizer: float) -> float:
        return self.weights + self.gradients + self.activations + self.extra + optimizer


def _phases(model: ModelSpec, settings: RunSettings, lay: _StageLayout, overhead: OverheadModel,
            params: _StageParams, states: ModelStates, activations: float) -> dict[str, _Phase]:
    """The three candidate peaks of a step (see the module docstring).

    ``backward_start``: activations and loss buffers, plus the gradients that exist already — persistent
    buffers (DDP buckets, DeepSpeed/Megatron/FSDP reduce buffers) hold them all; a single-process torch
    step with ``zero_grad(set_to_none=True)`` has none yet. ``backward_end``: every gradient, plus — with
    tied embeddings on one stage — the input embedding's dense gradient before it is added into the
    output head's (V·h). ``optimizer``: every gradient plus the optimizer step's temporaries.
    """
    grads_early = 0.0 if (settings.engine == "torch" and lay.dp == 1) else states.gradients_bytes
    gather = 0.0
    if settings.zero_stage >= 3 and settings.engine != "megatron":
        gather = overhead.gather_layers * params.largest_layer * ACTIVATION_BYTES[settings.precision]
    tied = 0.0
    if model.tie_word_embeddings and lay.pp == 1 and grads_early == 0.0:
        tied = model.vocab_size * model.hidden_size / lay.tp * bytes_per_param(settings).gradients
    transient = 0.0 if settings.offload else _optimizer_transient(model, settings, params, lay, overhead)
    weights = states.weights_bytes
    return {
        "backward_start": _Phase(weights=weights + states.compute_copies_bytes, gradients=grads_early,
                                 activations=activations, extra=gather),
        "backward_end": _Phase(weights=weights, gradients=states.gradients_bytes, activations=0.0, extra=tied),
        "optimizer_step": _Phase(weights=weights, gradients=states.gradients_bytes, activations=0.0,
                                 extra=transient),
    }


def _stage_memory(model: ModelSpec, settings: RunSettings, lay: _StageLayout, overhead: OverheadModel,
                  micro_batch: int, seq_len: int, first: bool, last: bool) -> MemoryBreakdown:
    params = _stage_params(model, lay, first, last)
    states = model_state_bytes(settings, params=params.dense, expert_params=params.expert, dp=lay.dp,
                               matmul_params=params.matmul, shard=lay.shard)
    acts = _activation_bytes(model, settings, lay, micro_batch=micro_batch, seq_len=seq_len,
                             first=first, last=last)
    activations = sum(acts.values())
    phases = _phases(model, settings, lay, overhead, params, states, activations)
    optimizer = states.optimizer_bytes
    name, peak_phase = max(phases.items(), key=lambda item: item[1].total(optimizer))
    peak = peak_phase.total(optimizer)
    fixed = overhead.cuda_context_bytes + overhead.workspace_bytes
    if lay.dp * lay.tp * lay.pp > 1:
        fixed += overhead.comm_buffer_bytes
    frag = overhead.fragmentation_fraction * peak
    details = {f"activations_{k}": round(v) for k, v in acts.items()}
    details.update({f"{phase}_peak": round(p.total(optimizer)) for phase, p in phases.items()})
    details.update(
        resident_states=round(states.weights_bytes + optimizer), activations_peak=round(activations),
        fwd_bwd_peak=round(max(phases["backward_start"].total(optimizer), phases["backward_end"].total(optimizer))),
        compute_weight_copies=round(states.compute_copies_bytes), zero3_gather_buffer=round(phases["backward_start"].extra),
        optimizer_step_transient=round(phases["optimizer_step"].extra), fixed_overhead=round(fixed),
        fragmentation=round(frag), peak_phase=list(phases).index(name),
    )
    return MemoryBreakdown(
        weights_bytes=round(peak_phase.weights), gradients_bytes=round(peak_phase.gradients),
        optimizer_bytes=round(optimizer), activations_bytes=round(peak_phase.activations),
        overhead_bytes=round(peak_phase.extra + frag + fixed), details=details,
    )


def _optimizer_transient(model: ModelSpec, settings: RunSettings, params: _StageParams, lay: _StageLayout,
                         overhead: OverheadModel) -> float:
    """The optimizer step's temporary buffers for unfused ``torch`` optimizers (other engines' fused
    kernels update in place): :data:`OPTIMIZER_STEP_TRANSIENT_BYTES` per parameter this GPU updates for
    ``foreach``, :data:`LOOP_STEP_TRANSIENT_TENSORS` × its largest fp32 parameter tensor for the loop."""
    if settings.engine != "torch":
        return 0.0
    sharded = settings.zero_stage >= 1
    local = params.dense / (lay.shard if sharded else 1) + params.expert / (lay.expert_shard if sharded else 1)
    if overhead.optimizer_foreach:
        return OPTIMIZER_STEP_TRANSIENT_BYTES[settings.optimizer] * local
    widths = (model.vocab_size, model.intermediate_size, model.moe_intermediate_size,
              model.num_heads * model.head_dim_qk)
    largest = model.hidden_size * max(widths) / lay.tp
    return LOOP_STEP_TRANSIENT_TENSORS[settings.optimizer] * 4 * min(largest, local)


# ---------------------------------------------------------------------------------------------- search
def max_micro_batch(model: ModelSpec, settings: RunSettings, *, seq_len: int, dp: int = 1,
                    budget_bytes: int, grad_accum: int = 1, overhead: OverheadModel | None = None,
                    limit: int = 1 << 20) -> int:
    """Largest micro-batch whose :func:`analytic_memory` total is ≤ ``budget_bytes``; 0 if none fits.

    Memory is non-decreasing in the micro-batch, so a doubling search then bisection finds it in
    O(log B) evaluations. ``limit`` caps the answer (returned when even that fits).
    """
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 1:
        raise SpecError(f"budget {budget_bytes!r} must be a positive number of bytes")

    def fits(b: int) -> bool:
        return analytic_memory(model, settings, micro_batch=b, seq_len=seq_len, dp=dp, grad_accum=grad_accum,
                               overhead=overhead).total_bytes <= budget_bytes

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        return limit if fits(limit) else _bisect(fits, lo, limit)
    return _bisect(fits, lo, hi)


def _bisect(fits: Callable[[int], bool], lo: int, hi: int) -> int:
    """Largest b in [lo, hi) with fits(b), given fits(lo) and not fits(hi)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
