"""``batchpilot train`` tokens/s beside a minimal PyTorch loop and Hugging Face Trainer; batching modes.

Run::

    .venv/bin/python -m benchmarks.train_throughput                 # CPU, a few minutes on 2 cores
    .venv/bin/python -m benchmarks.train_throughput --steps 20 --repeats 3 --precision bf16

Part 1 — same model (tiny-llama-1m, fp32 weights), same batch (8 × 256 tokens, one micro-batch, no
accumulation), same precision, same data (the first global batches of the stdlib corpus, fixed
batching), AdamW with clipping at 1.0, one thread count. Three contenders, each in a fresh process:

- ``minimal``: a hand-written loop over pre-built tensors — forward, mean cross-entropy, backward,
  clip, fused ``AdamW.step`` (as the other two use), ``zero_grad``, ``loss.item()``; no data work inside
  the timed loop at all;
- ``batchpilot``: :func:`batchpilot.train.run` (data layout, collation, token-sum loss, metrics.jsonl
  all inside its step time);
- ``hf_trainer``: ``transformers.Trainer`` on the same tensors (``default_data_collator``,
  ``report_to=[]``, no saving), step times from a ``TrainerCallback``.

tokens/s = real tokens of the timed steps / their wall time; the first ``WARMUP`` steps of each run are
excluded. Tokens per CPU-second (``time.process_time``, all threads of the process) is reported beside
it: it is far less disturbed by other processes on a shared machine than wall time. The machine is shared and noisy: contenders run interleaved (the order rotating every round), ``--repeats`` times, and the
fastest run of each is kept (the least disturbed); ratios are within this one run.

Part 2 — batching modes on the stdlib corpus: the padding fraction over a whole epoch (an exact data
statistic from the layouts, no training) and measured tokens/s over a few steps, for fixed padding,
token-budget (``--max-tokens-per-micro-batch`` = micro × seq_len) and packing. The stdlib's documents
are long (17 KB on average) next to these sequence lengths, so only each file's last piece is short:
padding is small here and grows with the sequence length.

Writes ``benchmarks/results/train_throughput.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WARMUP = 2
MODEL = "tiny-llama-1m"


def _config(*, out: str, steps: int, seq_len: int, batch: int, micro: int, batching: str, precision: str,
            threads: int) -> Any:
    from batchpilot.train.config import TrainConfig

    return TrainConfig().replace(
        model={"model": MODEL}, data={"data": "stdlib", "seq_len": seq_len},
        batch={"global_batch_sequences": batch, "micro_batch_sequences": micro, "batching": batching},
        optim={"precision": precision, "warmup_steps": 0, "decay": "constant", "lr": 1e-3},
        run={"steps": steps, "out": out, "threads": threads, "val_rows": 1},
    )


def _batches(cfg: Any, steps: int) -> list[Any]:
    """The first ``steps`` global batches exactly as batchpilot builds them (fixed batching, one micro-batch)."""
    from batchpilot.train.batching import collate, layout_step
    from batchpilot.train.distributed import CPU_ENV_FOR_TESTS
    from batchpilot.train.loop import Trainer

    trainer = Trainer(cfg, CPU_ENV_FOR_TESTS)
    out, seen = [], 0
    for _ in range(steps):
        rows = trainer.stream.rows(seen, cfg.batch.global_batch_sequences)
        layout = layout_step(rows, mode="fixed", dp=1, micro_batch_sequences=len(rows), seq_len=cfg.data.seq_len,
                             max_tokens_per_micro_batch=0)
        out.append(collate(layout.per_rank[0][0], trainer.corpus.tokens, mode="fixed"))
        seen += len(rows)
    return out


def _tokens_per_s(tokens: list[int], seconds: list[float]) -> float:
    return sum(tokens[WARMUP:]) / sum(seconds[WARMUP:])


def child_minimal(cfg: Any, steps: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from batchpilot.train.model import build_model

    torch.set_num_threads(cfg.run.threads)
    batches = _batches(cfg, steps)
    model = build_model(cfg.model, seed=0).module.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.optim.precision)
    tokens, seconds, cpu = [], [], []
    for mb in batches:
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), mb.targets.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        seconds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        tokens.append(mb.num_input_tokens)
    return {"tokens_per_s": _tokens_per_s(tokens, seconds), "tokens_per_cpu_s": _tokens_per_s(tokens, cpu),
            "steps": steps}


def child_batchpilot(cfg: Any, steps: int) -> dict[str, Any]:
    """The library's own step (layout, collation, token-sum loss, optimizer, metrics.jsonl line), timed."""
    from batchpilot.train.distributed import CPU_ENV_FOR_TESTS
    from batchpilot.train.loop import Trainer

    trainer = Trainer(cfg, CPU_ENV_FOR_TESTS)
    tokens, seconds, cpu = [], [], []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        record = trainer.train_step()
        trainer._publish(record)
        seconds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        tokens.append(record["global_batch_tokens"])
    return {"tokens_per_s": _tokens_per_s(tokens, seconds), "tokens_per_cpu_s": _tokens_per_s(tokens, cpu),
            "steps": steps}


