"""One probe trial: real training steps of the real model at one micro-batch size, OOM-safe.

This module runs *inside* the trial process (CPU) or the probing process itself (CUDA); the parent
side — process management, timeouts, interrupts — is :mod:`batchpilot.measure.cpu_runner` and
:mod:`batchpilot.measure.cuda_runner`. It imports torch and transformers at module level on purpose:
the probe's fork server preloads it, so each trial process starts with both already imported (≈ 4.5 s
saved per trial on a 2-core machine).

A trial: the trainer's training step (:func:`batchpilot.measure.step.build_step`: the model from its
Hugging Face config, seeded; autocast; the fp32 token-sum loss; clipping; the trainer's fused AdamW)
on random tokens of shape ``micro_batch × seq_len``; create the optimizer state (inside the budget, see
:func:`batchpilot.measure.step.materialise_optimizer_state`), run ``warmup_steps`` full steps and then
``timed_steps`` timed ones; at least 2 steps in all. Every step, the first included, holds optimizer
state, gradients and activations together: the training peak.

Why one step is not enough (measured, torch 2.13 CPU, this module's recipe): the second step's peak
address space is higher than the first's — glibc's heap of small (< 128 KiB) allocations grows by
0.1–0.9 MiB from step to step (VmPeak after step 2 − after step 1: +144 KiB for bench-llama-3m at
sequence 512, micro-batch 8; +352 KiB for tiny-llama-1m, SDPA, sequence 128, micro-batch 12; +660 KiB
for tiny-llama-1m, eager, sequence 64, micro-batch 7). Under a real limit set to the first step's peak
+ 16 … 768 KiB, that last trial completed step 1 and failed in step 2 with the allocator's error (at
+ 1 MiB both ran). A size that passed one step can therefore fail the next: a fit needs two.

CPU memory limit (CPU out-of-memory is real and catchable: under ``RLIMIT_AS`` torch raises ``RuntimeError: … DefaultCPUAllocator: can't allocate memory``): after the model and the
optimizer are built and the thread pool has started, the process measures its address-space size
(``VmSize``) as the baseline and sets ``RLIMIT_AS = baseline + budget``. glibc's mmap threshold is
fixed at 128 KiB with ``mallopt(M_MMAP_THRESHOLD)`` — the same effect as
``MALLOC_MMAP_THRESHOLD_=131072`` — so every tensor buffer is its own mapping and is returned on free.
The allocator then genuinely fails (``RuntimeError: … DefaultCPUAllocator: can't allocate memory``),
the trial reports "does not fit", and the process exits. Peak memory is the growth of the address
space over the baseline (``VmPeak − baseline``): exactly the quantity the limit constrains. ``VmPeak``
never goes down, so a transient before the baseline would hide a smaller growth during the steps:
glibc's arena cap is set to one (``mallopt(M_ARENA_MAX, 1)``) before the thread pool starts, because
each new thread's arena otherwise reserves — and transiently maps twice — 64 MiB of address space
(measured: ``VmPeak − VmSize`` = 63.7 MiB after starting a second intra-op thread, 0 with the cap).
Should ``VmPeak`` still not rise above its value at the baseline, ``VmPeak − baseline`` is reported as
what it then is, an upper bound (``peak_source`` = ``address-space-upper-bound``).

CUDA: the budget caps the caching allocator (``torch.cuda.set_per_process_memory_fraction``);
``torch.OutOfMemoryError`` is caught, everything is freed, and the peak is
``torch.cuda.max_memory_reserved()``. Under ``torch.distributed`` every rank runs the same trial and
the outcome is the all-reduce (MAX) of the failure flag, so all ranks agree and none hangs.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import resource
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import transformers  # noqa: F401  (preloaded by the fork server: the step builds a transformers model)

from batchpilot.measure.step import StepConfig, TrainingStep, build_step, materialise_optimizer_state
from batchpilot.measure.trace import trace
from batchpilot.specs.finetune import parse_finetune

M_MMAP_THRESHOLD = -3
"""glibc ``mallopt`` parameter number of ``M_MMAP_THRESHOLD`` (malloc.h)."""
MMAP_THRESHOLD_BYTES = 131072
"""128 KiB: the same as ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment of a fresh process."""
M_ARENA_MAX = -8
"""glibc ``mallopt`` parameter number of ``M_ARENA_MAX`` (malloc.h)."""

_OOM_MESSAGES = ("can't allocate memory", "cannot allocate memory", "bad_alloc", "out of memory")


@dataclass(frozen=True, kw_only=True, slots=True)
class TrialSpec:
    """Everything a trial process needs (plain values: it crosses a process boundary)."""

    hf_config: dict[str, Any]
    """The model's Hugging Face config (``transformers.AutoConfig.for_model(**hf_config)``)."""
    seq_len: int
    """Tokens per sequence: the worst case of the data."""
    micro_batch: int
    device: str
    """``cpu`` or ``cuda`` (``cuda:N`` under torchrun is chosen from ``LOCAL_RANK``)."""
    budget_bytes: int
    """CPU: address space allowed above the baseline. CUDA: the caching allocator's cap."""
    precision: str = "fp32"
    recompute: str = "none"
    recompute_every: int = 1
    """Checkpoint 1 layer in N under ``recompute`` (:mod:`batchpilot.measure.recompute`)."""
    attention: str = "flash"
    optimizer: str = "adamw"
    warmup_steps: int = 1
    timed_steps: int = 1
    seed: int = 0
    param_dtype: str = "fp32"
    finetune: str = "full"
    """``--finetune`` as text (:func:`batchpilot.specs.finetune.parse_finetune`)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TrialReport:
    """What one trial measured."""

    micro_batch: int
    fits: bool
    peak_bytes: int | None
    """CPU: address-space growth over the baseline; CUDA: peak reserved by the caching allocator."""
    tokens_per_s: float | None
    """``micro_batch × seq_len`` over the fastest timed step (the least disturbed by other load)."""
    step_seconds: float | None
    """The fastest timed step."""
    baseline_bytes: int | None = None
    """CPU: the address-space size the limit was set above."""
    peak_source: str = "address-space"
    """CPU: ``address-space`` (VmPeak growth) or ``address-space-upper-bound`` (module docstring).
    CUDA: ``allocator``."""
    error: str | None = None
    """The allocator's message (first line) when the trial did not fit."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_oom(exc: BaseException) -> bool:
    """An allocator failure (CPU under RLIMIT_AS, or CUDA), as opposed to any other error."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MESSAGES)


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def set_mmap_threshold() -> None:
    """``mallopt(M_MMAP_THRESHOLD, 128 KiB)`` and ``mallopt(M_ARENA_MAX, 1)`` in this process (glibc only;
    a no-op elsewhere). See the module docstring for both."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(M_ARENA_MAX, 1)


