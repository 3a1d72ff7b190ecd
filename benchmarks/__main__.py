"""Run every benchmark: ``make bench`` (= ``.venv/bin/python -m benchmarks [NAME ...]``).

Each benchmark is a module of this package, run in its own process (``python -m benchmarks.NAME``) so
that one's memory and threads do not disturb another's. Each writes its results under
``benchmarks/results/`` (JSON + a Markdown table), committed with the code that produced them.
Comparisons with other tools are ratios measured in the same run: the machines are shared and noisy.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: The benchmarks, in the order they run (module name → what it compares).
BENCHMARKS: dict[str, str] = {
    "plan_speed": "time to plan the full search space (671B MoE on 2048 GPUs, 70B on 512)",
    "memory_vs_estimators": "memory prediction vs llm-analysis, DeepSpeed, accelerate, measured CPU peaks",
    "traced_accuracy": "traced (fake-tensor) peak memory vs measured CPU allocator peaks",
    "probe_vs_finders": "max micro-batch search vs Lightning (power, binsearch) and Accelerate",
    "train_throughput": "batchpilot train tokens/s vs a minimal PyTorch loop and HF Trainer; batching modes",
    "noise_adaptive": "time to target loss: adaptive batch vs fixed small/large and a linear ramp",
    "steptime_vs_published": "step-time model vs published TFLOP/s per GPU (Megatron, MT-NLG, BLOOM, Llama 3)",
    "published_runs": "memory and tokens/s per GPU vs published, measured GPU runs (benchmarks/data/published_runs.json)",
}


def main(argv: list[str]) -> int:
    names = argv or [n for n in BENCHMARKS if (HERE / f"{n}.py").is_file()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"error: unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        print(f"== {name}: {BENCHMARKS[name]}", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", f"benchmarks.{name}"], cwd=HERE.parent)
        print(f"== {name}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