def child_hf_trainer(cfg: Any, steps: int) -> dict[str, Any]:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from batchpilot.train.model import build_model

    torch.set_num_threads(cfg.run.threads)
    batches = _batches(cfg, steps)
    rows = []
    for mb in batches:  # HF shifts labels itself: labels = inputs, -100 on padding
        labels = mb.input_ids.masked_fill(mb.attention_mask == 0, -100)
        rows += [{"input_ids": mb.input_ids[i], "attention_mask": mb.attention_mask[i], "labels": labels[i]}
                 for i in range(len(mb.input_ids))]
    times: list[float] = []
    cpu: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            times.append(time.perf_counter() - self.start)
            cpu.append(time.process_time() - self.cpu_start)

    args = TrainingArguments(
        output_dir=cfg.run.out, per_device_train_batch_size=cfg.batch.global_batch_sequences, max_steps=steps,
        learning_rate=1e-3, weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0, lr_scheduler_type="constant",
        logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
        bf16=cfg.optim.precision == "bf16", seed=0, data_seed=0, disable_tqdm=True,
    )
    model = build_model(cfg.model, seed=0).module
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[Clock()])
    trainer.train_dataset = rows
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(rows)  # type: ignore[method-assign]
    trainer.train()
    tokens = [mb.num_input_tokens for mb in batches][: len(times)]
    return {"tokens_per_s": _tokens_per_s(tokens, times), "tokens_per_cpu_s": _tokens_per_s(tokens, cpu),
            "steps": len(times)}


def child_mode(cfg: Any, steps: int) -> dict[str, Any]:
    return child_batchpilot(cfg, steps)


CHILDREN = {"minimal": child_minimal, "batchpilot": child_batchpilot, "hf_trainer": child_hf_trainer,
            "mode": child_mode}
PARTS = ("loops", "modes")


def _spawn(kind: str, cfg: Any, steps: int) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_throughput", "--child", kind, "--steps", str(steps),
         "--config", json.dumps(cfg.to_dict())],
        cwd=HERE.parent, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(cfg.run.threads)},
    )
    if proc.returncode:
        raise RuntimeError(f"{kind} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def epoch_padding(seq_len: int, batch: int, micro: int) -> dict[str, float]:
    """Padding fraction over one full epoch of the stdlib corpus for each batching mode (no training)."""
    from batchpilot.train.batching import RowStream, layout_step
    from batchpilot.train.data import load_documents, split_documents, tokenize
    from batchpilot.train.tokenizer import ByteTokenizer

    train, _ = split_documents(load_documents("stdlib"), 0.02)
    corpus = tokenize(train, ByteTokenizer())
    result = {}
    for mode in ("fixed", "token-budget", "packed"):
        stream = RowStream(corpus, mode=mode, seq_len=seq_len, seed=0)  # type: ignore[arg-type]
        real = slots = 0
        for start in range(0, stream.rows_per_epoch - batch + 1, batch):
            layout = layout_step(stream.rows(start, batch), mode=mode, dp=1,  # type: ignore[arg-type]
                                 micro_batch_sequences=micro, seq_len=seq_len, max_tokens_per_micro_batch=micro * seq_len)
            real, slots = real + layout.global_input_tokens, slots + layout.global_padded_tokens
        result[mode] = 1 - real / slots
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child")
    parser.add_argument("--config")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--part", choices=(*PARTS, "all"), default="all")
    args = parser.parse_args(argv)
    if args.child:
        from batchpilot.train.config import TrainConfig

        cfg = TrainConfig.from_dict(json.loads(args.config))
        print(json.dumps(CHILDREN[args.child](cfg, args.steps)))
        return 0
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "train_throughput.json"
    report: dict[str, Any] = json.loads(path.read_text()) if args.part != "all" and path.exists() else {}
    report.update({"model": MODEL, "precision": args.precision, "warmup_steps_excluded": WARMUP,
                   "threads": args.threads})
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("loops", "all"):
            report["loops"] = _compare_loops(args, tmp)
        if args.part in ("modes", "all"):
            report["batching"] = _compare_modes(args, tmp)
    path.write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "train_throughput.md").write_text(_markdown(report))
    print(_markdown(report))
    return 0