def build(spec: TrialSpec, device: torch.device) -> TrainingStep:
    """The trainer's step (:func:`batchpilot.measure.step.build_step`) for ``spec`` on ``device``."""
    config = StepConfig(precision=spec.precision, attention=spec.attention, recompute=spec.recompute,
                        recompute_every=spec.recompute_every, optimizer=spec.optimizer, seed=spec.seed,
                        param_dtype=spec.param_dtype, finetune=parse_finetune(spec.finetune))
    return build_step(spec.hf_config, config, micro_batch=spec.micro_batch, seq_len=spec.seq_len, device=device)


def train_steps(spec: TrialSpec, step: TrainingStep, device: torch.device) -> list[float]:
    """Optimizer state first (:func:`batchpilot.measure.step.materialise_optimizer_state`), then the
    warm-up steps and the timed steps; returns the timed steps' seconds."""
    with _one_intra_op_thread(device):
        materialise_optimizer_state(step.module, step.optimizer)
    trace("state-materialised", spec.micro_batch)
    times = []
    for i in range(spec.warmup_steps + spec.timed_steps):
        _sync(device)
        start = time.perf_counter()
        step.run()
        _sync(device)
        if i >= spec.warmup_steps:
            times.append(time.perf_counter() - start)
        trace(f"step-{i}-end", spec.micro_batch)
    return times


@contextlib.contextmanager
def _one_intra_op_thread(device: torch.device) -> Iterator[None]:
    """CPU: run the block on one intra-op thread, then restore the count.

    For :func:`batchpilot.measure.step.materialise_optimizer_state`: a few tiny element-wise ops per
    parameter tensor, each a parallel region whose barrier waits for every pool thread. With the cores
    shared, a descheduled thread stalls each barrier for a time slice: measured here (2 shared cores,
    bench-llama-3m, 39 tensors, torch's per-tensor AdamW loop) 2.1–3.9 s on 2 threads, 0.05–0.07 s on 1. The tensors and
    transients are the same on any thread count; the pool keeps its threads (``Threads`` and ``VmSize``
    unchanged across the switch), so nothing is mapped after the baseline."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _report(spec: TrialSpec, times: list[float], peak: int | None, baseline: int | None) -> TrialReport:
    best = min(times) if times else None
    tps = spec.micro_batch * spec.seq_len / best if best else None
    return TrialReport(micro_batch=spec.micro_batch, fits=True, peak_bytes=peak, tokens_per_s=tps,
                       step_seconds=best, baseline_bytes=baseline)


def _failed(spec: TrialSpec, exc: BaseException, baseline: int | None) -> TrialReport:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return TrialReport(micro_batch=spec.micro_batch, fits=False, peak_bytes=None, tokens_per_s=None,
                       step_seconds=None, baseline_bytes=baseline, error=first)


@dataclass(frozen=True, kw_only=True, slots=True)
class AddressSpace:
    """This process's address space when its limit was set (:func:`limit_address_space`)."""

    baseline_bytes: int
    """``VmSize`` then: what the limit sits above."""
    peak_before_bytes: int
    """``VmPeak`` then (it never goes down: a peak at or below it is only an upper bound)."""

    def growth(self) -> tuple[int, str]:
        """``VmPeak`` now − the baseline, and its ``peak_source`` (module docstring)."""
        peak = _proc_status_bytes("VmPeak")
        source = "address-space" if peak > self.peak_before_bytes else "address-space-upper-bound"
        return max(0, peak - self.baseline_bytes), source


