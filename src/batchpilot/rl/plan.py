"""``batchpilot rl plan``: the RL batch, the update layout, the rollout engine and the placement that fit
and are fastest, with memory and time per phase.

Example (CPU, about a second)::

    >>> from batchpilot.rl.batch import RLBatch
    >>> from batchpilot.specs.model import load_model
    >>> from batchpilot.specs.hardware import load_accelerator
    >>> req = RLPlanRequest(model=load_model("qwen2.5-7b"), gpu=load_accelerator("h100-sxm"), gpus=8,
    ...                     batch=RLBatch(prompts_per_rollout=64, group_size=8, samples_per_update=128),
    ...                     max_prompt_tokens=1024, max_response_tokens=4096)
    >>> p = plan_rl(req)
    >>> p.fits, p.batch.updates_per_rollout, p.batch.max_policy_lag
    (True, 4, 3)

The search (each step cites its model):

1. The frameworks' batch rules (:mod:`batchpilot.rl.rules`) that do not depend on the layout: a bad batch is
   refused before anything else, with the nearest valid GPU counts, group sizes and prompts per rollout.
2. The update: :func:`batchpilot.plan.planner.plan` for ``samples_per_update`` sequences of ``prompt +
   response`` tokens on the training GPUs (verl FSDP: FSDP2 full sharding, Ulysses sequence parallelism
   planned as tensor + sequence parallelism of the same size — the same per-GPU activation and state memory;
   verl Megatron: the planner's whole Megatron space). The fastest plan that passes the framework's
   layout rules wins; its micro-batch becomes the token budget ``micro × (prompt + response) ÷ sp``.
3. The log-prob passes: the largest token budget (a multiple of the longest sequence) whose peak fits.
4. The rollout: every tensor-parallel size that divides the heads and the rollout GPUs; for each, the
   largest ``gpu_memory_utilization`` (≤ 0.9, vLLM's default) that the GPU can grant next to what
   training leaves resident (colocated), vLLM's KV budget (:mod:`batchpilot.rl.kv`; weights in the
   checkpoint's dtype) and the scheduler simulation (:mod:`batchpilot.rl.rollout`) at a few
   ``max_num_seqs`` (vLLM's default 1024 and 1, 2, 4 × the sequences the cache holds at full length:
   admission looks at prompts only, so an uncapped engine over-commits and thrashes); the fastest wins.
5. Placement: ``colocated`` (one set of GPUs switching phases; the step is the sum of the phases) or
   ``separate`` (rollout on its own GPUs, one step off-policy: the step is the longer of rollout and
   training, and every sample is one more rollout's updates older).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from batchpilot.errors import BatchpilotError, InfeasibleError, SpecError
from batchpilot.estimate.overhead import OverheadModel
from batchpilot.plan.planner import Pins, Plan, PlanRequest, plan
from batchpilot.rl.batch import RLBatch, RLBatchError
from batchpilot.rl.kv import (
    ENGINE_CONTEXT_BYTES,
    RolloutMemory,
    check_kv_holds_one_request,
    checkpoint_weight_dtype,
    rollout_memory,
)
from batchpilot.rl.phases import forward_time_s, log_prob_pass_bytes, offload_s, weight_sync_s
from batchpilot.rl.rollout import EngineModel, RolloutResult, Workload, response_lengths, simulate_rollout
from batchpilot.rl.rules import FRAMEWORKS, RuleContext, check, nearest_choices, violation
from batchpilot.specs.batch import check_seq_len
from batchpilot.specs.hardware import AcceleratorSpec, ClusterSpec, check_device_count
from batchpilot.specs.model import ModelSpec
from batchpilot.specs.settings import RunSettings

Algorithm = Literal["grpo", "ppo"]
Placement = Literal["colocated", "separate"]
TrainEngine = Literal["fsdp", "megatron"]

MAX_GPU_MEMORY_UTILIZATION = 0.9
"""Largest ``gpu_memory_utilization`` searched: vLLM's own default (``CacheConfig``)."""
INTER_NODE_BANDWIDTH_BYTES_PER_S = 50e9
"""Per GPU, one direction: one 400 Gb/s NIC per GPU (the plan command's default)."""
MAX_LOG_PROB_SEQUENCES = 16
"""Longest log-prob token budget searched, in longest sequences."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RLPlanRequest:
    """What to plan (flags of ``batchpilot rl plan``)."""

    model: ModelSpec
    gpu: AcceleratorSpec
    gpus: int
    batch: RLBatch
    max_prompt_tokens: int
    max_response_tokens: int
    mean_response_tokens: float | None = None
    """Expected mean response length (None: every response at the maximum, the worst case)."""
    algorithm: Algorithm = "grpo"
    framework: str = "verl"
    engine: TrainEngine | None = None
    """Actor training backend (None: ``megatron`` for MoE models, ``fsdp`` otherwise)."""
    placement: Placement = "colocated"
    rollout_gpus: int | None = None
    """With ``separate``: GPUs for the rollout (None: searched)."""
    reference: bool = True
    """A frozen reference model (KL term) is evaluated every step."""
    offload: bool = True
    """Colocated: model states go to host memory while the other phases run (verl param/optimizer offload)."""
    rollout_tp: int | None = None
    gpu_memory_utilization: float | None = None
    max_num_batched_tokens: int = 8192
    """vLLM's per-step token budget (verl's default)."""
    max_num_seqs: int = 1024
    """vLLM's cap on running sequences (verl's default); searched unless ``max_num_seqs_pinned``."""
    max_num_seqs_pinned: bool = False
    gpus_per_node: int = 8
    headroom: float = 0.10
    """Fraction of device memory kept free in the training phases."""
    train_pins: Pins = field(default_factory=Pins)

    def __post_init__(self) -> None:
        check_device_count(self.gpus)
        check_seq_len(self.max_prompt_tokens, "--max-prompt-len")
        check_seq_len(self.max_response_tokens, "--max-response-len")
        check_seq_len(self.max_prompt_tokens + self.max_response_tokens, "prompt + response")
        if self.algorithm not in ("grpo", "ppo"):
            raise SpecError(f"--algorithm {self.algorithm!r} is not one of: grpo, ppo")
        if self.framework not in FRAMEWORKS:
            raise SpecError(f"--framework {self.framework!r} is not one of: {', '.join(FRAMEWORKS)}")
        if self.placement not in ("colocated", "separate"):
            raise SpecError(f"--placement {self.placement!r} is not one of: colocated, separate")
        if self.engine is not None and self.engine not in ("fsdp", "megatron"):
            raise SpecError(f"--engine {self.engine!r} is not one of: fsdp, megatron")
        mean = self.mean_response_tokens
        if mean is not None and not 0 < mean <= self.max_response_tokens:
            raise SpecError(f"--mean-response-len {mean!r} must be in (0, --max-response-len "
                            f"{self.max_response_tokens}]")
        if self.placement == "colocated" and self.rollout_gpus is not None:
            raise SpecError("--rollout-gpus needs --placement separate (colocated rollout uses every GPU)")
        if self.rollout_gpus is not None and not 0 < self.rollout_gpus < self.gpus:
            raise SpecError(f"--rollout-gpus {self.rollout_gpus} must leave training GPUs: use 1 … {self.gpus - 1}")

    @property
    def max_tokens(self) -> int:
        return self.max_prompt_tokens + self.max_response_tokens

    @property
    def train_engine(self) -> TrainEngine:
        if self.engine is not None:
            return self.engine
        return "megatron" if self.model.is_moe else "fsdp"


@dataclass(frozen=True, kw_only=True, slots=True)
class RolloutChoice:
    """The chosen rollout engine and what it does."""

    tp: int
    gpu_memory_utilization: float
    engines: int
    requests_per_engine: int
    max_num_seqs: int
    weight_dtype: str
    memory: RolloutMemory
    result: RolloutResult


@dataclass(frozen=True, kw_only=True, slots=True)
class RLPlan:
    """The answer (the ``rl plan --json`` contract is :meth:`to_dict`)."""

    request: RLPlanRequest
    batch: RLBatch
    train: Plan
    train_gpus: int
    sequence_parallel: int
    token_budget_per_gpu: int
    log_prob_token_budget_per_gpu: int
    rollout: RolloutChoice
    memory: dict[str, dict[str, float]]
    step_time_s: dict[str, float]
    fits: bool
    notes: tuple[str, ...] = field(default=())

    @property
    def max_policy_lag(self) -> int:
        extra = self.batch.updates_per_rollout if self.request.placement == "separate" else 0
        return self.batch.max_policy_lag + extra

    @property
    def mean_policy_lag(self) -> float:
        extra = self.batch.updates_per_rollout if self.request.placement == "separate" else 0
        return self.batch.mean_policy_lag + extra

    @property
    def dp(self) -> int:
        return self.train.triad.data_parallel_ranks

    def rule_context(self) -> RuleContext:
        return _context(self.request, self.batch, self.train, self.train_gpus, self.rollout.tp,
                        self.token_budget_per_gpu)

    def to_dict(self) -> dict[str, Any]:
        r, t, ro = self.request, self.train, self.rollout
        return {
            "model": r.model.name, "gpu": r.gpu.name, "gpus": r.gpus, "algorithm": r.algorithm,
            "framework": r.framework, "placement": r.placement,
            "samples_per_rollout": self.batch.samples_per_rollout, "samples_per_update": self.batch.samples_per_update,
            "updates_per_rollout": self.batch.updates_per_rollout, "max_policy_lag": self.max_policy_lag,
            "mean_policy_lag": self.mean_policy_lag, "batch": self.batch.to_dict(),
            "max_prompt_len": r.max_prompt_tokens, "max_response_len": r.max_response_tokens,
            "mean_response_len": r.mean_response_tokens,
            "train": {"engine": r.train_engine, "gpus": self.train_gpus, "dp": self.dp,
                      "tp": t.settings.tp if r.train_engine == "megatron" else 1,
                      "sequence_parallel": self.sequence_parallel, "pp": t.settings.pp, "ep": t.settings.ep,
                      "zero_stage": t.settings.zero_stage, "recompute": t.settings.recompute,
                      "micro_batch_per_gpu": t.triad.micro_batch_sequences,
                      "grad_accum": t.triad.grad_accum_steps, "token_budget_per_gpu": self.token_budget_per_gpu,
                      "log_prob_token_budget_per_gpu": self.log_prob_token_budget_per_gpu},
            "rollout": {"tp": ro.tp, "gpu_memory_utilization": ro.gpu_memory_utilization, "engines": ro.engines,
                        "requests_per_engine": ro.requests_per_engine,
                        "max_num_batched_tokens": r.max_num_batched_tokens, "max_num_seqs": ro.max_num_seqs,
                        "weight_dtype": ro.weight_dtype,
                        "gpus": r.rollout_gpus if r.placement == "separate" else r.gpus,
                        **ro.result.to_dict(), "kv": ro.memory.to_dict()},
            "memory": self.memory, "step_time_s": self.step_time_s, "fits": self.fits, "notes": list(self.notes),
        }


# ------------------------------------------------------------------------------------------------ helpers
def _cluster(gpu: AcceleratorSpec, gpus: int, per_node: int) -> ClusterSpec:
    per_node = min(per_node, gpus)
    if gpus % per_node:
        raise SpecError(f"--gpus {gpus} is not a multiple of {per_node} GPUs per node")
    nodes = gpus // per_node
    return ClusterSpec(accelerator=gpu, devices_per_node=per_node, num_nodes=nodes,
                       inter_node_bandwidth_bytes_per_s=INTER_NODE_BANDWIDTH_BYTES_PER_S if nodes > 1 else None)


def _sp(req: RLPlanRequest, train: Plan) -> int:
    """Ulysses sequence parallel size (verl FSDP) — planned as the plan's tensor-parallel size."""
    return train.settings.tp if req.train_engine == "fsdp" else 1


