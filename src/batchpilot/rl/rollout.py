"""Rollout time: vLLM's scheduler simulated block by block, each engine step timed on the roofline.

Example (CPU, well under a second)::

    >>> from batchpilot.specs.model import load_model
    >>> from batchpilot.specs.hardware import load_accelerator
    >>> from batchpilot.rl.kv import rollout_memory
    >>> model, gpu = load_model("qwen2.5-7b"), load_accelerator("h100-sxm")
    >>> mem = rollout_memory(model, memory_bytes=gpu.memory_bytes, tp=1, gpu_memory_utilization=0.6,
    ...                      max_num_batched_tokens=8192)
    >>> r = simulate_rollout(EngineModel.build(model, gpu, tp=1), mem, Workload(requests=64, prompt_tokens=512,
    ...                      response_tokens=(4096,) * 64), max_num_batched_tokens=8192)
    >>> r.preemptions, r.peak_running
    (0, 64)

The scheduler (vLLM ``vllm/v1/core/sched/scheduler.py`` ``Scheduler.schedule`` at commit 00024d31):

1. Running requests first, in admission order, each asking for the tokens it has not computed (1 when
   decoding, a chunk of at most the remaining ``max_num_batched_tokens`` budget when prefilling). When the
   KV blocks for them are not free, the NEWEST running request is preempted (``self.running.pop()``): its
   blocks are freed, its computed tokens reset to 0 and it goes back to the FRONT of the waiting queue
   (it will prefill prompt + generated tokens again: recompute preemption).
2. Only in a step without preemption, waiting requests are admitted in order while fewer than
   ``max_num_seqs`` run, budget is left and the blocks for their first chunk are free. Admission looks
   at the prompt only, so the cache is over-committed and decoding long responses preempts: rollouts
   proceed in waves when the cache cannot hold every sequence at full length.

A block holds 16 tokens of every layer (:data:`batchpilot.rl.kv.BLOCK_SIZE_TOKENS`). Steps in which
every running request only decodes and nothing can be admitted are advanced in one jump up to the next
finish or the next step whose blocks run out (the state is linear in between), so a 32K-token rollout
of hundreds of requests is simulated in milliseconds.

Step time (one engine of ``tp`` GPUs): max(memory time, compute time) + tensor-parallel all-reduces.
Memory: the weights one step reads (all of a dense model; for MoE the non-expert weights plus the
experts the step's tokens touch, E·(1 − (1 − k/E)^n) per layer) and the KV cache of every scheduled
request, ÷ (HBM bandwidth × :data:`DECODE_BANDWIDTH_EFFICIENCY`). Compute: 2 FLOPs per weight and token
plus attention over the context, ÷ (tp × dense peak × the compute-bound matmul efficiency of
:mod:`batchpilot.estimate.calibration` at the per-GPU width). All-reduce: 2 per layer,
:data:`ALL_REDUCE_LATENCY_S` + ring bytes ÷ the group's link (intra-node, or the network when TP spans nodes). Known error: the two constants are
assumptions (not fitted to any run); sampling, detokenisation and the engine's CPU overhead per step
are not modelled (they matter below ~1 ms per step).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from batchpilot.errors import InfeasibleError
from batchpilot.estimate.calibration import MatmulShape, default_efficiency
from batchpilot.estimate.dtypes import DTYPE_BYTES
from batchpilot.rl.kv import BLOCK_SIZE_TOKENS, RolloutMemory
from batchpilot.specs.hardware import AcceleratorSpec
from batchpilot.specs.model import ModelSpec

DECODE_BANDWIDTH_EFFICIENCY = 0.7
"""Fraction of peak HBM bandwidth a decode step's weight and KV reads achieve (an assumption; inference
engines commonly report 60–80 % "model bandwidth utilisation" for batched decode)."""

ALL_REDUCE_LATENCY_S = 15e-6
"""Latency of one small tensor-parallel all-reduce inside a node (an assumption of the order NCCL reaches
on NVLink); decode steps run 2 per layer."""

SATURATED_ROWS = 1e9
"""GEMM rows at which the default efficiency curve reads its compute-bound value: the curve's small-M
drop models weight reads, which the memory time here counts already."""

MAX_SIMULATED_STEPS = 2_000_000
"""Explicit scheduler steps simulated at most per engine (jumps excluded): beyond it the workload is
refused as pathological (every step preempting) rather than simulated for minutes."""


@dataclass(frozen=True, kw_only=True, slots=True)
class EngineModel:
    """What one inference engine's step time depends on."""

    tp: int
    layers: int
    dense_weight_bytes: float
    """Weights every step reads on one GPU (all but the routed experts)."""
    expert_bytes: float
    """One routed expert's weights on one GPU (0 for dense models)."""
    experts: int
    experts_per_token: int
    moe_layers: int
    matmul_flops_per_token: float
    """Forward FLOPs of the weights per token (2 per active weight)."""
    attention_flops_per_context_token: float
    """Forward attention FLOPs of one new token per token of context it attends to."""
    kv_bytes_per_token: int
    hidden_size: int
    peak_flops_per_s: float
    bandwidth_bytes_per_s: float
    link_bandwidth_bytes_per_s: float
    """Per-GPU bandwidth of the tensor-parallel group: intra-node, or the network when TP spans nodes."""

    @classmethod
    def build(cls, model: ModelSpec, gpu: AcceleratorSpec, *, tp: int, weight_dtype: str = "bf16",
              gpus_per_node: int = 8, inter_node_bandwidth_bytes_per_s: float = 50e9) -> EngineModel:
        from batchpilot.rl.kv import kv_bytes_per_token

        size = DTYPE_BYTES[weight_dtype]
        link = gpu.intra_node_bandwidth_bytes_per_s if tp <= gpus_per_node else inter_node_bandwidth_bytes_per_s
        routed = model.num_moe_layers * model.num_experts * model.params_expert
        return cls(
            tp=tp, layers=model.num_layers, dense_weight_bytes=(model.params_total - routed) * size / tp,
            expert_bytes=model.params_expert * size / tp, experts=model.num_experts,
            experts_per_token=model.num_experts_per_token, moe_layers=model.num_moe_layers,
            matmul_flops_per_token=2.0 * model.matmul_params_per_token,
            attention_flops_per_context_token=2.0 * model.num_layers * model.num_heads
            * (model.head_dim_qk + model.head_dim_v),
            kv_bytes_per_token=kv_bytes_per_token(model, tp=tp), hidden_size=model.hidden_size,
            peak_flops_per_s=gpu.peak_flops_per_s("fp8" if weight_dtype == "fp8" else "bf16"),
            bandwidth_bytes_per_s=gpu.memory_bandwidth_bytes_per_s, link_bandwidth_bytes_per_s=link,
        )

    def step_time_s(self, tokens: float, context_tokens: float) -> float:
        """One engine step computing ``tokens`` new tokens that attend to ``context_tokens`` in all."""
        if tokens <= 0:
            return 0.0
        touched = self.experts * (1.0 - (1.0 - self.experts_per_token / self.experts) ** tokens) if self.experts else 0
        weights = self.dense_weight_bytes + self.moe_layers * touched * self.expert_bytes
        memory_s = (weights + context_tokens * self.kv_bytes_per_token) / (
            self.bandwidth_bytes_per_s * DECODE_BANDWIDTH_EFFICIENCY)
        flops = tokens * self.matmul_flops_per_token + context_tokens * self.attention_flops_per_context_token
        shape = MatmulShape(tokens=SATURATED_ROWS, width=self.hidden_size / self.tp,
                            flops_per_byte=self.peak_flops_per_s / self.bandwidth_bytes_per_s)
        compute_s = flops / (self.tp * self.peak_flops_per_s * default_efficiency(shape))
        comm_s = 0.0
        if self.tp > 1:
            ring = 2.0 * (self.tp - 1) / self.tp * tokens * self.hidden_size * 2
            comm_s = 2 * self.layers * (ALL_REDUCE_LATENCY_S + ring / self.link_bandwidth_bytes_per_s)
        return max(memory_s, compute_s) + comm_s


