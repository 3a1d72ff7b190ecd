"""Analytic per-GPU training memory: model states, activations and overhead as explicit terms, allocated and
reserved.

Examples::

    >>> from batchpilot.specs.model import load_model
    >>> from batchpilot.specs.settings import RunSettings
    >>> m = analytic_memory(load_model("tiny-llama-1m"), RunSettings(precision="fp32"),
    ...                     micro_batch=4, seq_len=256, overhead=OverheadModel.cpu())
    >>> m.total_bytes > m.activations_bytes > 0
    True

The step's peak is the largest of four moments (each total is in ``details``):

- ``backward_start`` (the start of the loss's backward on the last stage): weights (plus 16-bit compute
  copies and FSDP2's unsharded units), optimizer states, the gradients alive then, every tensor the
  layers saved (:func:`~batchpilot.estimate.activations.activation_terms`) and the loss buffers
  (:func:`~batchpilot.estimate.activations.logits_terms`).
- ``layer_backward``: the backward of one layer, swept over the stage's layers: what the layers below
  saved, this layer's backward working set (its recomputed activations and gradient temporaries,
  :func:`~batchpilot.estimate.activations.backward_working_terms`), the gradients produced so far (all of
  them when an engine keeps a persistent gradient buffer) and FSDP2's gathered blocks and reduce buffers.
- ``backward_end``: all gradients (activations freed), plus the tied input embedding's dense gradient
  (and, without autocast, the out-of-place sum autograd makes of it and the output head's).
- ``optimizer_step``: weights, all gradients, optimizer states and the step's temporaries.

Allocated vs reserved (``details["allocated_bytes"]``, ``details["reserved_bytes"]``): on a GPU
(:attr:`OverheadModel.caching_allocator`) the CUDA caching allocator reserves more than is allocated, by
structural terms (``c10/cuda/CUDACachingAllocator.cpp`` @ ``001074d2``): freed blocks are cached per stream
and reused only on their stream, and reserved memory never shrinks. Counted: the freed 16-bit logits at the
loss's peak (:func:`~batchpilot.estimate.activations.loss_hole_bytes`), one layer's forward transients
(:func:`~batchpilot.estimate.activations.forward_transient_bytes`), and FSDP2's two side-stream pools — the
all-gather copy-in stream holds the largest two consecutive all-gather buffers, the reduce-scatter stream
the sharded fp32 gradients (freed by ``zero_grad(set_to_none=True)`` but still reserved at the next step's
activation peak; ``torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py``, torch 2.13). The CUDA context
and NCCL's buffers live outside the allocator (``details["outside_allocator_bytes"]``). ``total_bytes`` =
reserved + outside: what must fit in the GPU (``fits`` is judged on it); frameworks such as torchtitan log
``reserved``.

The parts: model states per engine × precision × optimizer and ZeRO stage
(:mod:`batchpilot.estimate.model_states`), activations per layer and the logits/loss buffers
(:mod:`batchpilot.estimate.activations`), and what neither counts (:mod:`batchpilot.estimate.overhead`).
This module lays them out over the pipeline stages and moments of one step.

Known error: checked against measured CPU peaks of real steps (tests/estimate/test_memory_crosscheck.py:
within 2 % for ``none``, ``op``, ``full`` and every-N checkpointing on the tiny Llama presets) and against
published GPU runs (``benchmarks/published_runs.py``); kernels that fuse more (Megatron/TE fused norms,
fused cross-entropy) save less.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

from batchpilot.errors import SpecError
from batchpilot.estimate import finetune, finetune_layers
from batchpilot.estimate.activations import (
    LayerBytes,
    Policy,
    block_style,
    cpu_dropout_noise_bytes,
    dropout_enabled,
    layer_bytes,
    layer_policies,
    logits_terms,
    loss_hole_bytes,
)
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

#: The moments of a step, in the order of ``details["peak_phase"]``.
MOMENTS = ("backward_start", "backward_end", "optimizer_step", "layer_backward")

#: DeepSpeed ZeRO's gradient reduce bucket: ``reduce_bucket_size`` 5e8 elements of the 16-bit gradient
#: dtype, allocated once (``deepspeed/runtime/zero/config.py`` defaults, ``stage_1_and_2.py``/``stage3.py``
#: ``ipg_buffer`` @ ``edaa7221``).
DEEPSPEED_REDUCE_BUCKET_ELEMENTS = 500_000_000
#: ZeRO-3's optimizer step upcasts the gradient partition per sub-group of at most ``sub_group_size`` 1e9
#: elements (``_prepare_fp32_grad_for_sub_group``); ZeRO-1/2 upcast the whole partition
#: (``single_grad_partition = flat.to(fp32)``).
DEEPSPEED_SUB_GROUP_ELEMENTS = 1_000_000_000
#: ZeRO-3 keeps at most ``stage3_max_live_parameters`` 1e9 gathered parameters alive.
DEEPSPEED_MAX_LIVE_PARAMETERS = 1_000_000_000


# ---------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True, kw_only=True, slots=True)
class _StageLayout:
    """How the run splits the model over GPUs, as far as one GPU's memory needs it."""

    tp: int
    pp: int
    ep: int
    cp: int
    sp: bool
    dp: int
    shard: int
    """Ranks one dense parameter's states are sharded over (ZeRO/FSDP group: dp × cp)."""
    expert_shard: int
    """Ranks one routed expert's states are sharded over (the expert data-parallel group)."""
    layers_per_stage: int


