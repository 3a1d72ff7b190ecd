"""Measured memory of real CPU training steps, phase by phase (the ground truth of the memory benchmark).

Example (CPU, a few seconds)::

    .venv/bin/python -m benchmarks.cpu_step tiny-llama-1m 4 256

The step is batchpilot's one training step (:func:`batchpilot.measure.step.build_step`, the one
``batchpilot train`` runs): a ``transformers`` causal LM built from the preset's config in fp32 (``sdpa`` or
``eager`` attention), the fp32 token-sum cross-entropy, gradient clipping, AdamW and
``zero_grad(set_to_none=True)``; ``precision="bf16"`` runs the forward under CPU autocast (fp32
parameters, bf16 matmuls), as ``engine="torch"`` mixed precision does on a GPU. The optimizer runs its
``foreach`` path by default here (torch's CUDA default, forced on CPU), ``foreach=False`` the trainer's
fused kernel. The second of two iterations is measured: the torch profiler with
``profile_memory=True`` reports every allocation and free of the CPU allocator (pointer and size), the
allocator's own view (``numel × element size``), not the process RSS; the bytes live at each moment are
summed by :func:`batchpilot.measure.cpu_peak.live_bytes` (the profiler starts before the model is built,
so they are absolute; the allocator's process-cumulative ``total_allocated`` would go stale on a second
measurement in one process). Phases are marked with ``record_function``: ``baseline`` is what is live just
before the second forward (parameters + optimizer states + batch), then the peak during forward+backward
and during the optimizer step.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Any

from batchpilot.measure.cpu_peak import allocation_records, flatten_events, live_bytes
from batchpilot.measure.step import OptimizerImpl
from batchpilot.specs.model import ModelSpec, load_model


@dataclass(frozen=True, kw_only=True, slots=True)
class StepMemory:
    """Allocator bytes measured during the second training iteration."""

    baseline_bytes: int
    """Allocated just before the forward pass (weights, optimizer states, inputs)."""
    fwd_bwd_peak_bytes: int
    """Largest running total during forward + backward."""
    optimizer_peak_bytes: int
    """Largest running total during ``optimizer.step()``."""

    @property
    def peak_bytes(self) -> int:
        return max(self.fwd_bwd_peak_bytes, self.optimizer_peak_bytes)

    @property
    def activations_bytes(self) -> int:
        """The forward/backward peak above the baseline: saved tensors, logits/loss buffers and the
        gradients alive at that moment."""
        return self.fwd_bwd_peak_bytes - self.baseline_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "peak_bytes": self.peak_bytes, "activations_bytes": self.activations_bytes}


def measure_step(model: ModelSpec, *, micro_batch: int, seq_len: int, attention: str = "flash",
                 precision: str = "fp32", foreach: bool = True, seed: int = 0, recompute: str = "none",
                 recompute_every: int = 1, param_dtype: str = "fp32", compile_layers: bool = False,
                 optimizer_impl: OptimizerImpl | None = None) -> StepMemory:
    """Build the step, train two iterations, and return the second iteration's phase-wise allocator peaks.

    The step is :func:`batchpilot.measure.step.build_step` (the trainer's: fp32 token-sum loss, clipping).
    Its optimizer: ``optimizer_impl`` when given (None with ``foreach=False``: the trainer's fused AdamW),
    else ``foreach`` (torch's CUDA default, forced on CPU). ``recompute``/``recompute_every``:
    :func:`batchpilot.measure.recompute.apply_recompute`. ``param_dtype="bf16"``: the module, gradients and
    AdamW states in bf16, no autocast (pure bf16 training). ``compile_layers``: ``torch.compile`` each
    decoder layer (inductor), as torchtitan and torchtune do.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    from batchpilot.measure.step import StepConfig, build_step

    impl = optimizer_impl if optimizer_impl is not None else ("foreach" if foreach else None)
    config = StepConfig(precision=precision, attention=attention, recompute=recompute, recompute_every=recompute_every,
                        compile_layers=compile_layers, param_dtype=param_dtype, optimizer_impl=impl, seed=seed)

    def iteration(step: Any, mark: bool) -> None:
        with record_function("bp.fwd_bwd" if mark else "bp.warm"):
            step.forward_backward()
        with record_function("bp.optimizer" if mark else "bp.warm_opt"):
            step.optimizer_step()

    # The profiler runs from before the model exists, so its running total is absolute.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step = build_step(model.hf_config, config, micro_batch=micro_batch, seq_len=seq_len, name=model.name)
        iteration(step, mark=False)
        iteration(step, mark=True)
    return _phases(prof)


def _phases(prof: Any) -> StepMemory:
    """Phase-wise live bytes of this profile (:func:`batchpilot.measure.cpu_peak.live_bytes`, the one
    implementation: a live-pointer sum, not the allocator's process-cumulative ``total_allocated``)."""
    events = flatten_events(prof.profiler.kineto_results.experimental_event_tree())
    spans = {e.name: (e.start_time_ns, e.end_time_ns) for e in events if e.name.startswith("bp.")}
    series = live_bytes(allocation_records(events))
    fwd, opt = spans["bp.fwd_bwd"], spans["bp.optimizer"]
    # live bytes after the last allocation or free before the forward pass: weights, optimizer states, batch
    before = [live for t, live in series if t < fwd[0]]
    baseline = before[-1] if before else 0

    def peak(span: tuple[int, int]) -> int:
        return max(live for t, live in series if span[0] <= t <= span[1])

    return StepMemory(baseline_bytes=baseline, fwd_bwd_peak_bytes=peak(fwd), optimizer_peak_bytes=peak(opt))


if __name__ == "__main__":
    name, b, s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    attention = sys.argv[4] if len(sys.argv) > 4 else "flash"
    precision = sys.argv[5] if len(sys.argv) > 5 else "fp32"
    print(measure_step(load_model(name), micro_batch=b, seq_len=s, attention=attention,
                       precision=precision).to_dict())
