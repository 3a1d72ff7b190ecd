"""The probe's prediction: what the analytic memory model expects a trial to measure, before any trial.

The search (:mod:`batchpilot.measure.search`) starts at the predicted largest micro-batch and uses the
predicted bytes per sequence to shape its first guided step, so an exact prediction costs 2 trials (the
size, and the size above it failing).

The analytic model counts a whole step; a trial measures it in its own convention. On CPU a trial's
budget sits above a baseline that already holds the weights (the trial measures its baseline after
building the model and the optimizer object, :mod:`batchpilot.measure._trial`), so the fp32 weights are
taken out of the estimate (:func:`baseline_model_bytes`; autocast's 16-bit weight copies are made during the
step, so they stay in), the process's memory outside torch's allocator is added
(:data:`CPU_OUTSIDE_ALLOCATOR_BYTES`), and the CPU overhead model is used (no CUDA context, no
caching-allocator slack). On CUDA the allocator's cap covers everything the step allocates but the CUDA
context.

Known error (measured, torch 2.13 CPU, 2 shared cores; analytic with the CPU overhead model vs the traced
allocator peak vs the trial's address-space peak): the allocator part within 0.1 % for bench-llama-3m at
sequence 512, eager attention, micro-batch 4–32, fp32 and bf16; the outside-allocator part within
±3 MiB of :data:`CPU_OUTSIDE_ALLOCATOR_BYTES` over those trials and tiny-llama-1m at sequence 128.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from batchpilot.measure.step import optimizer_implementation

if TYPE_CHECKING:
    from batchpilot.estimate.overhead import OverheadModel
    from batchpilot.measure.probe_types import ProbeRequest

CPU_OUTSIDE_ALLOCATOR_BYTES: dict[str, int] = {"fp32": 40 * 2**20, "bf16": 25 * 2**20}
"""Address-space growth of a CPU trial outside torch's allocator, by precision: the math libraries' GEMM
buffers (MKL keeps each thread's packing buffers, 5–10 MB apiece, for reuse — with
``MKL_DISABLE_FAST_MM=1`` the growth of a tiny-llama-1m step at sequence 256 falls by 37 MB; oneDNN's
bf16 kernels), glibc's small-allocation heap and page rounding. Measured as the trial's peak minus the
traced allocator peak (torch 2.13 CPU, 2 intra-op threads): fp32 38.7–41.5 MiB, bf16 23.5–28.1 MiB, over
bench-llama-3m at sequence 512 (eager and SDPA attention, micro-batch 4–32) and tiny-llama-1m at sequence
128 (micro-batch 8 and 30). It grows with the thread count (per-thread buffers: +39 MB from 1 to 2 threads
on tiny-llama-1m at sequence 256); the search corrects the prediction from the first trial's measured
peak. Subtracted from the budget for the prediction only."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Prediction:
    """What the memory model expects before any trial."""

    max_micro_batch: int
    """Largest micro-batch expected to fit: the search's first trial."""
    bytes_per_sequence: float | None = None
    """Memory one more sequence costs, near that size; shapes the search's first guided step."""


Predictor = Callable[["ProbeRequest"], "Prediction | int"]
"""The prediction that seeds the search (an int is a size without a slope)."""


def default_predictor(request: ProbeRequest) -> Prediction:
    """The analytic memory model's largest micro-batch whose trial peak (:func:`analytic_trial_bytes`,
    plus :data:`CPU_OUTSIDE_ALLOCATOR_BYTES` on CPU) fits the budget, and the slope there."""
    from batchpilot.estimate.memory import max_micro_batch

    budget = request.budget_bytes + baseline_model_bytes(request)
    if request.device == "cpu":
        outside = CPU_OUTSIDE_ALLOCATOR_BYTES.get(request.settings.precision, CPU_OUTSIDE_ALLOCATOR_BYTES["fp32"])
        budget = max(1, budget - outside)
    size = max_micro_batch(request.model, request.settings, seq_len=request.seq_len, dp=1,
                           budget_bytes=budget, overhead=trial_overhead(request))
    b = max(size, 1)
    slope = analytic_trial_bytes(request, b + 1) - analytic_trial_bytes(request, b)
    return Prediction(max_micro_batch=size, bytes_per_sequence=float(slope) if slope > 0 else None)


def trial_overhead(request: ProbeRequest) -> OverheadModel:
    """The analytic overhead terms a trial's peak contains: CPU none; CUDA all but the context, which the
    caching allocator's budget (and ``max_memory_reserved``) does not include. Either way the trial's
    optimizer is the trainer's (:func:`batchpilot.measure.step.optimizer_implementation`: fused, no step
    temporaries)."""
    from batchpilot.estimate.overhead import OverheadModel

    base = OverheadModel.cpu() if request.device == "cpu" else OverheadModel(cuda_context_bytes=0)
    return dataclasses.replace(base, optimizer_fused=optimizer_implementation(request.device, fsdp=False) == "fused")


def baseline_model_bytes(request: ProbeRequest) -> int:
    """Bytes of the analytic estimate that a CPU trial's baseline already holds (the fp32 weights, not
    autocast's 16-bit copies: those are made during the step); 0 on CUDA."""
    if request.device != "cpu":
        return 0
    from batchpilot.estimate.memory import analytic_memory

    memory = analytic_memory(request.model, request.settings, micro_batch=1, seq_len=request.seq_len,
                             overhead=trial_overhead(request))
    return memory.weights_bytes - int(memory.details.get("compute_weight_copies", 0))


def analytic_trial_bytes(request: ProbeRequest, micro_batch: int) -> int:
    """The analytic estimate of what a trial's ``peak_bytes`` measures (same baseline convention)."""
    from batchpilot.estimate.memory import analytic_memory

    total = analytic_memory(request.model, request.settings, micro_batch=micro_batch, seq_len=request.seq_len,
                            overhead=trial_overhead(request)).total_bytes
    return total - baseline_model_bytes(request)