def _token_budget(req: RLPlanRequest, train: Plan) -> int:
    """Tokens per GPU of the update's micro-batch: micro × longest sequence ÷ sequence parallel."""
    return math.ceil(train.triad.micro_batch_sequences * req.max_tokens / _sp(req, train))


def _context(req: RLPlanRequest, batch: RLBatch, train: Plan | None, train_gpus: int, rollout_tp: int,
             token_budget: int | None) -> RuleContext:
    s = train.settings if train is not None else None
    mp = s.tp * s.pp if s is not None else 1
    return RuleContext(
        batch=batch, gpus=train_gpus, gpus_per_node=req.gpus_per_node, max_prompt_tokens=req.max_prompt_tokens,
        max_response_tokens=req.max_response_tokens, model_parallel=mp,
        micro_batch_per_gpu=train.triad.micro_batch_sequences if train is not None else 1,
        token_budget_per_gpu=token_budget if req.framework == "verl" else None,
        sequence_parallel=_sp(req, train) if train is not None else 1, rollout_tp=rollout_tp,
        rollout_gpus=req.rollout_gpus if req.placement == "separate" else None, num_heads=req.model.num_heads,
        max_position_embeddings=req.model.max_position_embeddings, algorithm=req.algorithm)


def _train_request(req: RLPlanRequest, train_gpus: int) -> PlanRequest:
    settings = RunSettings(precision="bf16", engine="fsdp2" if req.train_engine == "fsdp" else "megatron",
                           sp=True, attention="flash")
    pins = req.train_pins
    if req.train_engine == "fsdp":
        pins = dataclasses.replace(pins, pp=1, ep=1, zero_stage=3)
    context_share = ENGINE_CONTEXT_BYTES / req.gpu.memory_bytes if req.placement == "colocated" else 0.0
    return PlanRequest(model=req.model, cluster=_cluster(req.gpu, train_gpus, req.gpus_per_node),
                       seq_len=req.max_tokens, global_batch_sequences=req.batch.samples_per_update, settings=settings,
                       pins=pins, headroom=min(0.5, req.headroom + context_share), top=50)


