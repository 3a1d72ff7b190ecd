"""Time and cost to train, against published runs: predicted GPU-hours for a run's token budget vs the GPU-hours
its authors published (DeepSeek-V3, Llama 3.1 405B/70B/8B, Llama 2 7B/13B/70B, LLaMA 7B–65B).

Example (CPU, a few seconds)::

    .venv/bin/python -m benchmarks.gpu_hours     # writes benchmarks/results/gpu_hours.md and .json

Each run's throughput is batchpilot's step-time model at the published layout where one is published (DeepSeek-V3:
``benchmarks.published_runs.deepseek_v3_check``; Llama 3.1 405B: the published-runs row of Table 4, 16,384 H100 at
TP 8, PP 16, 16M-token batches), else ``batchpilot plan``'s best layout for the published batch on the stated
cluster (``PlanOptions`` below, one per run, with the assumption that fills each gap); the GPU-hours are
:func:`batchpilot.plan.cost.training_cost` of the published token count — what ``plan --train-tokens D`` /
``--epochs 1 --dataset-tokens D`` prints. The published figures count the whole pretraining run: failures and
restarts, evaluation, checkpointing, and for Llama 3.1 the long-context and annealing stages; the step-time model
counts steady-state steps only, so predicted/published below 1 is expected (Llama 3 §3.3.4: more than 90 %
effective training time).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchpilot.estimate.fitted import FITTED
from batchpilot.plan.cost import TIME_RATIO_HIGH, TIME_RATIO_LOW, training_cost
from batchpilot.plan.options import PlanOptions, prepare_plan
from batchpilot.plan.planner import plan
from benchmarks.published_runs import _step, deepseek_v3_check, load_data, row_to_inputs

RESULTS = Path(__file__).parent / "results"
T = 10**12


@dataclass(frozen=True, kw_only=True, slots=True)
class PublishedRun:
    """A pretraining run whose GPU-hours and token count are published."""

    name: str
    gpu: str
    train_tokens: int
    gpu_hours: float
    source: str
    """Where the GPU-hours and tokens are published."""
    layout: str
    """How the throughput is obtained (a published-runs row, or plan options and their assumptions)."""
    row_id: str | None = None
    options: PlanOptions | None = None


def _plan_options(model: str, gpu: str, gpus: int, seq_len: int, batch_tokens: int, bandwidth: str,
                  engine: str = "torchtitan") -> PlanOptions:
    from batchpilot.units import parse_bytes

    return PlanOptions(model=model, gpu=gpu, gpus=gpus, seq_len=seq_len, global_batch_tokens=batch_tokens,
                       engine=engine, inter_node_bandwidth_bytes_per_s=parse_bytes(bandwidth), max_deviation=0.05)


_LLAMA1 = ("Touvron et al. 2023 (LLaMA), Table 15 (GPU-hours, A100-80GB) and Table 2 (tokens); §2.4: 2,048 "
           "A100-80GB, 4M-token batches of 2,048-token sequences")
_LLAMA2 = ("Touvron et al. 2023 (Llama 2), Table 2 (GPU-hours, A100-80GB) and Table 1 (2T tokens, 4K context, "
           "4M-token batches); §2.2.1: 200 Gb/s per GPU")
_LLAMA31 = ("Llama 3.1 model card (github.com/meta-llama/llama-models, models/llama3_1/MODEL_CARD.md): training "
            "GPU-hours on H100-80GB; ~15T tokens (405B: 15.6T, Llama 3 Herd §3.4)")
_PLANNED = "plan: {gpus} GPUs (cluster not published for this size), FSDP (torchtitan), the published batch"

RUNS: tuple[PublishedRun, ...] = (
    PublishedRun(name="DeepSeek-V3 671B (pretraining)", gpu="h800", train_tokens=int(14.8 * T), gpu_hours=2.664e6,
                 source="DeepSeek-V3 report (arXiv:2412.19437) Table 1: 2,664K H800 GPU-hours for 14.8T tokens",
                 layout="published layout (2,048 H800, PP 16, EP 64, DualPipe, fp8), final batch 15,360",
                 row_id="deepseek-v3-pretrain-2048gpu"),
    PublishedRun(name="Llama 3.1 405B", gpu="h100-sxm", train_tokens=int(15.6 * T), gpu_hours=30.84e6,
                 source=_LLAMA31, layout="published layout (Llama 3 Table 4: 16,384 H100, TP 8, PP 16, 16M tokens)",
                 row_id="llama3-405b-16384gpu-cp1"),
    PublishedRun(name="Llama 3.1 70B", gpu="h100-sxm", train_tokens=15 * T, gpu_hours=7.0e6, source=_LLAMA31,
                 layout=_PLANNED.format(gpus=4096) + " (4M tokens, seq 8192: the 405B run's first stage)",
                 options=_plan_options("llama-3.1-70b", "h100-sxm", 4096, 8192, 4 * 2**20, "50GB")),
    PublishedRun(name="Llama 3.1 8B", gpu="h100-sxm", train_tokens=15 * T, gpu_hours=1.46e6, source=_LLAMA31,
                 layout=_PLANNED.format(gpus=1024) + " (4M tokens, seq 8192)",
                 options=_plan_options("llama-3.1-8b", "h100-sxm", 1024, 8192, 4 * 2**20, "50GB")),
    PublishedRun(name="Llama 2 70B", gpu="a100-80gb", train_tokens=2 * T, gpu_hours=1_720_320, source=_LLAMA2,
                 layout=_PLANNED.format(gpus=2048), options=_plan_options("llama-2-70b", "a100-80gb", 2048, 4096,
                                                                          4 * 2**20, "25GB")),
    PublishedRun(name="Llama 2 13B", gpu="a100-80gb", train_tokens=2 * T, gpu_hours=368_640, source=_LLAMA2,
                 layout=_PLANNED.format(gpus=1024), options=_plan_options("llama-2-13b", "a100-80gb", 1024, 4096,
                                                                          4 * 2**20, "25GB")),
    PublishedRun(name="Llama 2 7B", gpu="a100-80gb", train_tokens=2 * T, gpu_hours=184_320, source=_LLAMA2,
                 layout=_PLANNED.format(gpus=1024), options=_plan_options("llama-2-7b", "a100-80gb", 1024, 4096,
                                                                          4 * 2**20, "25GB")),
    PublishedRun(name="LLaMA 65B", gpu="a100-80gb", train_tokens=int(1.4 * T), gpu_hours=1_022_362, source=_LLAMA1,
                 layout="plan: 2,048 GPUs (LLaMA §2.4), FSDP, 4M tokens",
                 options=_plan_options("llama-65b", "a100-80gb", 2048, 2048, 4 * 2**20, "25GB")),
    PublishedRun(name="LLaMA 33B", gpu="a100-80gb", train_tokens=int(1.4 * T), gpu_hours=530_432, source=_LLAMA1,
                 layout="plan: 2,048 GPUs, FSDP, 4M tokens",
                 options=_plan_options("llama-33b", "a100-80gb", 2048, 2048, 4 * 2**20, "25GB")),
    PublishedRun(name="LLaMA 13B", gpu="a100-80gb", train_tokens=1 * T, gpu_hours=135_168, source=_LLAMA1,
                 layout="plan: 1,024 GPUs, FSDP, 4M tokens",
                 options=_plan_options("llama-13b", "a100-80gb", 1024, 2048, 4 * 2**20, "25GB")),
    PublishedRun(name="LLaMA 7B", gpu="a100-80gb", train_tokens=1 * T, gpu_hours=82_432, source=_LLAMA1,
                 layout="plan: 1,024 GPUs, FSDP, 4M tokens",
                 options=_plan_options("llama-7b", "a100-80gb", 1024, 2048, 4 * 2**20, "25GB")),
)


def throughput(run: PublishedRun) -> tuple[float, int, str]:
    """(whole-job tokens/s, GPUs, what was run) of ``run``'s layout."""
    if run.row_id == "deepseek-v3-pretrain-2048gpu":
        rows = load_data()["rows"]
        check = deepseek_v3_check(rows)
        return check["predicted"] * 2048, 2048, "step-time model at the published layout"
    if run.row_id is not None:
        row = next(r for r in load_data()["rows"] if r["id"] == run.row_id)
        step, world, _ = _step(row, row_to_inputs(row), FITTED)
        return step.tokens_per_s, world, "step-time model at the published layout"
    assert run.options is not None
    best = plan(prepare_plan(run.options).request).plans[0]
    s, t = best.settings, best.triad
    how = (f"plan: {t.micro_batch_sequences}×{t.grad_accum_steps}×dp {t.data_parallel_ranks}, tp {s.tp} pp {s.pp}, "
           f"ZeRO-{s.zero_stage}, recompute {s.recompute}, MFU {best.step.mfu:.0%}")
    return best.step.tokens_per_s, run.options.gpus, how


