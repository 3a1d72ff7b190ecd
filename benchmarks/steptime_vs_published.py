"""Step-time model vs the large-scale runs it was first checked on: executed TFLOP/s (or tokens/s) per GPU.

Example (CPU, a few seconds)::

    .venv/bin/python -m benchmarks.steptime_vs_published

The runs — Narayanan et al. 2021 Table 1 (Megatron-LM weak scaling), MT-NLG 530B, BLOOM-176B and Llama 3 405B —
are rows of ``benchmarks/data/published_runs.json`` (sources, quotes and assumptions there), predicted by
``benchmarks/published_runs.py`` like every other row: this module only prints their table
(``benchmarks/results/steptime_vs_published.md``). The per-op model's constants come from published
microbenchmarks and :mod:`batchpilot.estimate.fitted` (fitted on the data set's fit split by
``benchmarks/published_runs.py``, which checks the shipped values). :func:`megatron_runs` rebuilds Narayanan et
al.'s Table 1 runs from the paper's numbers alone, so a test can check that the data set's rows map onto the same
inputs.

Sources (published TFLOP/s per GPU count the FLOPs executed, recomputation included, as batchpilot's
``tflops_per_gpu``):

- Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM"
  (arXiv:2104.04473), Table 1: GPT (vocabulary 51,200, sequence 2048) on Selene, DGX A100 80GB, 8 × 200 Gb/s
  HDR InfiniBand per node (25 GB/s per GPU), mixed precision, full activation recomputation. Not published:
  the micro-batch size (assumed 1) and whether Table 1 used the interleaved schedule (assumed not). The runs
  predate FlashAttention: modelled with materialised scores (Megatron's fused softmax).
- MT-NLG 530B (Smith et al. 2022, arXiv:2201.11990 §2.4), BLOOM-176B (BigScience tr11) and Llama 3 405B
  ("The Llama 3 Herd of Models", arXiv:2407.21783, Table 4): see their rows in the data file.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from pathlib import Path
from typing import Any

from batchpilot.specs.batch import BatchTriad
from batchpilot.specs.hardware import ClusterSpec, load_accelerator
from batchpilot.specs.model import ModelSpec, from_hf_config
from batchpilot.specs.settings import RunSettings
from benchmarks.published_runs import TFLOPS_SOURCES, evaluate, load_data

RESULTS = Path(__file__).resolve().parent / "results"

#: Narayanan et al. 2021 Table 1: (billions, heads, hidden, layers, TP, PP, GPUs, batch, TFLOP/s per GPU).
MEGATRON_TABLE_1 = [
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137), (3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142), (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138), (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148), (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163), (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163),
]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Run:
    """One published run, as far as the step-time model needs it."""

    source: str
    label: str
    model: ModelSpec
    cluster: ClusterSpec
    settings: RunSettings
    triad: BatchTriad
    published_tflops: float


def _gpt(layers: int, hidden: int, heads: int, vocab: int) -> ModelSpec:
    config = {"model_type": "gpt2", "n_layer": layers, "n_embd": hidden, "n_head": heads,
              "vocab_size": vocab, "n_positions": 2048}
    return from_hf_config(config, name=f"gpt-{layers}x{hidden}")


def _cluster(gpu: str, gpus: int, per_gpu_network_bytes_per_s: float) -> ClusterSpec:
    return ClusterSpec(accelerator=load_accelerator(gpu), devices_per_node=8, num_nodes=gpus // 8,
                       inter_node_bandwidth_bytes_per_s=per_gpu_network_bytes_per_s)


def _triad(batch: int, micro: int, dp: int, seq: int) -> BatchTriad:
    return BatchTriad(micro_batch_sequences=micro, grad_accum_steps=batch // (micro * dp), data_parallel_ranks=dp,
                      seq_len_tokens=seq)


def megatron_runs() -> list[Run]:
    """The fit set: Narayanan et al. 2021 Table 1 (module docstring)."""
    runs = []
    for billions, heads, hidden, layers, tp, pp, gpus, batch, tflops in MEGATRON_TABLE_1:
        dp = gpus // (tp * pp)
        runs.append(Run(
            source="Megatron Table 1 (fit)", label=f"GPT {billions:g}B, TP{tp} PP{pp}, {gpus} A100",
            model=_gpt(layers, hidden, heads, 51200), cluster=_cluster("a100-80gb", gpus, 25e9),
            settings=RunSettings(engine="megatron", precision="fp16", tp=tp, pp=pp, recompute="full"),
            triad=_triad(batch, 1, dp, 2048), published_tflops=tflops))
    return runs


def table(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of :data:`benchmarks.published_runs.TFLOPS_SOURCES` from a ``published_runs.run()`` result."""
    return [{"row": r["id"], "split": r["split"], "metric": r["throughput"]["metric"],
             "published": r["throughput"]["published"], "predicted": r["throughput"].get("predicted"),
             "error": r["throughput"].get("error"), "not_expressible": r["throughput"]["not_expressible"]}
            for r in result["rows"] if r["source"] in TFLOPS_SOURCES and r["throughput"]]


def _markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["# Step-time model vs published large-scale runs", "",
             "Generated by `python -m benchmarks.steptime_vs_published` (rows of `benchmarks/data/published_runs.json`, "
             "predicted by `benchmarks/published_runs.py`; sources and assumptions: this module's docstring and the "
             "data file). Error = predicted / published − 1.", "",
             "| row | split | metric | published | predicted | error |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        if r["predicted"] is None:
            lines.append(f"| {r['row']} | {r['split']} | {r['metric']} | {r['published']:,.0f} | — | "
                         f"not expressible: {'; '.join(r['not_expressible'])} |")
        else:
            lines.append(f"| {r['row']} | {r['split']} | {r['metric']} | {r['published']:,.0f} | "
                         f"{r['predicted']:,.0f} | {r['error']:+.1%} |")
    errors = [abs(r["error"]) for r in rows if r["error"] is not None]
    lines += ["", f"Mean absolute error over {len(errors)} rows: {sum(errors) / len(errors):.1%}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    data = load_data()
    rows = table({"rows": [evaluate(row) for row in data["rows"]]})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "steptime_vs_published.json").write_text(
        json.dumps({"rows": rows, "platform": platform.platform()}, indent=2) + "\n")
    text = _markdown(rows)
    (RESULTS / "steptime_vs_published.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