TRAIN_RECOMPUTES: tuple[str, ...] = ("none", "selective", "full")
"""Recomputation policies searched for the update (the frameworks' gradient checkpointing is whole-layer or
attention-core)."""


def _train_candidates(req: RLPlanRequest, train_gpus: int) -> list[Plan]:
    """Ranked update plans over :data:`TRAIN_RECOMPUTES` (or the pinned policy)."""
    base = _train_request(req, train_gpus)
    policies = (req.train_pins.recompute,) if req.train_pins.recompute else TRAIN_RECOMPUTES
    plans: list[Plan] = []
    error: BatchpilotError | None = None
    for policy in policies:
        try:
            result = plan(dataclasses.replace(base, pins=dataclasses.replace(base.pins, recompute=policy)),
                          suggest_fixes=False)  # per-policy tries: the fixes only for the last, below
        except BatchpilotError as exc:
            error = error or exc
            continue
        plans.extend(result.plans)
    if not plans:  # the planner's own explanation of why nothing fits, with its re-planned suggestions
        plan(dataclasses.replace(base, pins=dataclasses.replace(base.pins, recompute=policies[-1])))
        assert error is not None
        raise error
    return sorted(plans, key=lambda p: -p.step.tokens_per_s)


def _train_plan(req: RLPlanRequest, train_gpus: int) -> Plan:
    """The fastest update layout that the framework's layout rules accept."""
    first: tuple[Plan, str] | None = None
    for candidate in _train_candidates(req, train_gpus):
        ctx = _context(req, req.batch, candidate, train_gpus, 1, _token_budget(req, candidate))
        message = violation(req.framework, dataclasses.replace(ctx, rollout_tp=1, num_heads=0))
        if message is None:
            return candidate
        first = first or (candidate, message)
    assert first is not None
    ctx = _context(req, req.batch, first[0], train_gpus, 1, _token_budget(req, first[0]))
    raise RLBatchError(f"{req.framework}: {first[1]}; {nearest_choices(req.framework, ctx)}")