def evaluate(run: PublishedRun) -> dict[str, Any]:
    tokens_per_s, gpus, how = throughput(run)
    cost = training_cost(tokens_per_s=tokens_per_s, gpus=gpus, train_tokens=run.train_tokens)
    return {"name": run.name, "gpu": run.gpu, "gpus": gpus, "train_tokens": run.train_tokens,
            "published_gpu_hours": run.gpu_hours, "predicted_gpu_hours": cost.gpu_hours,
            "band": [cost.gpu_hours_low, cost.gpu_hours_high], "ratio": cost.gpu_hours / run.gpu_hours,
            "in_band": cost.gpu_hours_low <= run.gpu_hours <= cost.gpu_hours_high,
            "tokens_per_s_per_gpu": tokens_per_s / gpus, "how": how, "layout": run.layout, "source": run.source}


def _table(results: list[dict[str, Any]]) -> str:
    lines = ["| run | GPU | tokens | published GPU-hours | predicted | 80% band | predicted / published | "
             "tokens/s/GPU | how |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['gpu']} | {r['train_tokens'] / T:.1f}T | {r['published_gpu_hours']:,.0f} | "
                     f"{r['predicted_gpu_hours']:,.0f} | {r['band'][0]:,.0f}–{r['band'][1]:,.0f} | {r['ratio']:.2f} | "
                     f"{r['tokens_per_s_per_gpu']:,.0f} | {r['how']} |")
    return "\n".join(lines)