@dataclass(frozen=True, kw_only=True, slots=True)
class Workload:
    """The requests one engine serves in a rollout."""

    requests: int
    prompt_tokens: int
    response_tokens: tuple[int, ...]
    """Response length of each request (the longest sets the tail)."""


def response_lengths(count: int, *, max_tokens: int, mean_tokens: float | None) -> tuple[int, ...]:
    """``count`` response lengths: all ``max_tokens`` when no mean is given (the worst case); otherwise the
    quantiles (i + 1)/count of a truncated exponential on [0, max] with that mean — a decreasing density
    for means below max/2, uniform at max/2, increasing above — so the longest is always ``max_tokens``."""
    if mean_tokens is None or mean_tokens >= max_tokens:
        return (max_tokens,) * count
    rate = _rate_for_mean(mean_tokens / max_tokens)
    out = []
    for i in range(count):
        q = (i + 1) / count
        x = q if abs(rate) < 1e-9 else -math.log(1.0 - q * (1.0 - math.exp(-rate))) / rate
        out.append(max(1, min(max_tokens, round(x * max_tokens))))
    return tuple(out)


def _truncated_mean(rate: float) -> float:
    """Mean of the exponential density ∝ e^(−rate·x) on [0, 1]."""
    if abs(rate) < 1e-9:
        return 0.5
    return 1.0 / rate - 1.0 / math.expm1(rate)