def _compare_loops(args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    runs: dict[str, list[float]] = {"minimal": [], "batchpilot": [], "hf_trainer": []}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    kinds = list(runs)
    for repeat in range(args.repeats):
        # rotate the order each round so that a load trend on the shared machine favours no contender
        for kind in kinds[repeat % 3:] + kinds[:repeat % 3]:
            cfg = _config(out=f"{tmp}/{kind}{repeat}", steps=args.steps, seq_len=256, batch=8, micro=8,
                          batching="fixed", precision=args.precision, threads=args.threads)
            result = _spawn(kind, cfg, args.steps)
            runs[kind].append(result["tokens_per_s"])
            cpu[kind].append(result["tokens_per_cpu_s"])
            print(f"{kind:11s} run {repeat}: {runs[kind][-1]:8.0f} tokens/s, {cpu[kind][-1]:8.0f} tokens/CPU-s",
                  flush=True)
    best = {k: max(v) for k, v in runs.items()}
    best_cpu = {k: max(v) for k, v in cpu.items()}
    return {"batch": "8 × 256, micro 8, accum 1", "steps": args.steps, "repeats": args.repeats,
            "tokens_per_s_runs": runs, "tokens_per_s_best": best,
            "tokens_per_cpu_s_runs": cpu, "tokens_per_cpu_s_best": best_cpu,
            "batchpilot_vs_minimal": best["batchpilot"] / best["minimal"],
            "batchpilot_vs_hf_trainer": best["batchpilot"] / best["hf_trainer"],
            "batchpilot_vs_minimal_cpu": best_cpu["batchpilot"] / best_cpu["minimal"],
            "batchpilot_vs_hf_trainer_cpu": best_cpu["batchpilot"] / best_cpu["hf_trainer"]}


def _compare_modes(args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for seq_len, batch, micro in ((256, 16, 4), (1024, 4, 1)):
        modes: dict[str, Any] = {"epoch_padding_fraction": epoch_padding(seq_len, batch, micro),
                                 "tokens_per_s": {}, "tokens_per_cpu_s": {}}
        for mode in ("fixed", "token-budget", "packed"):
            cfg = _config(out=f"{tmp}/mode-{mode}-{seq_len}", steps=args.steps, seq_len=seq_len, batch=batch,
                          micro=micro, batching=mode, precision=args.precision, threads=args.threads)
            result = _spawn("mode", cfg, args.steps)
            modes["tokens_per_s"][mode] = result["tokens_per_s"]
            modes["tokens_per_cpu_s"][mode] = result["tokens_per_cpu_s"]
            print(f"seq {seq_len} {mode:12s}: {result['tokens_per_s']:8.0f} tokens/s, "
                  f"{result['tokens_per_cpu_s']:8.0f} tokens/CPU-s", flush=True)
        out[f"seq {seq_len}, global {batch}, micro {micro} (budget {micro * seq_len} tokens)"] = modes
    return out


def _markdown(report: dict[str, Any]) -> str:
    loops = report["loops"]
    lines = [
        f"# batchpilot train throughput ({report['model']}, {report['precision']}, {loops['batch']}, "
        f"{report['threads']} threads, best of {loops.get('repeats')}, {loops.get('steps')} steps, first "
        f"{report['warmup_steps_excluded']} excluded)", "",
        "| loop | tokens/s wall (best) | wall runs | tokens per CPU-second (best) | CPU runs |", "|---|---|---|---|---|",
    ]
    for kind, best in loops["tokens_per_s_best"].items():
        runs = ", ".join(f"{v:.0f}" for v in loops["tokens_per_s_runs"][kind])
        cpu_runs = loops.get("tokens_per_cpu_s_runs", {}).get(kind, [])
        lines.append(f"| {kind} | {best:.0f} | {runs} | {max(cpu_runs, default=0):.0f} | "
                     f"{', '.join(f'{v:.0f}' for v in cpu_runs)} |")
    lines += ["", f"batchpilot / minimal loop = **{loops['batchpilot_vs_minimal']:.3f}** wall, "
              f"**{loops.get('batchpilot_vs_minimal_cpu', float('nan')):.3f}** CPU time; "
              f"batchpilot / HF Trainer = **{loops['batchpilot_vs_hf_trainer']:.3f}** wall, "
              f"**{loops.get('batchpilot_vs_hf_trainer_cpu', float('nan')):.3f}** CPU time", "",
              "## Batching modes on the stdlib corpus", "",
              "| setting | mode | padding (whole epoch) | real tokens/s wall | real tokens per CPU-second |",
              "|---|---|---|---|---|"]
    for key, modes in report.get("batching", {}).items():
        for mode, pad in modes["epoch_padding_fraction"].items():
            cpu = modes.get("tokens_per_cpu_s", {}).get(mode, float("nan"))
            lines.append(f"| {key} | {mode} | {100 * pad:.2f}% | {modes['tokens_per_s'][mode]:.0f} | {cpu:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
