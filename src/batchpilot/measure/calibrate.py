"""The probe's calibration for the planner: measured efficiency per tokens-per-micro-batch, and the memory
the analytic model missed, in the format :mod:`batchpilot.estimate.calibration` reads.

    batchpilot probe --model tiny-llama-1m --seq-len 256 --memory-budget 512MiB --calibration-out cpu.json
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from batchpilot.measure.cpu_runner import measure_cpu_matmul_flops
from batchpilot.measure.predict import analytic_trial_bytes
from batchpilot.measure.probe_types import Device, ProbeError, ProbeRequest
from batchpilot.records.probe import ProbeResult

if TYPE_CHECKING:
    from batchpilot.estimate.calibration import Calibration


def calibration_from_probe(result: ProbeResult, request: ProbeRequest, *, peak_flops_per_s: float,
                           accelerator: str, analytic_bytes: Callable[[int], int] | None = None) -> Calibration:
    """Efficiency per tokens-per-micro-batch from the measured tokens/s, and the memory overhead.

    efficiency = tokens/s × FLOPs executed per token ÷ ``peak_flops_per_s``, the FLOPs being
    :func:`batchpilot.estimate.steptime.training_flops_per_token` (model FLOPs plus one more forward of the
    transformer layers with full recomputation, not of the output head), the count the step-time model
    turns back into seconds. The memory overhead is the largest
    (measured peak − analytic estimate) over the fitted trials, floored at 0; it needs
    ``analytic_bytes(micro_batch)`` and is None (keep the model's default) without it.
    """
    from batchpilot.estimate.calibration import Calibration, EfficiencyPoint
    from batchpilot.estimate.steptime import training_flops_per_token

    flops = training_flops_per_token(request.model, request.seq_len, request.settings.recompute)
    best: dict[int, float] = {}
    for t in result.trials:
        if t.fits and t.tokens_per_s:
            tokens = t.micro_batch * request.seq_len
            best[tokens] = max(best.get(tokens, 0.0), t.tokens_per_s)
    points = tuple(
        EfficiencyPoint(tokens_per_micro_batch=n, efficiency=min(1.0, tps * flops / peak_flops_per_s))
        for n, tps in sorted(best.items())
    )
    overhead = None
    if analytic_bytes is not None:
        gaps = [t.peak_bytes - analytic_bytes(t.micro_batch) for t in result.trials if t.fits and t.peak_bytes]
        overhead = max(0, max(gaps)) if gaps else None
    return Calibration(points=points, memory_overhead_bytes=overhead, accelerator=accelerator,
                       model=request.model.name, seq_len=request.seq_len,
                       source=f"batchpilot probe on {result.device}, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")


def check_calibration_accelerator_for(device: Device, accelerator: str | None) -> None:
    """Before any trial: refuse ``--gpu`` on a CPU probe (its efficiencies would be CPU throughput
    divided by a GPU's peak, recorded under the GPU's name, which ``plan --calibration`` would then accept
    for that GPU), and load the named accelerator (an unknown name fails now, not after the trials)."""
    if accelerator and device == "cpu":
        raise ProbeError(f"--gpu {accelerator} with --device cpu: a CPU probe cannot calibrate a GPU; "
                         "drop --gpu (the calibration then divides by this CPU's measured matmul rate "
                         "and is named 'cpu') or probe on the GPU with --device cuda")
    if accelerator:
        from batchpilot.specs.hardware import load_accelerator

        load_accelerator(accelerator)


def write_calibration(result: ProbeResult, request: ProbeRequest, path: str | Path,
                      accelerator: str | None = None) -> Path:
    """Save the probe's calibration (format of :mod:`batchpilot.estimate.calibration`) and return the path.

    The peak FLOP/s the efficiencies divide by: the ``accelerator``'s dense figure at the run's precision
    (catalog name or file); on CPU without one, this CPU's measured matmul rate
    (:func:`batchpilot.measure.cpu_runner.measure_cpu_matmul_flops`), named ``cpu`` in the file. CUDA without ``accelerator`` is an
    error (unknown hardware is never guessed).
    """
    from batchpilot.estimate.calibration import save_calibration

    check_calibration_accelerator_for(request.device, accelerator)
    if accelerator:
        from batchpilot.specs.hardware import load_accelerator

        spec = load_accelerator(accelerator)
        peak, name = spec.peak_flops_per_s(request.settings.precision), spec.name
    elif request.device == "cpu":
        peak, name = measure_cpu_matmul_flops(request.settings.precision), "cpu"
    else:
        raise ProbeError("--calibration-out on cuda needs --gpu NAME (see `batchpilot hardware list`) "
                         "for the peak FLOP/s the efficiencies are relative to")
    calibration = calibration_from_probe(result, request, peak_flops_per_s=peak, accelerator=name,
                                         analytic_bytes=lambda b: analytic_trial_bytes(request, b))
    return save_calibration(calibration, path)
