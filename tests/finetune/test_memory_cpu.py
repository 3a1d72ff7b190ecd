"""Fine-tuning memory against real CPU steps with PEFT and bitsandbytes (``benchmarks/finetune_memory.py``).

The analytic terms (:mod:`batchpilot.estimate.finetune`) plus the CPU kernels' documented differences
(:func:`~batchpilot.estimate.finetune.cpu_step_extra_bytes`: dropout's noise tensor, QLoRA's input cast under CPU
autocast) and the traced estimate (PEFT under fake tensors) are compared with batchpilot's own step measured by
the torch profiler (second iteration, AdamW ``foreach``). Measured here (torch 2.13 CPU, peak error): every case
below within 0.25 % (``benchmarks/results/finetune_memory.md``); the bound asserted is 2 %.
"""

from __future__ import annotations

import pytest

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from benchmarks.finetune_memory import compare, measure_finetune_step

from batchpilot.measure.traced import trace_step
from batchpilot.specs.finetune import parse_finetune
from batchpilot.specs.model import load_model
from batchpilot.specs.settings import RunSettings

TOLERANCE = 0.02


def test_lora_analytic_and_traced_match_a_real_cpu_step() -> None:
    model = load_model("tiny-llama-1m")
    settings = RunSettings(precision="fp32", finetune=parse_finetune("lora,r=8"))
    c = compare("tiny-llama-1m", "lora,r=8", micro_batch=2, seq_len=128)
    assert abs(c.peak_error) < TOLERANCE, c.peak_error
    traced = trace_step(model, settings, micro_batch=2, seq_len=128, optimizer_impl="foreach",
                        count_flops=False).memory
    assert abs(traced.total_bytes / c.measured.peak_bytes - 1) < TOLERANCE


def test_qlora_4bit_base_under_autocast_matches_a_real_cpu_step() -> None:
    c = compare("tiny-llama-1m", "qlora,r=8", micro_batch=2, seq_len=128, precision="bf16")
    assert abs(c.peak_error) < TOLERANCE, c.peak_error
    assert abs(c.activation_error) < TOLERANCE, c.activation_error


@pytest.mark.slow
def test_lora_saves_less_than_full_training_and_qv_less_than_all_linear() -> None:
    """The measured order the terms predict: frozen linears keep no inputs, fewer targets fewer casts."""
    model = load_model("tiny-llama-1m")
    full = measure_finetune_step(model, RunSettings(precision="fp32"), micro_batch=2, seq_len=64)
    qv = measure_finetune_step(model, RunSettings(precision="fp32", finetune=parse_finetune("lora,targets=qv")),
                               micro_batch=2, seq_len=64)
    assert qv.activations_bytes < full.activations_bytes
    assert qv.baseline_bytes < full.baseline_bytes / 2  # no gradients or AdamW states for the base


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "spec", "b", "precision", "param_dtype", "recompute", "optimizer"), [
    ("tiny-llama-1m", "lora", 4, "fp32", "fp32", "none", "adamw"),
    ("tiny-llama-1m", "lora,targets=qv", 4, "fp32", "fp32", "none", "adamw"),
    ("tiny-llama-1m", "lora", 4, "bf16", "fp32", "none", "adamw"),
    ("tiny-llama-1m", "lora", 4, "bf16", "bf16", "none", "adamw"),
    ("tiny-llama-1m", "lora,dropout=0.1", 4, "fp32", "fp32", "none", "adamw"),
    ("tiny-llama-1m", "lora,dropout=0.1", 4, "bf16", "fp32", "none", "adamw"),
    ("tiny-llama-1m", "lora,frozen-layers=2", 4, "fp32", "fp32", "none", "adamw"),
    ("tiny-llama-1m", "lora", 4, "fp32", "fp32", "full", "adamw"),
    ("tiny-llama-1m", "full,frozen-layers=2", 4, "fp32", "fp32", "none", "adamw"),
    ("tiny-llama-1m", "full", 4, "fp32", "fp32", "none", "adamw-8bit"),
    ("tiny-llama-1m", "full", 4, "bf16", "bf16", "none", "adamw"),
    ("tiny-llama-1m", "full,frozen-layers=2", 4, "bf16", "bf16", "none", "adamw"),
    ("tiny-llama-1m", "qlora", 4, "bf16", "fp32", "none", "adamw"),
    ("tiny-llama-1m", "qlora,dropout=0.05", 4, "bf16", "fp32", "none", "adamw"),
    ("tiny-llama-1m", "qlora", 4, "bf16", "bf16", "none", "adamw"),
    ("tiny-llama-15m", "lora", 2, "fp32", "fp32", "none", "adamw-8bit"),
    ("tiny-llama-15m", "qlora,r=64", 2, "bf16", "fp32", "none", "adamw"),
    ("tiny-llama-15m", "lora,r=64", 2, "bf16", "fp32", "full", "adamw"),
    ("tiny-llama-15m", "qlora,r=64", 2, "bf16", "fp32", "full", "adamw"),
    ("tiny-llama-15m", "qlora,r=64", 2, "bf16", "bf16", "full", "adamw"),
])
def test_every_mode_matches_a_real_cpu_step(preset: str, spec: str, b: int, precision: str, param_dtype: str,
                                            recompute: str, optimizer: str) -> None:
    c = compare(preset, spec, micro_batch=b, seq_len=256, precision=precision, param_dtype=param_dtype,
                recompute=recompute, optimizer=optimizer)
    assert abs(c.peak_error) < TOLERANCE, (c.label, c.peak_error)
    assert abs(c.activation_error) < TOLERANCE, (c.label, c.activation_error)