def _stage_layout(model: ModelSpec, settings: RunSettings, dp: int, gpus_per_node: int) -> _StageLayout:
    group = dp * settings.cp
    shard = min(group, gpus_per_node) if settings.hybrid_shard else group
    if settings.ep > dp or dp % settings.ep:
        raise SpecError(
            f"--ep {settings.ep} must divide the {dp} data-parallel ranks experts are spread over; "
            f"use a divisor of {dp} or more GPUs"
        )
    return _StageLayout(
        tp=settings.tp, pp=settings.pp, ep=settings.ep, cp=settings.cp, sp=settings.sp and settings.tp > 1, dp=dp,
        shard=max(1, shard), expert_shard=max(1, shard // settings.ep),
        layers_per_stage=math.ceil(model.num_layers / settings.pp),
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
    head_matmul: float
    """The output head's matmul weight on this stage (0 off the last stage)."""
    matmul: float
    """Parameters that are matmul weights (autocast keeps 16-bit copies of these): the layers' and the output
    head's, not the input embedding or position tables (an embedding lookup is not cast) nor the final norm;
    measured (torch 2.13 CPU autocast, tiny-llama-15m, untied 32000 × 288 tables): counting the input table
    put the analytic peak 2.3 % above the traced one at micro-batch 1."""
    layer: float
    """One average transformer layer on this GPU (dense and MoE layers mixed, experts ÷ ep): an FSDP unit."""
    layer_norms: float
    """The norm weights of one layer (FSDP's fp8 all-gather leaves them in 16 bits)."""
    ends: float
    """Parameters outside the layers on this stage: embedding, final norm, output head (torchtitan's root
    FSDP unit before 2025-07-28)."""
    head: float
    """The final norm and the output head on this stage (torchtitan's ``[norm, output]`` FSDP unit; with
    tied embeddings the shared table)."""


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
    head = table + model.params_final_norm if last else 0.0
    return _StageParams(head_matmul=table if last else 0.0, dense=layers_dense + embed, expert=expert, largest_layer=largest,
                        matmul=layers_dense + expert - layers * norms + (table if last else 0.0),
                        layer=(layers_dense + expert) / layers, layer_norms=float(norms), ends=embed, head=head)


# ---------------------------------------------------------------------------------------------- layers
LAYER_IGNORED_SETTINGS = frozenset({"zero_stage", "pp", "vpp", "optimizer", "offload", "hybrid_shard",
                                    "reshard_after_forward", "fp8_all_gather"})
"""Run settings one layer's activation bytes (:func:`~batchpilot.estimate.activations.layer_bytes`) do not read: the
layer cache is keyed by every other field (a new setting is part of the key until it is listed here)."""

_layer_settings_key = operator.attrgetter(
    *(f.name for f in dataclasses.fields(RunSettings) if f.name not in LAYER_IGNORED_SETTINGS))

_LAYER_CACHE: dict[tuple[object, ...], LayerBytes] = {}
_LAYER_CACHE_SIZE = 8192
"""Entries kept before :data:`_LAYER_CACHE` starts over (a planner run fills a few hundred)."""


def _cached_layer(model: ModelSpec, settings: RunSettings, seq_len: int, moe_layer: bool, policy: Policy,
                  imbalance: float, config_key: tuple[bool, str]) -> LayerBytes:
    """:func:`layer_bytes`, cached by the settings it reads (all but :data:`LAYER_IGNORED_SETTINGS`)."""
    key = (model, config_key, _layer_settings_key(settings), seq_len, moe_layer, policy, imbalance)
    found = _LAYER_CACHE.get(key)
    if found is None:
        if len(_LAYER_CACHE) >= _LAYER_CACHE_SIZE:
            _LAYER_CACHE.clear()
        found = _LAYER_CACHE[key] = layer_bytes(model, settings, seq_len=seq_len, moe_layer=moe_layer, policy=policy,
                                                imbalance=imbalance)
    return found


def _layer(model: ModelSpec, settings: RunSettings, seq_len: int, policy: Policy, imbalance: float,
           config_key: tuple[bool, str]) -> LayerBytes:
    """One average layer (dense and MoE layers mixed by their share) under ``policy``, cached (the planner
    evaluates thousands of micro-batch sizes). ``ModelSpec`` equality ignores ``hf_config``, so the config
    fields the terms read (dropout rates, the GELU variant: ``config_key``, :func:`_config_key`) are part of the
    cache key."""
    dense = _cached_layer(model, settings, seq_len, False, policy, imbalance, config_key)
    if not model.is_moe:
        return dense
    moe = _cached_layer(model, settings, seq_len, True, policy, imbalance, config_key)
    share = model.num_moe_layers / model.num_layers
    return LayerBytes(saved=(1 - share) * dense.saved + share * moe.saved,
                      backward=(1 - share) * dense.backward + share * moe.backward,
                      forward_transient=max(dense.forward_transient, moe.forward_transient))


@dataclass(frozen=True, kw_only=True, slots=True)
class _Activations:
    """Activation bytes of one GPU of a pipeline stage at each moment (tokens already multiplied in)."""

    saved_all: float
    """Every layer's saved tensors of the current micro-batch."""
    held: float
    """Other micro-batches' saved tensors the first pipeline stage holds (1F1B warm-up)."""
    loss: float
    """The loss buffers and the final norm (last stage), or the incoming gradient (other stages)."""
    layer_backward: list[float]
    """Per layer i (forward order): the layers below i's saved tensors + i's backward working set."""
    embedding_mask: float
    forward_hole: float
    """The largest forward transient of one layer (reserved, not allocated, after the forward)."""
    loss_hole: float
    terms: dict[str, float]
    """Named terms for ``details``."""


def _activations(model: ModelSpec, lay: _StageLayout, fixed: _StageFixed, *, micro_batch: int, seq_len: int,
                 in_flight: float, first: bool, last: bool, cpu_noise: float = 0.0) -> _Activations:
    """The stage's activations at ``micro_batch``: :class:`_StageFixed`'s bytes per token × the tokens, the layers'
    saved tensors summed in forward order, the ``in_flight`` − 1 other micro-batches the first stage holds
    (:func:`first_stage_in_flight`), and the backward sweep (each layer's working set on top of what the layers
    below saved). ``cpu_noise``: a CPU process's dropout noise per token per layer
    (:func:`batchpilot.estimate.activations.cpu_dropout_noise_bytes`); its embedding dropout saves fp32 noise."""
    tokens = micro_batch * seq_len / lay.cp
    per_token = fixed.tokens
    saved = [(s + cpu_noise) * tokens for s in per_token.saved]
    saved_all = sum(saved)
    held = (in_flight - 1) * saved_all if first else 0.0
    # below = what the layers before each one saved, summed in order (itertools.accumulate adds as a loop would)
    sweep = [below + b * tokens for below, b in zip(itertools.accumulate(saved[:-1], initial=0.0),
                                                    per_token.backward, strict=True)]
    loss = per_token.loss * tokens if last else per_token.resid * tokens / (lay.tp if lay.sp else 1)
    mask = (per_token.resid if cpu_noise else model.hidden_size) * tokens if first and per_token.dropout else 0.0
    terms = {"layers": saved_all, "logits_loss" if last else "incoming_grad": loss}
    if held:
        terms["other_micro_batches"] = held
    if mask:
        terms["embedding_dropout_mask"] = mask
    terms["layer_backward_working"] = per_token.backward_max * tokens
    return _Activations(
        saved_all=saved_all, held=held, loss=loss, layer_backward=sweep, embedding_mask=mask,
        forward_hole=per_token.forward_transient_max * tokens,
        loss_hole=per_token.loss_hole * tokens if last else 0.0, terms=terms,
    )


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
    """Peak memory of the busiest GPU during one training step (bytes, per category of the peak moment).

    ``dp`` data-parallel ranks (ZeRO/FSDP shard over ``dp × cp``; with ``hybrid_shard`` over at most
    ``gpus_per_node``), ``grad_accum`` micro-batches per step (the first pipeline stage holds
    :func:`first_stage_in_flight` of them). With pipeline parallelism the first and the last stage
    are both evaluated and the larger is returned.
    """
    _check_sizes(micro_batch, seq_len, dp, grad_accum)
    validate_for_model(settings, model)
    check_interleaving(settings, grad_accum)
    if seq_len % settings.cp:
        raise SpecError(f"--seq-len {seq_len} must be a multiple of --cp {settings.cp} (each context-parallel "
                        f"rank holds an equal share); use --seq-len {(seq_len // settings.cp + 1) * settings.cp}")
    overhead = OverheadModel() if overhead is None else overhead
    lay = _stage_layout(model, settings, dp, gpus_per_node)
    in_flight = first_stage_in_flight(settings.pp, settings.vpp, grad_accum)
    config_key = _config_key(model)
    stages = [(True, True)] if settings.pp == 1 else [(True, False), (False, True)]
    results = [_stage_memory(model, config_key, settings, lay, overhead, micro_batch, seq_len, in_flight, first, last)
               for first, last in stages]
    return max(results, key=lambda r: r.total_bytes)


# ---------------------------------------------------------------------------------------------- moments
@dataclass(frozen=True, kw_only=True, slots=True)
class _Moment:
    """What one GPU holds at one moment of the step (bytes per category)."""

    weights: float
    gradients: float
    activations: float
    extra: float
    """Transient buffers counted as overhead (gathered parameters, reduce buffers, optimizer temporaries,
    the embedding gradient)."""
    slack: float = 0.0
    """Reserved by the caching allocator but not allocated at this moment (holes)."""

    def allocated(self, optimizer: float) -> float:
        return self.weights + self.gradients + self.activations + self.extra + optimizer

    def reserved(self, optimizer: float) -> float:
        return self.allocated(optimizer) + self.slack


@dataclass(frozen=True, kw_only=True, slots=True)
class _Weights:
    """Weight-side terms beyond the model states (bytes on this GPU)."""

    resident: float
    """Alive through forward and backward: autocast's 16-bit copies, FSDP2's units not resharded after
    forward (:attr:`RunSettings.reshard_after_forward`), Megatron/TE's fp8 weight caches."""
    forward_gather: float
    """Gathered only around the loss's moment (DeepSpeed ZeRO-3's live parameters)."""
    backward_gather: float
    """Gathered and produced while a layer's backward runs: ZeRO-3/FSDP2 unsharded blocks (the current one
    and the prefetched one) with FSDP2's unsharded 16-bit gradients and fp32 reduce-scatter input."""
    pools: float
    """FSDP2's all-gather and reduce-scatter stream pools (reserved only)."""
    unsharded_grads: float
    """FSDP2 under pipeline parallelism: gradient sync is off for every micro-batch's backward
    (``torch/distributed/pipelining/stage.py`` ``backward_maybe_with_nosync``), so each parameter's
    unsharded gradient accumulates in the fp32 reduce dtype (``FSDPParam.unsharded_accumulated_grad``)."""


def _fsdp_block_bytes(settings: RunSettings, params: _StageParams) -> float:
    """One unsharded FSDP2 block: 16-bit, or 1 byte per matmul weight with fp8 all-gather (norms 16-bit)."""
    c = ACTIVATION_BYTES[settings.precision]
    if settings.fp8_all_gather:
        return (params.layer - params.layer_norms) * 1 + params.layer_norms * c
    return params.layer * c


def _weights(settings: RunSettings, lay: _StageLayout, overhead: OverheadModel, params: _StageParams,
             states: ModelStates) -> _Weights:
    c = ACTIVATION_BYTES[settings.precision]
    resident, forward_gather, backward_gather, pools, accumulated = states.compute_copies_bytes, 0.0, 0.0, 0.0, 0.0
    if _autocast_copies(settings):
        # autocast's cast cache is cleared when the forward leaves autocast; a 16-bit weight copy survives
        # only where a matmul saved it, which a checkpointed layer (op, full) does not: its backward casts
        # the layer's weights again (one layer at a time)
        checkpointed = sum(p in ("op", "full") for p in layer_policies(settings, lay.layers_per_stage))
        layer_matmul = (params.layer - params.layer_norms) * c
        resident -= checkpointed * layer_matmul
        backward_gather += layer_matmul if checkpointed else 0.0
    if settings.zero_stage >= 3 and settings.engine == "fsdp2":
        block, root = _fsdp_block_bytes(settings, params), params.ends * c
        policy = settings.reshard_after_forward
        if policy == "never" or lay.pp > 1:
            resident += root + block * lay.layers_per_stage
        else:
            resident += {"last": root + block, "default": params.head * c, "always": 0.0}[policy]
            backward_gather += 2 * block
        backward_gather += params.layer * (c + 4)  # unsharded 16-bit grads + fp32 reduce-scatter input
        if lay.pp > 1:
            accumulated = 4 * (params.dense + params.expert)
        if overhead.caching_allocator:  # two consecutive all-gather buffers + the sharded fp32 gradients
            first_unit = root if policy == "last" else max(params.head, params.ends - params.head) * c
            pools = first_unit + block + states.gradients_bytes
    elif settings.zero_stage >= 3 and settings.engine != "megatron":
        gathered = min(overhead.gather_layers * params.largest_layer, DEEPSPEED_MAX_LIVE_PARAMETERS) * c
        forward_gather = backward_gather = gathered
    return _Weights(resident=resident, forward_gather=forward_gather, backward_gather=backward_gather,
                    pools=pools, unsharded_grads=accumulated)


def _autocast_copies(settings: RunSettings) -> bool:
    """``torch.autocast`` over fp32 parameters: 16-bit weight copies live from forward to backward."""
    return (settings.engine in ("torch", "fsdp2") and settings.precision != "fp32" and settings.zero_stage < 3
            and settings.param_dtype == "fp32" and finetune.autocast_copies_apply(settings))


def _grads_growing(settings: RunSettings, lay: _StageLayout) -> bool:
    """Gradients appear layer by layer during backward (no persistent buffer): a single ``torch`` process
    with ``zero_grad(set_to_none=True)``, and FSDP2's sharded gradients (``None`` until reduce-scattered)."""
    return (settings.engine == "torch" and lay.dp * lay.cp == 1) or settings.engine == "fsdp2"


def _moments(fixed: _StageFixed, acts: _Activations) -> dict[str, _Moment]:
    """The four candidate peaks of a step (see the module docstring)."""
    states, w, grads = fixed.states, fixed.w, fixed.states.gradients_bytes
    start = _Moment(weights=fixed.weights, gradients=fixed.grads_early + w.unsharded_grads,
                    activations=acts.saved_all + acts.held + acts.loss + acts.embedding_mask,
                    extra=w.forward_gather + fixed.bucket,
                    slack=(acts.loss_hole + acts.forward_hole) if fixed.slack_allowed else 0.0)
    layer = _layer_backward_moment(fixed, acts)
    return {
        "backward_start": start,
        "backward_end": _Moment(weights=states.weights_bytes,
                                gradients=grads + w.unsharded_grads, activations=0.0,
                                extra=fixed.tied + fixed.bucket),
        "optimizer_step": _Moment(weights=states.weights_bytes, gradients=grads, activations=0.0,
                                  extra=fixed.transient),
        "layer_backward": layer,
    }


def _produced_gradients(model: ModelSpec, lay: _StageLayout, params: _StageParams, states: ModelStates,
                        growing: bool) -> tuple[float, ...]:
    """Per layer (forward order), the gradients alive while its backward runs: the output head and final norm,
    the layers above and this layer's down projection when they appear layer by layer, else all of them."""
    grads = states.gradients_bytes
    total_params = params.dense + params.expert
    per_param = grads / total_params if total_params else 0.0
    n = lay.layers_per_stage
    ffn_last = model.hidden_size * max(model.intermediate_size, model.moe_intermediate_size) / lay.tp
    if not growing:
        return (grads,) * n
    return tuple(min(total_params, params.head + (n - 1 - i) * params.layer + min(ffn_last, params.layer)) * per_param
                 for i in range(n))


def _layer_backward_moment(fixed: _StageFixed, acts: _Activations) -> _Moment:
    """The largest of the per-layer backward moments (the first, on a tie): the layers below's saved tensors +
    this layer's working set, plus the gradients produced so far (:func:`_produced_gradients`), less the
    autocast weight copies already freed (:attr:`_StageFixed.freed_copies`)."""
    live_by_layer, produced_by_layer = acts.layer_backward, fixed.produced
    freed = fixed.freed_copies or (0.0,) * len(live_by_layer)
    totals = [live + produced - f for live, produced, f in zip(live_by_layer, produced_by_layer, freed, strict=True)]
    i = max(range(len(totals)), key=totals.__getitem__)
    live, produced = live_by_layer[i], produced_by_layer[i]
    return _Moment(weights=fixed.weights - freed[i], gradients=produced + fixed.w.unsharded_grads,
                   activations=live + acts.held, extra=fixed.w.backward_gather + fixed.bucket + fixed.dequant)


def _deepspeed_bucket(settings: RunSettings, lay: _StageLayout) -> float:
    """DeepSpeed ZeRO's gradient reduce bucket (:data:`DEEPSPEED_REDUCE_BUCKET_ELEMENTS` 16-bit elements)."""
    if settings.engine != "deepspeed" or settings.zero_stage == 0 or lay.dp * lay.cp == 1:
        return 0.0
    return DEEPSPEED_REDUCE_BUCKET_ELEMENTS * bytes_per_param(settings).gradients


def _communicators(lay: _StageLayout) -> int:
    """Process groups (NCCL communicators) a GPU takes part in: data/FSDP, tensor, pipeline, context, expert."""
    return sum(size > 1 for size in (lay.dp, lay.tp, lay.pp, lay.cp, lay.ep))


@dataclass(frozen=True, kw_only=True, slots=True)
class _StageTokens:
    """A stage's activations per token (bytes), whatever its micro-batch, accumulation and data-parallel layout:
    :func:`_stage_tokens`, cached."""

    saved: tuple[float, ...]
    """Each layer's saved tensors (forward order)."""
    backward: tuple[float, ...]
    """Each layer's backward working set."""
    backward_max: float
    forward_transient_max: float
    loss: float
    """The loss buffers and the final norm (:func:`logits_terms`, summed; last stage)."""
    resid: float
    """The incoming gradient of a stage that is not the last: h × the residual stream's bytes."""
    loss_hole: float
    dropout: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class _StageFixed:
    """What one pipeline stage's memory takes from the run whatever its micro-batch and accumulation (bytes):
    :func:`_stage_fixed`, cached."""

    params: _StageParams
    states: ModelStates
    w: _Weights
    tokens: _StageTokens
    weights: float
    """Weights plus the compute copies alive through forward and backward."""
    grads_early: float
    """Gradients alive at the start of the backward (0 when they appear layer by layer)."""
    tied: float
    """Tied embeddings at the end of backward: the lookup's dense gradient beside the head's, and — when the
    head's gradient comes straight from its matmul (``torch`` engine, weights used in their own dtype) — the
    out-of-place sum autograd makes of the two (its input buffer's ``aten::add``; the matmul's gradient has the
    transposed layout). Measured, torch 2.13 CPU, gpt2, micro-batch 1: three 154 MB vocabulary-sized fp32
    tensors at the peak in fp32; two under bf16 autocast, whose cast hands the sum a fresh tensor to reuse."""
    transient: float
    """The optimizer step's temporaries."""
    bucket: float
    """DeepSpeed's reduce bucket."""
    dequant: float
    """QLoRA's dequantization buffer during a layer's backward."""
    slack_allowed: bool
    produced: tuple[float, ...]
    """:func:`_produced_gradients`."""
    freed_copies: tuple[float, ...] = ()
    """Per layer (forward order), the autocast weight copies already freed when its backward runs: those the
    layers above and the output head saved (a saved copy is released by its matmul's backward). Measured,
    torch 2.13 CPU bf16 autocast, gpt2 micro-batch 1 (its 77 MB head copy): the layer sweep was 4 % high."""


_STAGE_TOKENS: dict[tuple[object, ...], _StageTokens] = {}


def _stage_tokens(model: ModelSpec, config_key: tuple[bool, str], settings: RunSettings, layers_per_stage: int,
                  overhead: OverheadModel, seq_len: int, first: bool, last: bool) -> _StageTokens:
    """:class:`_StageTokens`, cached by the settings the activation terms read (all but
    :data:`LAYER_IGNORED_SETTINGS`) and the stage's layer count; ``config_key``: the ``hf_config`` fields they read
    (:func:`_layer`)."""
    imbalance = overhead.moe_token_imbalance
    key = (model, config_key, _layer_settings_key(settings), layers_per_stage, imbalance, seq_len, first, last)
    found = _STAGE_TOKENS.get(key)
    if found is not None:
        return found
    policies = layer_policies(settings, layers_per_stage)
    per_policy = {p: _layer(model, settings, seq_len, p, imbalance, config_key) for p in set(policies)}
    layers = finetune_layers.stage_layers([per_policy[p] for p in policies], model, settings, first=first,
                                          seq_len=seq_len)
    saved, backward = [lb.saved for lb in layers], [lb.backward for lb in layers]
    found = _StageTokens(
        saved=tuple(saved), backward=tuple(backward), backward_max=max(backward),
        forward_transient_max=max(lb.forward_transient for lb in layers),
        loss=sum(logits_terms(model, settings).values()) if last else 0.0,
        resid=model.hidden_size * block_style(settings).resid, loss_hole=loss_hole_bytes(model, settings),
        dropout=dropout_enabled(model))
    if len(_STAGE_TOKENS) >= _LAYER_CACHE_SIZE:
        _STAGE_TOKENS.clear()
    _STAGE_TOKENS[key] = found
    return found


@functools.lru_cache(maxsize=8192)
def _stage_fixed(model: ModelSpec, config_key: tuple[bool, str], settings: RunSettings, lay: _StageLayout,
                 overhead: OverheadModel, seq_len: int, first: bool, last: bool) -> _StageFixed:
    """:class:`_StageFixed` of one stage; ``config_key``: the ``hf_config`` fields the terms read (:func:`_layer`)."""
    params = _stage_params(model, lay, first, last)
    states = finetune.model_states(model, settings, params=params.dense + params.expert, matmul_params=params.matmul,
                                   layers=lay.layers_per_stage, first=first, dp=lay.dp, shard=lay.shard, tp=lay.tp) \
        or model_state_bytes(settings, params=params.dense, expert_params=params.expert, dp=lay.dp,
                             matmul_params=params.matmul, shard=lay.shard)
    w = _weights(settings, lay, overhead, params, states)
    growing = _grads_growing(settings, lay)
    tied = 0.0
    if model.tie_word_embeddings and lay.pp == 1 and growing and finetune.embedding_gradient(settings):
        uncast = settings.engine == "torch" and (settings.precision == "fp32" or settings.param_dtype != "fp32")
        tied = (2 if uncast else 1) * model.vocab_size * model.hidden_size / lay.tp * bytes_per_param(settings).gradients
    return _StageFixed(
        params=params, states=states, w=w,
        tokens=_stage_tokens(model, config_key, settings, lay.layers_per_stage, overhead, seq_len, first, last),
        weights=states.weights_bytes + w.resident, grads_early=0.0 if growing else states.gradients_bytes, tied=tied,
        transient=0.0 if settings.offload else _optimizer_transient(model, settings, params, lay, overhead),
        bucket=_deepspeed_bucket(settings, lay), dequant=finetune.dequant_buffer_bytes(model, settings, lay.tp),
        slack_allowed=overhead.caching_allocator, produced=_produced_gradients(model, lay, params, states, growing),
        freed_copies=_freed_copies(settings, lay, params, states),
    )


def _freed_copies(settings: RunSettings, lay: _StageLayout, params: _StageParams,
                  states: ModelStates) -> tuple[float, ...]:
    """:attr:`_StageFixed.freed_copies`: ``torch`` engine autocast only (other engines' copies live elsewhere);
    checkpointed layers saved none."""
    if settings.engine != "torch" or not _autocast_copies(settings) or not states.compute_copies_bytes:
        return ()
    c = ACTIVATION_BYTES[settings.precision]
    saved = [0.0 if p in ("op", "full") else (params.layer - params.layer_norms) * c
             for p in layer_policies(settings, lay.layers_per_stage)]
    head = params.head_matmul * c
    return tuple(head + sum(saved[i + 1:]) for i in range(len(saved)))


def _config_key(model: ModelSpec) -> tuple[bool, str]:
    """The ``hf_config`` fields the activation terms read (``ModelSpec`` equality ignores ``hf_config``)."""
    return dropout_enabled(model), str(model.hf_config.get("activation_function"))


def _stage_memory(model: ModelSpec, config_key: tuple[bool, str], settings: RunSettings, lay: _StageLayout,
                  overhead: OverheadModel, micro_batch: int, seq_len: int, in_flight: float, first: bool,
                  last: bool) -> MemoryBreakdown:
    fixed = _stage_fixed(model, config_key, settings, lay, overhead, seq_len, first, last)
    states, w = fixed.states, fixed.w
    cpu_noise = 0.0 if overhead.caching_allocator else cpu_dropout_noise_bytes(model, settings, seq_len=seq_len)
    acts = _activations(model, lay, fixed, micro_batch=micro_batch, seq_len=seq_len, in_flight=in_flight,
                        first=first, last=last, cpu_noise=cpu_noise / (lay.tp if lay.sp else 1))
    moments = _moments(fixed, acts)
    optimizer = states.optimizer_bytes
    allocated = max(m.allocated(optimizer) for m in moments.values()) + overhead.workspace_bytes
    name, peak = max(moments.items(), key=lambda item: item[1].reserved(optimizer))
    slack = peak.slack + w.pools + overhead.fragmentation_fraction * allocated
    reserved = max(peak.reserved(optimizer) + overhead.workspace_bytes + w.pools
                   + overhead.fragmentation_fraction * allocated, allocated)
    outside = overhead.cuda_context_bytes + _communicators(lay) * overhead.comm_buffer_bytes
    details = {f"activations_{k}": round(v) for k, v in acts.terms.items()}
    details.update({f"{moment}_peak": round(m.allocated(optimizer)) for moment, m in moments.items()})
    fwd_bwd = max(moments[k].allocated(optimizer) for k in ("backward_start", "backward_end", "layer_backward"))
    details.update(
        resident_states=round(states.weights_bytes + optimizer),
        activations_peak=round(max(m.activations for m in moments.values())),
        fwd_bwd_peak=round(fwd_bwd), compute_weight_copies=round(w.resident),
        zero3_gather_buffer=round(max(w.forward_gather, w.backward_gather)),
        optimizer_step_transient=round(moments["optimizer_step"].extra), fixed_overhead=round(outside),
        allocator_slack=round(slack), fsdp_stream_pools=round(w.pools), fragmentation=round(
            overhead.fragmentation_fraction * allocated),
        allocated_bytes=round(allocated), reserved_bytes=round(reserved), outside_allocator_bytes=round(outside),
        peak_phase=MOMENTS.index(name),
    )
    total = round(reserved + outside)
    cats = [round(peak.weights), round(peak.gradients), round(optimizer), round(peak.activations)]
    return MemoryBreakdown(weights_bytes=cats[0], gradients_bytes=cats[1], optimizer_bytes=cats[2],
                           activations_bytes=cats[3], overhead_bytes=total - sum(cats), details=details)


def _optimizer_transient(model: ModelSpec, settings: RunSettings, params: _StageParams, lay: _StageLayout,
                         overhead: OverheadModel) -> float:
    """The optimizer step's temporary buffers. Unfused ``torch`` optimizers:
    :data:`OPTIMIZER_STEP_TRANSIENT_BYTES` per parameter this GPU updates for ``foreach``,
    :data:`LOOP_STEP_TRANSIENT_TENSORS` × its largest fp32 parameter tensor for the loop. DeepSpeed ZeRO:
    the fp32 upcast of the gradient partition (:data:`DEEPSPEED_SUB_GROUP_ELEMENTS` per sub-group at
    stage 3). Fused kernels (:attr:`OverheadModel.optimizer_fused`, Megatron's and FSDP2 users' optimizers)
    update in place: 0."""
    tuned = finetune.optimizer_transient(model, settings, foreach=overhead.optimizer_foreach,
                                         fused=overhead.optimizer_fused, tp=lay.tp, dp_shard=lay.shard)
    if tuned is not None:  # fine-tuning: only the trainable parameters step
        return tuned
    sharded = settings.zero_stage >= 1
    local = params.dense / (lay.shard if sharded else 1) + params.expert / (lay.expert_shard if sharded else 1)
    if settings.engine == "deepspeed" and sharded:
        return 4 * (min(local, DEEPSPEED_SUB_GROUP_ELEMENTS) if settings.zero_stage == 3 else local)
    if settings.engine != "torch" or overhead.optimizer_fused:
        return 0.0
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
