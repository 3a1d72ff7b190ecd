"""Training-memory prediction: batchpilot's analytic model beside the estimators people use, and the truth.

Run: ``.venv/bin/python -m benchmarks.memory_vs_estimators`` (≈ 5 min on 2 shared cores). Needs
``pip install --no-deps llm-analysis fire termcolor`` (llm-analysis pins transformers < 5); without it
that column is left empty. Writes ``benchmarks/results/memory_vs_estimators.{json,md}``.

Part 1 — measured: real CPU training steps (batchpilot's one training step, the one ``batchpilot train``
runs: fused AdamW, the fp32 token-sum loss, clipping; two iterations, allocator peak from the torch profiler;
:mod:`benchmarks.cpu_step`) of small Llama-shaped models and GPT-2, in fp32 and under CPU bf16 autocast,
against

- batchpilot ``analytic_memory(..., overhead=OverheadModel.cpu())`` with the fused optimizer (fp32 and bf16);
- llm-analysis 0.2.2's training memory (the sum ``LLMAnalysis.training`` reports, from the same getters;
  ``training`` itself refuses 32-bit dtypes in its latency model) with fp32 settings: 32-bit
  weights/activations/embeddings, no master copy, 8 bytes of Adam state, the run's flash/eager and
  gated-MLP choice (fp32 rows);
- DeepSpeed's ZeRO-2 and ZeRO-3 model-state estimators for one GPU without offload — the functions the
  ``estimate_zero{2,3}_model_states_mem_needs_all_cold`` printers call;
- ``accelerate estimate-memory``'s training figure (``estimate_training_usage``, the max of its terms)
  on the same model built on the meta device (the command itself needs the Hub) (fp32 rows).

Part 2 — the ZeRO paper's own accounting (Rajbhandari et al. 2020, Figure 1 / Table 1: (2 + 2 + 12)·Ψ
sharded per stage) for a 7.5B-parameter GPT at 64 and 1024 data-parallel ranks, against each tool's
model-state figure for DeepSpeed mixed precision.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

from batchpilot.estimate.memory import analytic_memory
from batchpilot.estimate.model_states import model_state_bytes
from batchpilot.estimate.overhead import OverheadModel
from batchpilot.io import read_json_object
from batchpilot.specs.model import ModelSpec, from_hf_config, load_model
from batchpilot.specs.settings import RunSettings
from benchmarks.cpu_step import measure_step

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MIB = 2**20

#: (model, attention, seq_len, micro-batches) measured on CPU.
MEASURED: list[tuple[str, str, int, tuple[int, ...]]] = [
    ("tiny-llama-1m", "flash", 256, (1, 4, 16)),
    ("tiny-llama-1m", "eager", 256, (1, 4, 16)),
    ("bench-llama-3m", "flash", 512, (1, 4, 8)),
    ("tiny-llama-15m", "flash", 256, (1, 4, 16)),
    ("gpt2", "eager", 256, (1, 4)),
]


def _model(name: str) -> ModelSpec:
    local = HERE / "models" / f"{name}.json"
    if local.is_file():
        return from_hf_config(read_json_object(local, "benchmark model"), name=name)
    return load_model(name)


# ---------------------------------------------------------------------------------------------- estimators
#: Precisions of the measured steps: fp32, and bf16 CPU autocast (fp32 weights, bf16 matmuls).
PRECISIONS = ("fp32", "bf16")


def batchpilot_bytes(model: ModelSpec, attention: str, micro_batch: int, seq_len: int, precision: str = "fp32") -> int:
    settings = RunSettings(precision=precision, attention=attention)  # type: ignore[arg-type]
    overhead = dataclasses.replace(OverheadModel.cpu(), optimizer_fused=True)  # the trainer's fused AdamW
    return analytic_memory(model, settings, micro_batch=micro_batch, seq_len=seq_len, overhead=overhead).total_bytes


def _llm_analysis(model: ModelSpec, *, weight_bits: int, dp: int = 1) -> Any:
    from llm_analysis.analysis import LLMAnalysis
    from llm_analysis.config import DtypeConfig, GPUConfig, ModelConfig, ParallelismConfig

    logging.getLogger("llm_analysis").setLevel(logging.ERROR)
    config = ModelConfig(
        name=model.name, num_layers=model.num_layers, n_head=model.num_heads, hidden_dim=model.hidden_size,
        vocab_size=model.vocab_size, max_seq_len=model.max_position_embeddings,
        num_key_value_heads=model.num_kv_heads, ffn_embed_dim=model.intermediate_size,
        expansion_ratio=model.intermediate_size / model.hidden_size, model_type=model.model_type,
    )
    gpu = GPUConfig(name="large", mem_per_GPU_in_GB=1e6, hbm_bandwidth_in_GB_per_sec=1000,
                    intra_node_bandwidth_in_GB_per_sec=100, intra_node_min_message_latency=1e-5,
                    peak_fp16_TFLOPS=100)
    dtype = DtypeConfig(name=f"w{weight_bits}", weight_bits=weight_bits, activation_bits=weight_bits,
                        embedding_bits=weight_bits)
    return LLMAnalysis(config, gpu, dtype, ParallelismConfig(dp_size=dp), flops_efficiency=0.5,
                       hbm_memory_efficiency=0.9)


def _llm_analysis_memory(analysis: Any, *, micro_batch: int, seq_len: int, stage: int, flash: bool,
                         gated: bool, dropout: bool, master_bytes: int, state_bytes: int) -> tuple[float, float]:
    """(model states, activations) per GPU exactly as ``LLMAnalysis.training`` sums them, from the same
    getters, without its latency model (which rejects 32-bit dtypes)."""
    from llm_analysis.analysis import ActivationRecomputation, DSZeRO

    zero, layers = DSZeRO(stage), analysis.model_config.num_layers
    weights = (analysis.get_memory_embedding(zero) + layers * analysis.get_weight_memory_per_layer(zero)
               + analysis.get_weight_memory_last_layernorm(zero))
    getters = (analysis.get_memory_optimizer_state_and_gradient_per_layer,
               analysis.get_memory_optimizer_state_and_gradient_embedding,
               analysis.get_memory_optimizer_state_and_gradient_last_layernorm)
    opt_grad = [g(master_bytes, state_bytes, zero) for g in getters]
    states = weights + layers * sum(opt_grad[0]) + sum(opt_grad[1]) + sum(opt_grad[2])
    none = ActivationRecomputation.NONE
    per_layer = analysis.get_activation_memory_per_layer(
        micro_batch, seq_len, is_inference=False, activation_recomputation=none, layernorm_dtype_bytes=4,
        flash_attn=flash, softmax_dropout=dropout, mlp_gated_linear_units=gated)
    activations = (layers * per_layer + analysis.get_activation_memory_output_embedding(micro_batch, seq_len)
                   + analysis.get_activation_memory_per_layernorm(micro_batch, seq_len, none, 4))
    return float(states), float(activations)


def llm_analysis_bytes(model: ModelSpec, attention: str, micro_batch: int, seq_len: int) -> int | None:
    try:
        analysis = _llm_analysis(model, weight_bits=32)
    except ImportError:
        return None
    states, activations = _llm_analysis_memory(
        analysis, micro_batch=micro_batch, seq_len=seq_len, stage=0, flash=attention == "flash",
        gated=model.mlp_kind == "swiglu", dropout=model.family == "gpt2", master_bytes=0, state_bytes=8)
    return int(states + activations)


def _meta_module(model: ModelSpec) -> Any:
    import torch
    import transformers
    from accelerate import init_empty_weights

    config = transformers.AutoConfig.for_model(**dict(model.hf_config))
    with init_empty_weights():
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _largest_layer_params(module: Any) -> int:
    """DeepSpeed's ``largest_layer_params``: the most parameters any one module owns directly."""
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules())