def main() -> dict[str, Any]:
    results = [evaluate(run) for run in RUNS]
    ratios = sorted(r["ratio"] for r in results)
    summary = {"runs": len(results), "median_ratio": ratios[len(ratios) // 2],
               "in_band": sum(r["in_band"] for r in results), "band": [TIME_RATIO_LOW, TIME_RATIO_HIGH]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu_hours.json").write_text(json.dumps({"summary": summary, "runs": results}, indent=2) + "\n",
                                            encoding="utf-8")
    sources = "\n".join(f"- {r.name}: {r.source}; throughput: {r.layout}" for r in RUNS)
    text = (f"# Time to train: predicted vs published GPU-hours\n\nGenerated by `python -m benchmarks.gpu_hours` "
            f"(method: the module docstring). Predicted = the token count ÷ batchpilot's modelled tokens/s × GPUs "
            f"(`plan --train-tokens D` / `--epochs 1 --dataset-tokens D`); the band is the speed model's 10th–90th "
            f"percentile error on held-out published runs (×{TIME_RATIO_LOW:.2f}–×{TIME_RATIO_HIGH:.2f}). Published "
            f"figures include failures, restarts, evaluation and (Llama 3.1) long-context stages; the model counts "
            f"steady-state steps.\n\nSummary: {summary['runs']} runs, median predicted/published "
            f"{summary['median_ratio']:.2f}, published inside the band: {summary['in_band']} of {summary['runs']}.\n\n"
            f"{_table(results)}\n\nSources and layouts:\n\n{sources}\n")
    (RESULTS / "gpu_hours.md").write_text(text, encoding="utf-8")
    return summary


if __name__ == "__main__":
    print(main())