def _rate_for_mean(mean: float) -> float:
    """The rate whose truncated mean on [0, 1] is ``mean`` (bisection; the mean falls as the rate grows)."""
    lo, hi = -200.0, 200.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if _truncated_mean(mid) > mean:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass(kw_only=True, slots=True)
class _Request:
    prompt: int
    target: int
    generated: int = 0
    cached: int = 0
    blocks: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt + self.generated


@dataclass(frozen=True, kw_only=True, slots=True)
class RolloutResult:
    """What the simulated engine did."""

    time_s: float
    steps: int
    preemptions: int
    peak_running: int
    mean_running: float
    """Step-weighted mean of running requests (the batch decode ran at)."""
    waves: float
    """Total tokens computed ÷ the cache's token capacity: 1 when every sequence fits at once."""
    recomputed_tokens: int
    """Tokens prefilled again after preemption."""
    generated_tokens: int
    tail_s: float = 0.0
    """Time after the first request finished with fewer than half the peak running (the long tail)."""
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {"time_s": self.time_s, "steps": self.steps, "preemptions": self.preemptions,
                "peak_running": self.peak_running, "mean_running": self.mean_running, "waves": self.waves,
                "recomputed_tokens": self.recomputed_tokens, "generated_tokens": self.generated_tokens,
                "tail_s": self.tail_s}