def _states_bytes(train: Plan) -> float:
    m = train.memory
    return float(m.weights_bytes + m.gradients_bytes + m.optimizer_bytes)


def _log_prob(req: RLPlanRequest, train: Plan, *, entropy: bool, resident: float) -> tuple[int, dict[str, float]]:
    """The largest log-prob token budget (multiples of the longest sequence per sp group) that fits."""
    sp, tp = _sp(req, train), (train.settings.tp if req.train_engine == "megatron" else 1)
    budget_bytes = req.gpu.memory_bytes * (1 - req.headroom) - OverheadModel().cuda_context_bytes
    best: tuple[int, dict[str, float]] | None = None
    for k in range(1, MAX_LOG_PROB_SEQUENCES + 1):
        terms = log_prob_pass_bytes(req.model, tokens=k * req.max_tokens, tp=tp, sp=sp, resident_bytes=resident,
                                    entropy=entropy)
        if best is not None and sum(terms.values()) > budget_bytes:
            break
        best = (math.ceil(k * req.max_tokens / sp), terms)
        if sum(terms.values()) > budget_bytes:
            break
    assert best is not None
    return best


def _rollout_tps(req: RLPlanRequest, rollout_gpus: int) -> list[int]:
    if req.rollout_tp is not None:
        return [req.rollout_tp]
    limit = min(rollout_gpus, 64)
    return [t for t in range(1, limit + 1) if req.model.num_heads % t == 0 and rollout_gpus % t == 0
            and (t & (t - 1)) == 0]


