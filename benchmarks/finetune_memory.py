"""Fine-tuning memory: real CPU steps with PEFT (LoRA) and bitsandbytes (QLoRA, 8-bit AdamW) against the
analytic and traced estimates, and the QLoRA paper's published memory figures.

Example (CPU, about a minute; needs the ``finetune`` extra)::

    .venv/bin/python -m benchmarks.finetune_memory            # writes benchmarks/results/finetune_memory.md

The measured step is batchpilot's own (:func:`batchpilot.measure.step.build_step`: PEFT/bitsandbytes applied
by :func:`batchpilot.measure.finetune.apply_finetune`, token-sum fp32 loss, clipping, AdamW ``foreach``) built
and run twice under the torch profiler with ``profile_memory=True``; the second iteration is measured phase by
phase as in ``benchmarks/cpu_step.py`` (live allocator bytes: the baseline before the forward, the
forward/backward peak and the optimizer step's peak).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from batchpilot.estimate.finetune import cpu_step_extra_bytes
from batchpilot.estimate.memory import analytic_memory
from batchpilot.estimate.overhead import OverheadModel
from batchpilot.specs.finetune import parse_finetune
from batchpilot.specs.model import ModelSpec, load_model
from batchpilot.specs.settings import RunSettings
from benchmarks.cpu_step import StepMemory, _phases

RESULTS = Path(__file__).parent / "results" / "finetune_memory.md"


def measure_finetune_step(model: ModelSpec, settings: RunSettings, *, micro_batch: int, seq_len: int,
                          optimizer_impl: str = "foreach") -> StepMemory:
    """Phase-wise allocator peaks of the second of two real CPU iterations of batchpilot's step."""
    import gc

    from torch.profiler import ProfilerActivity, profile, record_function

    from batchpilot.measure.step import build_step, step_config

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step = build_step(model.hf_config, step_config(settings, optimizer_impl),  # type: ignore[arg-type]
                          micro_batch=micro_batch, seq_len=seq_len, name=model.name)
        for mark in (False, True):
            with record_function("bp.fwd_bwd" if mark else "bp.warm"):
                step.forward_backward()
            with record_function("bp.optimizer" if mark else "bp.warm_opt"):
                step.optimizer_step()
    del step
    return _phases(prof)


@dataclass(frozen=True, kw_only=True, slots=True)
class Comparison:
    """One fine-tuning setting: measured and predicted step peaks (bytes)."""

    label: str
    measured: StepMemory
    analytic_bytes: int
    analytic_activations_bytes: int

    @property
    def peak_error(self) -> float:
        return self.analytic_bytes / self.measured.peak_bytes - 1

    @property
    def activation_error(self) -> float:
        return self.analytic_activations_bytes / self.measured.activations_bytes - 1


def compare(preset: str, spec: str, *, micro_batch: int, seq_len: int, precision: str = "fp32",
            param_dtype: str = "fp32", recompute: str = "none", optimizer: str = "adamw") -> Comparison:
    """Measure ``--finetune spec`` on ``preset`` and predict it with :func:`analytic_memory` (CPU overheads)."""
    model = load_model(preset)
    settings = RunSettings(precision=precision, param_dtype=param_dtype, recompute=recompute,  # type: ignore[arg-type]
                           optimizer=optimizer, finetune=parse_finetune(spec))  # type: ignore[arg-type]
    measured = measure_finetune_step(model, settings, micro_batch=micro_batch, seq_len=seq_len)
    predicted = analytic_memory(model, settings, micro_batch=micro_batch, seq_len=seq_len,
                                overhead=OverheadModel.cpu(optimizer_foreach=True))
    cpu = round(cpu_step_extra_bytes(model, settings, micro_batch=micro_batch, seq_len=seq_len))
    activations = predicted.details["fwd_bwd_peak"] - predicted.details["resident_states"] + cpu
    return Comparison(label=f"{preset} {spec} b={micro_batch} {precision}/{param_dtype} {recompute}",
                      measured=measured, analytic_bytes=max(predicted.total_bytes + cpu,
                                                            predicted.details["optimizer_step_peak"]),
                      analytic_activations_bytes=activations)


if __name__ == "__main__":
    preset, spec = sys.argv[1], sys.argv[2]
    b, s = int(sys.argv[3]), int(sys.argv[4])
    precision = sys.argv[5] if len(sys.argv) > 5 else "fp32"
    param_dtype = sys.argv[6] if len(sys.argv) > 6 else "fp32"
    recompute = sys.argv[7] if len(sys.argv) > 7 else "none"
    optimizer = sys.argv[8] if len(sys.argv) > 8 else "adamw"
    c = compare(preset, spec, micro_batch=b, seq_len=s, precision=precision, param_dtype=param_dtype,
                recompute=recompute, optimizer=optimizer)
    print(c.label, c.measured.to_dict(), "analytic", c.analytic_bytes, c.analytic_activations_bytes,
          f"peak {c.peak_error:+.2%} activations {c.activation_error:+.2%}")