class _Sim:
    """The scheduler state of one engine (see the module docstring)."""

    def __init__(self, engine: EngineModel, mem: RolloutMemory, work: Workload, budget: int, max_num_seqs: int):
        self.engine, self.budget, self.max_num_seqs = engine, budget, max_num_seqs
        self.free = mem.num_blocks
        self.capacity = mem.kv_capacity_tokens
        self.waiting: deque[_Request] = deque(_Request(prompt=work.prompt_tokens, target=t)
                                              for t in work.response_tokens)
        self.running: list[_Request] = []
        self.time_s = self.tail_s = 0.0
        self.steps = self.preemptions = self.recomputed = self.peak = 0
        self.running_steps = 0.0
        self.finished = 0

    @staticmethod
    def _blocks(tokens: int) -> int:
        return -(-tokens // BLOCK_SIZE_TOKENS)

    def _preempt_newest(self) -> _Request:
        victim = self.running.pop()
        self.free += victim.blocks
        self.recomputed += victim.tokens
        victim.blocks = victim.cached = 0
        self.waiting.appendleft(victim)
        self.preemptions += 1
        return victim

    def explicit_step(self) -> None:
        budget, scheduled, preempted = self.budget, [], False
        i = 0
        while i < len(self.running) and budget > 0:
            r = self.running[i]
            need = min(r.tokens - r.cached, budget)
            extra = self._blocks(r.cached + need) - r.blocks
            while extra > self.free:
                victim = self._preempt_newest()
                preempted = True
                if victim is r:
                    break
            if r not in self.running[i:i + 1]:
                break
            self.free -= extra
            r.blocks += extra
            scheduled.append((r, need))
            budget -= need
            i += 1
        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                r = self.waiting[0]
                need = min(r.tokens, budget)
                blocks = self._blocks(need)
                if blocks > self.free:
                    break
                self.waiting.popleft()
                self.free -= blocks
                r.blocks = blocks
                self.running.append(r)
                scheduled.append((r, need))
                budget -= need
        tokens = sum(n for _, n in scheduled)
        context = sum(r.cached + n for r, n in scheduled)
        self._advance(self.engine.step_time_s(tokens, context), 1)
        for r, n in scheduled:
            r.cached += n
            if r.cached == r.tokens:
                r.generated += 1
        self._retire()

    def _advance(self, step_s: float, steps: int) -> None:
        self.time_s += step_s * steps
        if self.finished and len(self.running) * 2 < self.peak:
            self.tail_s += step_s * steps
        self.steps += steps
        self.running_steps += len(self.running) * steps
        self.peak = max(self.peak, len(self.running))

    def _retire(self) -> None:
        done = [r for r in self.running if r.generated >= r.target]
        for r in done:
            self.free += r.blocks
            self.running.remove(r)
            self.finished += 1

    def decode_only(self) -> bool:
        """Every running request decodes one token and no waiting request can be admitted."""
        if not self.running or any(r.tokens - r.cached != 1 for r in self.running):
            return False
        if not self.waiting or len(self.running) >= self.max_num_seqs:
            return True
        budget = self.budget - len(self.running)
        return budget <= 0 or self._blocks(min(self.waiting[0].tokens, budget)) > self.free

    def jump(self) -> bool:
        """Advance k ≥ 1 pure-decode steps at once (to the next finish or the last step whose blocks fit)."""
        k_finish = min(r.target - r.generated for r in self.running)

        def extra(k: int) -> int:
            return sum(self._blocks(r.cached + k) - r.blocks for r in self.running)

        if extra(k_finish) <= self.free:
            k = k_finish
        else:
            lo, hi = 0, k_finish  # extra(lo) ≤ free < extra(hi)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if extra(mid) <= self.free else (lo, mid)
            k = lo
        if k < 1:
            return False
        n = len(self.running)
        context0 = sum(r.cached + 1 for r in self.running)
        self._advance(self.engine.step_time_s(n, context0 + n * (k - 1) / 2), k)
        self.free -= extra(k)
        for r in self.running:
            r.cached += k
            r.blocks = self._blocks(r.cached)
            r.generated += k
        self._retire()
        return True


def simulate_rollout(engine: EngineModel, mem: RolloutMemory, work: Workload, *, max_num_batched_tokens: int,
                     max_num_seqs: int = 1024, time_limit_s: float | None = None) -> RolloutResult | None:
    """Run vLLM's scheduler (module docstring) over ``work`` on one engine until every response is done;
    None as soon as the simulated time exceeds ``time_limit_s`` (a search's best so far)."""
    if mem.num_blocks < 1:
        raise InfeasibleError("the rollout engine has no KV cache left after weights and activations; raise "
                              "gpu_memory_utilization or the rollout TP")
    longest = work.prompt_tokens + max(work.response_tokens)
    if mem.kv_capacity_tokens < longest:
        raise InfeasibleError(f"the KV cache ({mem.kv_capacity_tokens:,} tokens) cannot hold one sequence of "
                              f"{longest:,} tokens; raise the rollout TP or gpu_memory_utilization")
    sim = _Sim(engine, mem, work, max_num_batched_tokens, max_num_seqs)
    explicit = 0
    while sim.running or sim.waiting:
        if sim.decode_only() and sim.jump():
            if time_limit_s is not None and sim.time_s > time_limit_s:
                return None
            continue
        sim.explicit_step()
        explicit += 1
        if time_limit_s is not None and sim.time_s > time_limit_s:
            return None
        if explicit > MAX_SIMULATED_STEPS:
            raise InfeasibleError(f"the rollout thrashes: over {MAX_SIMULATED_STEPS:,} scheduler steps with "
                                  f"{sim.preemptions:,} preemptions; raise the KV cache (TP, gpu_memory_utilization)")
    generated = sum(work.response_tokens)
    total = work.requests * work.prompt_tokens + generated
    return RolloutResult(time_s=sim.time_s, steps=sim.steps, preemptions=sim.preemptions, peak_running=sim.peak,
                         mean_running=sim.running_steps / max(1, sim.steps),
                         waves=total / mem.kv_capacity_tokens, recomputed_tokens=sim.recomputed,
                         generated_tokens=generated, tail_s=sim.tail_s)