def deepspeed_bytes(model: ModelSpec, stage: int) -> int:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total = model.params_total
    if stage == 2:
        return int(estimate_zero2_model_states_mem_needs(total, 1, 1, cpu_offload=False)[1])
    largest = _largest_layer_params(_meta_module(model))
    return int(estimate_zero3_model_states_mem_needs(total, largest, 1, 1, cpu_offload=False)[1])


def accelerate_bytes(model: ModelSpec) -> int:
    from accelerate.commands.estimate import estimate_training_usage
    from accelerate.utils import calculate_maximum_sizes

    total_size, _ = calculate_maximum_sizes(_meta_module(model))
    return int(max(estimate_training_usage(total_size, "float32").values()))


# ---------------------------------------------------------------------------------------------- part 1
def _error(predicted: int | None, measured: int) -> float | None:
    return None if predicted is None else predicted / measured - 1


def measured_rows() -> list[dict[str, Any]]:
    rows = []
    for precision in PRECISIONS:
        for name, attention, seq_len, micro_batches in MEASURED:
            for micro_batch in micro_batches:
                rows.append(_measured_row(name, attention, seq_len, micro_batch, precision))
    return rows


def _measured_row(name: str, attention: str, seq_len: int, micro_batch: int, precision: str) -> dict[str, Any]:
    """One real step and every estimator's figure for it (the others are configured for fp32 only)."""
    model = _model(name)
    fp32 = precision == "fp32"
    static = {"deepspeed_zero2": deepspeed_bytes(model, 2) if fp32 else None,
              "deepspeed_zero3": deepspeed_bytes(model, 3) if fp32 else None,
              "accelerate": accelerate_bytes(model) if fp32 else None}
    start = time.perf_counter()
    measured = measure_step(model, micro_batch=micro_batch, seq_len=seq_len, attention=attention,
                            precision=precision, foreach=False)
    predictions: dict[str, int | None] = {
        "batchpilot": batchpilot_bytes(model, attention, micro_batch, seq_len, precision),
        "llm_analysis": llm_analysis_bytes(model, attention, micro_batch, seq_len) if fp32 else None,
        **static,
    }
    row: dict[str, Any] = {
        "model": name, "params": model.params_total, "attention": attention, "seq_len": seq_len,
        "precision": precision, "micro_batch": micro_batch, "measured_bytes": measured.peak_bytes,
        "measured": measured.to_dict(), "predicted_bytes": predictions,
        "error": {k: _error(v, measured.peak_bytes) for k, v in predictions.items()},
        "wall_s": round(time.perf_counter() - start, 1),
    }
    print(f"{name} {attention} {precision} b={micro_batch}: " + ", ".join(
        f"{k} {v:+.1%}" for k, v in row["error"].items() if v is not None), flush=True)
    return row


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per estimator and precision (``"batchpilot bf16"``): mean absolute error and range."""
    summary = {}
    for precision in PRECISIONS:
        for tool in rows[0]["error"]:
            errors = [r["error"][tool] for r in rows
                      if r["error"][tool] is not None and r.get("precision", "fp32") == precision]
            if errors:
                summary[f"{tool} {precision}"] = {"mean_abs_error": sum(abs(e) for e in errors) / len(errors),
                                                  "min_error": min(errors), "max_error": max(errors), "n": len(errors)}
    return summary


# ---------------------------------------------------------------------------------------------- part 2
def zero_paper_rows() -> list[dict[str, Any]]:
    """A 7.5B GPT (h 4096, 36 layers, GPT-2 vocabulary) under DeepSpeed mixed-precision Adam."""
    spec = from_hf_config({"model_type": "gpt2", "n_embd": 4096, "n_head": 32, "n_layer": 36, "n_positions": 2048,
                           "vocab_size": 50257}, name="gpt-7.5b")
    psi = spec.params_total
    rows = []
    for dp in (64, 1024):
        for stage in (0, 1, 2, 3):
            paper = {0: 16 * psi, 1: 4 * psi + 12 * psi / dp, 2: 2 * psi + 14 * psi / dp, 3: 16 * psi / dp}[stage]
            settings = RunSettings(engine="deepspeed", precision="bf16", zero_stage=stage)
            tools: dict[str, float | None] = {
                "batchpilot": model_state_bytes(settings, params=psi, dp=dp).total_bytes,
                "llm_analysis": _llm_analysis_states(spec, stage, dp),
                "deepspeed": _deepspeed_states(spec, stage, dp),
            }
            rows.append({"params": psi, "dp": dp, "stage": stage, "paper_bytes": paper, "predicted_bytes": tools,
                         "error": {k: None if v is None else v / paper - 1 for k, v in tools.items()}})
    return rows


def _llm_analysis_states(spec: ModelSpec, stage: int, dp: int) -> float | None:
    try:
        analysis = _llm_analysis(spec, weight_bits=16, dp=dp)
    except ImportError:
        return None
    states, _ = _llm_analysis_memory(analysis, micro_batch=1, seq_len=2048, stage=stage, flash=True, gated=False,
                                     dropout=False, master_bytes=4, state_bytes=8)
    return states


def _deepspeed_states(spec: ModelSpec, stage: int, dp: int) -> float | None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    nodes, per_node = max(1, dp // 8), min(dp, 8)
    if stage == 2:
        return float(estimate_zero2_model_states_mem_needs(spec.params_total, per_node, nodes, cpu_offload=False)[1])
    if stage == 3:
        largest = spec.vocab_size * spec.hidden_size  # the token embedding is the largest module
        return float(estimate_zero3_model_states_mem_needs(spec.params_total, largest, per_node, nodes,
                                                           cpu_offload=False)[1])
    return None  # DeepSpeed ships estimators for stages 2 and 3 only


# ---------------------------------------------------------------------------------------------- output
def _pct(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:+.1%}"


def markdown(record: dict[str, Any]) -> str:
    tools = list(record["measured"][0]["error"])
    lines = [
        "# Training-memory prediction vs measured CPU peaks",
        "",
        f"Machine: {record['machine']}. Measured = peak of the CPU allocator (torch profiler, "
        "`profile_memory=True`) over the second of two real iterations of batchpilot's training step (the "
        "one `batchpilot train` runs: fused AdamW, fp32 token-sum loss, clipping), fp32 or CPU bf16 autocast. "
        "Errors are (predicted − measured) / measured; the other estimators are configured for fp32 only.",
        "",
        "| model | attn | seq | precision | micro-batch | measured MiB | " + " | ".join(tools) + " |",
        "|---|---|---:|---|---:|---:|" + "---:|" * len(tools),
    ]
    for r in record["measured"]:
        lines.append(f"| {r['model']} | {r['attention']} | {r['seq_len']} | {r.get('precision', 'fp32')} | "
                     f"{r['micro_batch']} | "
                     f"{r['measured_bytes'] / MIB:,.1f} | " + " | ".join(_pct(r["error"][t]) for t in tools) + " |")
    lines += ["", "| estimator | mean abs. error | range | n |", "|---|---:|---|---:|"]
    for tool, s in record["summary"].items():
        lines.append(f"| {tool} | {s['mean_abs_error']:.1%} | {s['min_error']:+.1%} … {s['max_error']:+.1%} | {s['n']} |")
    lines += ["", "## The ZeRO paper's model-state accounting (7.5B GPT, DeepSpeed mixed-precision Adam)", "",
              "| DP | stage | paper GB | batchpilot | llm-analysis | DeepSpeed estimator |", "|---:|---:|---:|---:|---:|---:|"]
    for r in record["zero_paper"]:
        e = r["error"]
        lines.append(f"| {r['dp']} | {r['stage']} | {r['paper_bytes'] / 1e9:,.2f} | {_pct(e['batchpilot'])} | "
                     f"{_pct(e['llm_analysis'])} | {_pct(e['deepspeed'])} |")
    lines += ["", *record["notes"], ""]
    return "\n".join(lines)


NOTES = [
    "Notes:",
    "- batchpilot's remaining GPT-2 error is CPU-specific: eager dropout on CPU keeps fp32 noise tensors "
    "(4 bytes per element) where CUDA's fused dropout keeps the 1-byte masks the model assumes; the "
    "Llama-shaped models have no dropout and land within 1.1 %.",
    "- DeepSpeed's and accelerate's estimators count model states only (no activations, no logits); "
    "DeepSpeed's ZeRO-3 estimator adds 4 bytes × the largest layer on every rank.",
    "- llm-analysis counts one logits-sized tensor where the unfused loss holds three at its peak, has no "
    "optimizer-step temporary, sizes K/V at full width (no GQA) and, in the ZeRO rows, counts 4-byte "
    "gradients (2 + 4 + 12 bytes/param: +12.5 % unsharded, +48 % at stage 1).",
    "- batchpilot's ZeRO rows match by construction: it implements the paper's accounting "
    "(tests/estimate/test_memory_golden.py pins it to the published Figure 1 and Table 1).",
]


def main() -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    rows = measured_rows()
    record = {
        "machine": f"{platform.machine()}, load average at start {' '.join(f'{x:.1f}' for x in os.getloadavg())}",
        "measured": rows, "summary": summarise(rows), "zero_paper": zero_paper_rows(), "notes": NOTES,
        "wall_s": 0.0,
    }
    record["wall_s"] = round(time.perf_counter() - start, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory_vs_estimators.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "memory_vs_estimators.md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