def limit_address_space(budget_bytes: int) -> AddressSpace:
    """Start the intra-op thread pool, take ``VmSize`` as the baseline and set ``RLIMIT_AS`` = baseline +
    ``budget_bytes`` (within the hard limit). Call :func:`set_mmap_threshold` before anything is allocated.
    The probe's measurement, applied to whatever runs next in this process — a trial's steps here, a
    trainer's steps in ``tests/measure/test_step_equivalence.py``."""
    torch.ones(256, 256) @ torch.ones(256, 256)  # start the intra-op thread pool before the limit
    space = AddressSpace(baseline_bytes=_proc_status_bytes("VmSize"), peak_before_bytes=_proc_status_bytes("VmPeak"))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = space.baseline_bytes + budget_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return space


def run_cpu_trial(spec: TrialSpec, on_limit_set: Any = None) -> TrialReport:
    """A CPU trial in *this* process: it sets this process's RLIMIT_AS, so run it in a throwaway one."""
    set_mmap_threshold()
    device = torch.device("cpu")
    step = build(spec, device)
    trace("built", spec.micro_batch)
    space = limit_address_space(spec.budget_bytes)
    if on_limit_set is not None:
        on_limit_set(space.baseline_bytes)
    trace("limit-set", spec.micro_batch)
    try:
        times = train_steps(spec, step, device)
    except (RuntimeError, MemoryError) as exc:
        if not is_oom(exc):
            raise
        del step
        gc.collect()
        trace("failed", spec.micro_batch)
        return _failed(spec, exc, space.baseline_bytes)
    peak, source = space.growth()
    return replace(_report(spec, times, peak, space.baseline_bytes), peak_source=source)


def matmul_flops_per_s(precision: str = "fp32", size: int = 1024, repeats: int = 5) -> float:
    """This CPU's dense matmul rate: ``2·n³`` FLOPs per ``n×n`` product, fastest of ``repeats``.

    The CPU's stand-in for a datasheet peak (CPUs are not in the accelerator catalog); efficiencies in a
    CPU calibration are relative to it.
    """
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


@contextlib.contextmanager
def _cuda_budget(device: torch.device, budget_bytes: int) -> Iterator[None]:
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def agree_across_ranks(failed: bool, peak_bytes: int, tokens_per_s: float,
                       device: torch.device) -> tuple[bool, int, float]:
    """All ranks' common verdict, one all-reduce (MAX) of ``[failed, peak, −tokens/s]``: failed on any
    rank means failed on all, the peak is the largest, tokens/s the slowest rank's. Without
    ``torch.distributed`` initialised, the inputs unchanged."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return failed, peak_bytes, tokens_per_s
    values = torch.tensor([1.0 if failed else 0.0, float(peak_bytes), -tokens_per_s],
                          dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return bool(values[0].item()), int(values[1].item()), -float(values[2].item())


def run_cuda_trial(spec: TrialSpec) -> TrialReport:
    """A CUDA trial in this process: OOM is caught, memory freed, all ranks agree on the outcome."""
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    message: str | None = None
    times: list[float] = []
    with _cuda_budget(device, spec.budget_bytes):
        try:
            step = build(spec, device)
            times = train_steps(spec, step, device)
            del step
        except (RuntimeError, MemoryError) as exc:
            if not is_oom(exc):
                raise
            message = (str(exc).strip().splitlines() or ["out of memory"])[0][:300]
        # the exception (and the frames holding the step's tensors) is gone here: free the cache
        gc.collect()
        torch.cuda.empty_cache()
    ok = _report(spec, times, int(torch.cuda.max_memory_reserved(device)), None)
    failed, peak, tps = agree_across_ranks(message is not None, ok.peak_bytes or 0, ok.tokens_per_s or 0.0, device)
    if failed:
        return _failed(spec, RuntimeError(message or "out of memory on another rank"), None)
    return TrialReport(micro_batch=spec.micro_batch, fits=True, peak_bytes=peak, tokens_per_s=tps,
                       step_seconds=ok.step_seconds, peak_source="allocator")
