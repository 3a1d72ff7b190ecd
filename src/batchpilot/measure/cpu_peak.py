"""Measured peak memory of a real CPU training step, the ground truth the traced estimate is tested against.

Example::

    python -c "from batchpilot.measure.cpu_peak import measure_cpu_step_peak as m; \\
from batchpilot.specs.model import load_model; from batchpilot.specs.settings import RunSettings; \\
print(m(load_model('tiny-llama-1m'), RunSettings(precision='fp32'), micro_batch=2, seq_len=128))"

The step is :func:`batchpilot.measure.step.build_step` on real CPU tensors — the trainer's step, and the
same module, optimizer (same implementation), autocast dtype, loss, attention implementation and
checkpointing as the trace (:mod:`batchpilot.measure.traced`) — run for two iterations so that optimizer
state exists in the second. The torch profiler with
``profile_memory=True`` receives every allocation and free of the CPU allocator (c10's
``ProfiledCPUMemoryReporter``, pointer and size); the profiler is started *before* the model is built,
so the live sum counts parameters, buffers and inputs too, and the peak is the largest live sum reached
after the first iteration begins. This is the allocator's
view (``numel × element size`` per allocation), not the process RSS, which glibc inflates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from batchpilot.errors import SpecError

if TYPE_CHECKING:
    from batchpilot.measure.step import OptimizerImpl
    from batchpilot.specs.model import ModelSpec
    from batchpilot.specs.settings import RunSettings

_STEP_MARK = "batchpilot.train_iterations"


def measure_cpu_step_peak(
    model: ModelSpec, settings: RunSettings, *, micro_batch: int, seq_len: int,
    optimizer_impl: OptimizerImpl | None = None, seed: int = 0,
) -> int:
    """Peak bytes held by the CPU allocator during two real training iterations (profiler measurement).

    ``optimizer_impl`` overrides the trainer's optimizer implementation (fused), e.g. ``foreach`` to
    measure torch's own multi-tensor default for CUDA.
    """
    import gc

    from torch.profiler import ProfilerActivity, profile, record_function

    from batchpilot.measure.step import build_step, step_config
    from batchpilot.measure.traced import check_traceable

    check_traceable(model, settings, micro_batch=micro_batch, seq_len=seq_len)
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step = build_step(model.hf_config, step_config(settings, optimizer_impl, seed=seed),
                          micro_batch=micro_batch, seq_len=seq_len, name=model.name)
        with record_function(_STEP_MARK):
            step.run()
            step.run()
    del step
    events = flatten_events(prof.profiler.kineto_results.experimental_event_tree())  # type: ignore[union-attr]
    starts = [e.start_time_ns for e in events if e.name == _STEP_MARK]
    if not starts:
        raise SpecError("the profiler recorded no training iterations; cannot measure the CPU peak")
    return _peak_since(allocation_records(events), since_ns=starts[0])


def allocation_records(events: list) -> list[tuple[int, int, int]]:  # type: ignore[type-arg]
    """``(time ns, pointer, ±bytes)`` of every CPU allocation and free among the profiler's ``events``
    (:func:`flatten_events`), in time order."""
    import torch

    allocation = torch._C._profiler._EventType.Allocation
    return sorted(
        (e.start_time_ns, e.extra_fields.ptr, e.extra_fields.alloc_size) for e in events
        if e.tag == allocation and e.extra_fields.device.type == "cpu"
    )


def live_bytes(records: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """``(time ns, bytes live)`` after each record of :func:`allocation_records`: the sum of what this
    profiled run allocated and has not freed.

    The allocator's own ``total_allocated`` is not used: it is cumulative over the process and misses frees
    made while no profiler ran, so a second measurement in one process would start from a stale total.
    Frees of pointers allocated before profiling began are ignored for the same reason.
    """
    live: dict[int, int] = {}
    current = 0
    series = []
    for time_ns, ptr, nbytes in records:
        if nbytes > 0:
            live[ptr] = live.get(ptr, 0) + nbytes
            current += nbytes
        elif ptr in live:
            current -= live.pop(ptr)
        series.append((time_ns, current))
    return series


def _peak_since(records: list[tuple[int, int, int]], *, since_ns: int) -> int:
    """Largest :func:`live_bytes` over records ``(time, ptr, ±bytes)`` from ``since_ns`` on."""
    peak = max((current for time_ns, current in live_bytes(records) if time_ns >= since_ns), default=0)
    if peak == 0:
        raise SpecError("the profiler recorded no CPU allocations; cannot measure the CPU peak")
    return peak


def flatten_events(roots: list) -> list:  # type: ignore[type-arg]
    """Every node of the profiler's event tree (``experimental_event_tree()``), depth first."""
    events, stack = [], list(roots)
    while stack:
        event = stack.pop()
        events.append(event)
        stack.extend(event.children)
    return events
