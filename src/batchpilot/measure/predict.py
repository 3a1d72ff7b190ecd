"""The probe's prediction: what the analytic memory model expects a trial to measure, before any trial.

The search (:mod:`batchpilot.measure.search`) starts at the predicted largest micro-batch and uses the
predicted bytes per sequence to shape its first guided step, so an exact prediction costs 2 trials (the
size, and the size above it failing).

The analytic model counts a whole step; a trial measures it in its own convention. On CPU a trial's
budget sits above a baseline that already holds the weights (the trial measures its baseline after
building the model and the optimizer object, :mod:`batchpilot.measure._trial`), so the weights are
taken out of the estimate (:func:`baseline_model_bytes`), :data:`CPU_TRIAL_OVERHEAD_BYTES` is added,
and the CPU overhead model is used (no CUDA context, no caching-allocator slack; the trainer's fused
optimizer). On CUDA the allocator's cap covers everything the step allocates but the CUDA context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batchpilot.estimate.overhead import OverheadModel
    from batchpilot.measure.probe_types import ProbeRequest

CPU_TRIAL_OVERHEAD_BYTES = 6 * 2**20
"""Address-space growth of a CPU trial that the analytic model does not count (autograd graph, Python
heap, page rounding of each mmapped buffer): measured 3.1–6.0 MiB over tiny-llama-1m trials at
sequence 64 and 128, micro-batch 1–14 (torch 2.13 CPU, the probe's trial). Subtracted from the budget
for the prediction only, so the first trial is not one size too large."""


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
    plus :data:`CPU_TRIAL_OVERHEAD_BYTES` on CPU) fits the budget, and the slope there."""
    from batchpilot.estimate.memory import max_micro_batch

    budget = request.budget_bytes + baseline_model_bytes(request)
    if request.device == "cpu":
        budget = max(1, budget - CPU_TRIAL_OVERHEAD_BYTES)
    size = max_micro_batch(request.model, request.settings, seq_len=request.seq_len, dp=1,
                           budget_bytes=budget, overhead=trial_overhead(request))
    b = max(size, 1)
    slope = analytic_trial_bytes(request, b + 1) - analytic_trial_bytes(request, b)
    return Prediction(max_micro_batch=size, bytes_per_sequence=float(slope) if slope > 0 else None)


def trial_overhead(request: ProbeRequest) -> OverheadModel:
    """The analytic overhead terms a trial's peak contains: CPU none (and the trainer's fused optimizer,
    no step transient); CUDA all but the context, which the caching allocator's budget (and
    ``max_memory_reserved``) does not include."""
    from batchpilot.estimate.overhead import OverheadModel

    return OverheadModel.cpu() if request.device == "cpu" else OverheadModel(cuda_context_bytes=0)


def baseline_model_bytes(request: ProbeRequest) -> int:
    """Bytes of the analytic estimate that a CPU trial's baseline already holds (the weights); 0 on CUDA."""
    if request.device != "cpu":
        return 0
    from batchpilot.estimate.memory import analytic_memory

    return analytic_memory(request.model, request.settings, micro_batch=1, seq_len=request.seq_len,
                           overhead=trial_overhead(request)).weights_bytes


def analytic_trial_bytes(request: ProbeRequest, micro_batch: int) -> int:
    """The analytic estimate of what a trial's ``peak_bytes`` measures (same baseline convention)."""
    from batchpilot.estimate.memory import analytic_memory

    total = analytic_memory(request.model, request.settings, micro_batch=micro_batch, seq_len=request.seq_len,
                            overhead=trial_overhead(request)).total_bytes
    return total - baseline_model_bytes(request)