def _max_num_seqs_candidates(req: RLPlanRequest, mem: RolloutMemory) -> list[int]:
    """``max_num_seqs`` values tried (unless pinned): the concurrency at which every running sequence fits at
    full length × 1, 2, 4 (over-committing pays when most responses end early), capped by ``max_num_seqs``.
    Beyond 4× the engine mostly preempts and recomputes (measured in the simulation: R1-Zero's batch at
    1,024 ran 3× slower than at 1×), so the default 1,024 is tried only when it is within that range."""
    if req.max_num_seqs_pinned:
        return [req.max_num_seqs]
    full = max(1, mem.kv_capacity_tokens // req.max_tokens)
    return sorted({min(req.max_num_seqs, full * m) for m in (1, 2, 4)})


def _rollout(req: RLPlanRequest, rollout_gpus: int, resident: float) -> RolloutChoice:
    """The fastest rollout TP and ``max_num_seqs`` (each TP at the largest utilisation the GPU grants)."""
    memory = req.gpu.memory_bytes
    grantable = (memory - 2 * ENGINE_CONTEXT_BYTES - resident) / memory
    weight_dtype = checkpoint_weight_dtype(req.model)
    best: RolloutChoice | None = None
    reasons: list[str] = []
    for tp in _rollout_tps(req, rollout_gpus):
        gmu = req.gpu_memory_utilization or math.floor(min(MAX_GPU_MEMORY_UTILIZATION, grantable) * 100) / 100
        if gmu <= 0 or gmu > grantable + 1e-9:
            reasons.append(f"tp {tp}: gpu_memory_utilization {gmu:.2f} > {max(0.0, grantable):.2f} the GPU can grant "
                           f"next to {resident / 2**30:.1f} GiB resident")
            continue
        mem = rollout_memory(req.model, memory_bytes=memory, tp=tp, gpu_memory_utilization=gmu,
                             max_num_batched_tokens=req.max_num_batched_tokens, max_num_seqs=req.max_num_seqs,
                             weight_dtype=weight_dtype)
        try:
            check_kv_holds_one_request(mem, req.max_tokens, f"rollout tp {tp}")
        except InfeasibleError as exc:
            reasons.append(str(exc))
            continue
        engines = rollout_gpus // tp
        per_engine = -(-req.batch.samples_per_rollout // engines)
        work = Workload(requests=per_engine, prompt_tokens=req.max_prompt_tokens,
                        response_tokens=response_lengths(per_engine, max_tokens=req.max_response_tokens,
                                                         mean_tokens=req.mean_response_tokens))
        engine = EngineModel.build(req.model, req.gpu, tp=tp, weight_dtype=weight_dtype,
                                   gpus_per_node=req.gpus_per_node)
        for seqs in _max_num_seqs_candidates(req, mem):
            try:
                result = simulate_rollout(engine, mem, work, max_num_batched_tokens=req.max_num_batched_tokens,
                                          max_num_seqs=seqs, time_limit_s=best.result.time_s if best else None)
            except InfeasibleError as exc:
                reasons.append(f"tp {tp}, max_num_seqs {seqs}: {exc}")
                continue
            if result is not None and (best is None or result.time_s < best.result.time_s):
                best = RolloutChoice(tp=tp, gpu_memory_utilization=gmu, engines=engines,
                                     requests_per_engine=per_engine, max_num_seqs=seqs, weight_dtype=weight_dtype,
                                     memory=mem, result=result)
    if best is None:
        raise InfeasibleError("no rollout engine fits: " + "; ".join(reasons[:3]))
    return best


# ------------------------------------------------------------------------------------------------ the plan
def plan_rl(req: RLPlanRequest) -> RLPlan:
    """Plan ``req`` (module docstring); refuses a batch the framework would reject, in one line."""
    if req.placement == "colocated":
        check(req.framework, dataclasses.replace(_context(req, req.batch, None, req.gpus, 1, None), num_heads=0))
    if req.placement == "separate":
        candidates = [req.rollout_gpus] if req.rollout_gpus else _separate_splits(req)
        plans = []
        errors: list[str] = []
        for rollout_gpus in candidates:
            try:
                plans.append(_plan_with(dataclasses.replace(req, rollout_gpus=rollout_gpus)))
            except BatchpilotError as exc:
                errors.append(f"{rollout_gpus} rollout GPUs: {exc}")
        if not plans:
            raise InfeasibleError("no split of the GPUs between rollout and training works: " + " | ".join(errors[:2]))
        return min(plans, key=lambda p: p.step_time_s["step"])
    return _plan_with(req)


def _separate_splits(req: RLPlanRequest) -> list[int]:
    node = min(req.gpus_per_node, req.gpus)
    units = req.gpus // node
    return sorted({max(1, round(units * f)) * node for f in (0.25, 0.5, 0.75) if 0 < round(units * f) < units})


def _plan_with(req: RLPlanRequest) -> RLPlan:
    rollout_gpus = req.rollout_gpus if req.placement == "separate" else req.gpus
    assert rollout_gpus is not None
    train_gpus = req.gpus - rollout_gpus if req.placement == "separate" else req.gpus
    check(req.framework, dataclasses.replace(_context(req, req.batch, None, train_gpus, 1, None), num_heads=0))
    train = _train_plan(req, train_gpus)
    states = _states_bytes(train)
    optimizer_resident = 0.0 if req.offload else float(train.memory.optimizer_bytes)
    actor_resident = float(train.memory.weights_bytes) + optimizer_resident
    ref_weights = req.model.params_total * 2 / train_gpus if req.reference else 0.0
    lp_budget, lp_terms = _log_prob(req, train, entropy=True, resident=actor_resident)
    memory: dict[str, dict[str, float]] = {"actor_update": _update_memory(train)}
    memory["old_log_prob"] = _phase(lp_terms, req)
    if req.reference:
        _, ref_terms = _log_prob(req, train, entropy=False, resident=actor_resident + ref_weights)
        memory["reference"] = _phase(ref_terms, req)
    if req.algorithm == "ppo":
        memory["critic_update"] = _update_memory(train)
        _, critic_terms = _log_prob(req, train, entropy=False, resident=actor_resident)
        memory["critic_values"] = _phase({k: v for k, v in critic_terms.items() if "logits" not in k}, req)
    colocated_resident = 0.0
    if req.placement == "colocated":
        colocated_resident = 0.0 if req.offload else states + ref_weights
    rollout = _rollout(req, rollout_gpus, colocated_resident)
    check(req.framework, _context(req, req.batch, train, train_gpus, rollout.tp, _token_budget(req, train)))
    memory["rollout"] = {**rollout.memory.to_dict(), "total_bytes": rollout.memory.requested_bytes,
                         "resident_training_bytes": colocated_resident,
                         "fits": rollout.memory.requested_bytes + colocated_resident + 2 * ENGINE_CONTEXT_BYTES
                         <= req.gpu.memory_bytes}
    times = _times(req, train, train_gpus, rollout, lp_budget, states)
    fits = all(bool(m["fits"]) for m in memory.values())
    return RLPlan(request=req, batch=req.batch, train=train, train_gpus=train_gpus, sequence_parallel=_sp(req, train),
                  token_budget_per_gpu=_token_budget(req, train), log_prob_token_budget_per_gpu=lp_budget,
                  rollout=rollout, memory=memory, step_time_s=times, fits=fits)


def _update_memory(train: Plan) -> dict[str, float]:
    m = train.memory
    return {"weights_bytes": m.weights_bytes, "gradients_bytes": m.gradients_bytes,
            "optimizer_bytes": m.optimizer_bytes, "activations_bytes": m.activations_bytes,
            "overhead_bytes": m.overhead_bytes, "total_bytes": m.total_bytes, "fits": True}


def _phase(terms: dict[str, float], req: RLPlanRequest) -> dict[str, float]:
    total = sum(terms.values()) + OverheadModel().cuda_context_bytes
    budget = req.gpu.memory_bytes * (1 - req.headroom)
    return {**{f"{k}_bytes": v for k, v in terms.items()}, "total_bytes": total, "fits": total <= budget}


def _times(req: RLPlanRequest, train: Plan, train_gpus: int, rollout: RolloutChoice, lp_budget: int,
           states: float) -> dict[str, float]:
    b = req.batch
    mean_response = req.mean_response_tokens or req.max_response_tokens
    mean_len = req.max_prompt_tokens + mean_response
    total_tokens = b.samples_per_rollout * mean_len
    tp = train.settings.tp if req.train_engine == "megatron" else 1
    forward = forward_time_s(req.model, req.gpu, total_tokens=total_tokens, seq_len=req.max_tokens, gpus=train_gpus,
                             micro_tokens=lp_budget, tp=tp)
    update = train.step.step_time_s * b.updates_per_rollout * mean_len / req.max_tokens
    times = {"rollout": rollout.result.time_s, "old_log_prob": forward}
    if req.reference:
        times["reference"] = forward
    if req.algorithm == "ppo":
        times["critic_values"] = forward
        times["critic_update"] = update
    times["actor_update"] = update
    times["weight_sync"] = weight_sync_s(req.model, req.gpu, rollout_tp=rollout.tp)
    if req.placement == "colocated" and req.offload:
        times["offload"] = offload_s(states)
    train_s = sum(v for k, v in times.items() if k not in ("rollout", "weight_sync"))
    if req.placement == "separate":
        times["step"] = max(times["rollout"], train_s) + times["weight_sync"]
    else:
        times["step"] = sum(times.values())
    return times
