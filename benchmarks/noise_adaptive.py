"""Time to a target validation loss: adaptive batch vs fixed small, fixed large and a linear ramp (CPU).

Example (the default CPU task; ~15–30 min on a shared 2-core machine)::

    .venv/bin/python -m benchmarks.noise_adaptive            # all parts
    .venv/bin/python -m benchmarks.noise_adaptive race       # only the time-to-target race
    .venv/bin/python -m benchmarks.noise_adaptive tables     # re-render tables and plot from the JSON

Parts, each writing ``benchmarks/results/noise_adaptive*.{json,md,png}``:

- ``race`` — tiny-llama-1m on the stdlib corpus (byte tokens, 256-token rows), micro-batch 4 fixed,
  AdamW at peak LR 3e-3 for a batch of 8 sequences, constant after a 5-step warmup, and the square-root
  LR rule (Malladi et al. 2022) for every other batch (fixed large gets 3e-3·√(64/8)). Runs: fixed 8,
  fixed 64, a linear ramp 8→64 over the token budget's first third, and ``adaptive:min=8,max=64``.
  Validation loss (64 held-out rows) every 2 steps; the time to target is interpolated linearly
  between the two evaluations around the crossing, in training wall-clock (evaluation excluded),
  optimizer steps and tokens. Process CPU time is reported beside wall-clock, because the machine is
  shared and wall-clock is noisy. Every run carries the noise-measurement hook (same overhead for all;
  B_simple trajectories at fixed batch sizes).
- ``seeds`` — ``batchpilot noise`` (K = 30 steps from scratch) with two seeds: B_simple and the ratio.
- ``overhead`` — forward+backward with and without the noise hook, interleaved in one process: CPU-time ratio.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from batchpilot.train.adaptive import NoiseScaleHook
from batchpilot.train.config import DEFAULT_NOISE_EVERY, TrainConfig
from batchpilot.train.hooks import MicroStepInfo, StepInfo
from batchpilot.train.runner import run
from batchpilot.tune.noise_run import NoiseRunSettings, measure_noise

RESULTS = Path(__file__).resolve().parent / "results"
SEQ_LEN, MICRO, SMALL, LARGE, LR = 128, 4, 8, 64, 3e-3
TOKEN_BUDGET = 600_000
"""Tokens each race run may use (a run stops early once it is ``STOP_MARGIN`` below the target)."""
STOP_MARGIN = 0.05
TARGET_LOSS = 2.5
"""Validation loss (nats per byte) every run is timed to; chosen from a pilot so that all runs reach it."""
THREADS = 1


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _base(out: Path, **batch: Any) -> TrainConfig:
    return TrainConfig().replace(
        data={"data": "stdlib", "seq_len": SEQ_LEN},
        batch={"micro_batch_sequences": MICRO, **batch},
        optim={"lr": LR, "warmup_steps": 5, "decay": "constant", "lr_scaling": "sqrt"},
        run={"steps": None, "tokens": TOKEN_BUDGET, "out": str(out), "threads": THREADS, "val_every": 2,
             "val_rows": 64, "seed": 0, "checkpoint_every": 0})


def race_configs(root: Path) -> dict[str, TrainConfig]:
    """The four runs of the race."""
    ramp_tokens = TOKEN_BUDGET // 3
    return {
        f"fixed-{SMALL}": _base(root / "small", global_batch_sequences=SMALL),
        f"fixed-{LARGE}": _base(root / "large", global_batch_sequences=LARGE).replace(
            optim={"lr": LR * math.sqrt(LARGE / SMALL)}),
        f"ramp-{SMALL}-{LARGE}": _base(root / "ramp", global_batch_sequences=LARGE,
                                       batch_schedule=f"ramp:start={SMALL},increment={SMALL},over={ramp_tokens}"),
        f"adaptive-{SMALL}-{LARGE}": _base(root / "adaptive", global_batch_sequences=SMALL,
                                           batch_schedule=f"adaptive:min={SMALL},max={LARGE},cooldown=10"),
    }


class _Reached(Exception):
    """Raised from the record callback once a run is safely past the target, to save benchmark time."""


def time_to_target(records: list[dict[str, Any]], target: float) -> dict[str, float] | None:
    """Interpolate (elapsed_s, step, tokens) at the first crossing of ``target`` by the validation loss."""
    evals = [r for r in records if r.get("val_loss") is not None]
    for prev, cur in zip([None, *evals], evals, strict=False):
        if cur["val_loss"] > target:
            continue
        if prev is None:
            return {k: float(cur[v]) for k, v in (("wall_s", "elapsed_s"), ("steps", "step"), ("tokens", "tokens"))}
        f = (prev["val_loss"] - target) / (prev["val_loss"] - cur["val_loss"])
        return {k: prev[v] + f * (cur[v] - prev[v]) for k, v in
                (("wall_s", "elapsed_s"), ("steps", "step"), ("tokens", "tokens"), ("cpu_s", "cpu_s"))}
    return None


def race() -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bp-race-") as tmp:
        for name, cfg in race_configs(Path(tmp)).items():
            cpu0 = _cpu_s()
            records: list[dict[str, Any]] = []

            def keep(record: dict[str, Any], _records: list[dict[str, Any]] = records, _cpu0: float = cpu0) -> None:
                _records.append({**record, "cpu_s": _cpu_s() - _cpu0})
                if record.get("val_loss") is not None and record["val_loss"] < TARGET_LOSS - STOP_MARGIN:
                    raise _Reached

            # Every run measures the noise scale (the adaptive schedule installs its own hook): the same
            # overhead everywhere, and B_simple trajectories at fixed batches for the growth analysis.
            hooks = [] if name.startswith("adaptive") else [NoiseScaleHook()]
            with contextlib.suppress(_Reached):
                run(cfg, hooks=hooks, on_record=keep)
            reached = time_to_target(records, TARGET_LOSS)
            vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
            results[name] = {"schedule": cfg.batch.batch_schedule, "reached": reached,
                             "final_val_loss": vals[-1] if vals else None, "steps": records[-1]["step"],
                             "tokens": records[-1]["tokens"], "elapsed_s": records[-1]["elapsed_s"],
                             "trajectory": [{k: r.get(k) for k in ("step", "tokens", "elapsed_s", "cpu_s", "loss",
                                                                     "val_loss", "global_batch_sequences", "lr",
                                                                     "b_simple", "b_simple_lo", "b_simple_hi",
                                                                     "batch_decision")} for r in records]}
            print(f"{name}: {reached}", flush=True)
    return results


def seeds(k: int = 30) -> dict[str, Any]:
    out = {}
    for seed in (0, 1):
        record = measure_noise(NoiseRunSettings(seq_len=SEQ_LEN, micro_batch_sequences=MICRO,
                                                global_batch_sequences=4 * MICRO, steps=k, seed=seed, lr=LR,
                                                threads=THREADS))
        out[f"seed-{seed}"] = {key: record[key] for key in ("b_simple_sequences", "b_simple_tokens", "band",
                                                             "steps_measured", "loss_first", "loss_last",
                                                             "trajectory", "confident")}
        print(f"seed {seed}: B_simple {record['b_simple_sequences']:.2f} band {record['band']['sequences']}", flush=True)
    a, b = (out[f"seed-{s}"]["b_simple_sequences"] for s in (0, 1))
    out["ratio"] = max(a, b) / min(a, b)
    return out


def _hooked_steps(model: torch.nn.Module, hook: NoiseScaleHook | None, steps: int, accum: int,
                  batch: torch.Tensor) -> None:
    """``steps`` optimizer-free training steps of ``accum`` micro-steps, calling the hook as the loop does."""
    n = batch.numel() * accum
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        for i in range(accum):
            model(input_ids=batch, labels=batch).loss.mul(batch.numel() / n).backward()
            if hook is not None:
                hook.on_micro_step(model, MicroStepInfo(
                    step=step, micro_index=i, num_micro_steps=accum, micro_target_tokens=batch.numel(),
                    local_target_tokens=n, global_target_tokens=n, micro_batch_sequences=batch.shape[0], loss_sum=0.0,
                    loss_scale=1.0, grad_to_sum_factor=float(n), grads_synced=False, rank=0, world_size=1))
        if hook is not None:
            hook.on_gradients(model, StepInfo(
                step=step, global_batch_sequences=batch.shape[0] * accum, global_target_tokens=n,
                local_target_tokens=n, tokens_seen=0, loss_scale=1.0, grad_to_sum_factor=float(n), lr=0.0, rank=0,
                world_size=1))


def overhead(model_name: str = "tiny-llama-1m", repeats: int = 12, steps: int = 3, accum: int = 4,
             every: int = 1) -> dict[str, Any]:
    """Process CPU time of forward+backward steps with and without :class:`NoiseScaleHook`, interleaved in one process.

    One process and many short alternated blocks, because whole runs on the shared machine differed by
    more than the effect (±5% between identical runs). The hook's cost is the per-parameter norm in each
    micro-step's backward plus one pass over ``p.grad`` per step; the optimizer step, which the hook does
    not touch, is left out, so this is an upper bound on the fraction of a real step. With ``every`` > 1
    (the runner's default measurement, ``--noise-every``) a block holds a multiple of ``every`` steps, so
    exactly one step in ``every`` is measured; the "off" blocks run with the tensor hooks removed.
    """
    from batchpilot.train.config import ModelConfig
    from batchpilot.train.model import build_model

    torch.set_num_threads(THREADS)
    model = build_model(ModelConfig(model=model_name), seed=0).module
    batch = torch.randint(0, 256, (MICRO, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    steps = -(-steps // every) * every
    hook = NoiseScaleHook(every=every)
    _hooked_steps(model, hook, every + 1, accum, batch)  # attach + warm up
    times: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(repeats):
        for mode in ("off", "on"):
            if hook._meter is not None:  # "off": no tensor hooks at all; "on": re-attached on its first micro-step
                hook._meter.remove()
                hook._meter = None
            start = time.process_time()
            _hooked_steps(model, hook if mode == "on" else None, steps, accum, batch)
            times[mode].append(time.process_time() - start)
    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"overhead {model_name} every {every}: median CPU {med['off']:.3f} s off, {med['on']:.3f} s on", flush=True)
    paired = statistics.median(on / off for on, off in zip(times["on"], times["off"], strict=True)) - 1.0
    return {"model": model_name, "cpu_s": times, "overhead_fraction_median": med["on"] / med["off"] - 1.0,
            "overhead_fraction_min": min(times["on"]) / min(times["off"]) - 1.0,
            "overhead_fraction_paired_median": paired, "steps_per_block": steps,
            "accum": accum, "every": every, "micro_batch": MICRO, "seq_len": SEQ_LEN, "threads": THREADS}


def growth_table(results: dict[str, Any]) -> str:
    """B_simple (EMA, β = 0.95) against the training loss along each run: does it grow as the loss falls?"""
    lines = ["| run | step | train loss | val loss | B_simple (seq) | 95% band |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        measured = [t for t in r["trajectory"] if t.get("b_simple") is not None and math.isfinite(t["b_simple"])]
        if len(measured) < 3:
            continue
        picks = sorted({measured[int(f * (len(measured) - 1))]["step"] for f in (0.1, 0.4, 0.7, 1.0)})
        for t in (m for m in measured if m["step"] in picks):
            val = "" if t["val_loss"] is None else f"{t['val_loss']:.3f}"
            hi = "∞" if t["b_simple_hi"] is None or not math.isfinite(t["b_simple_hi"]) else f"{t['b_simple_hi']:.2f}"
            lines.append(f"| {name} | {t['step']} | {t['loss']:.3f} | {val} | {t['b_simple']:.2f} | "
                         f"{t['b_simple_lo']:.2f}–{hi} |")
    return "\n".join(lines) + "\n"


def _write(name: str, data: dict[str, Any], table: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    (RESULTS / f"{name}.md").write_text(table, encoding="utf-8")


def race_table(results: dict[str, Any]) -> str:
    lines = [f"Target validation loss {TARGET_LOSS} (nats/byte), tiny-llama-1m, stdlib, seq {SEQ_LEN}, micro {MICRO}, "
             f"torch {torch.__version__}, {THREADS} threads on a shared machine.", "",
             "| run | wall-clock to target (s) | CPU time to target (s) | optimizer steps | tokens | final val loss |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        hit = r["reached"]
        if hit is None:
            lines.append(f"| {name} | not reached | — | — | — | {r['final_val_loss']:.3f} |")
        else:
            lines.append(f"| {name} | {hit['wall_s']:.1f} | {hit.get('cpu_s', float('nan')):.1f} | {hit['steps']:.1f} | "
                         f"{hit['tokens']:,.0f} | {r['final_val_loss']:.3f} |")
    lines += ["", _identical_note(results)]
    return "\n".join(lines) + "\n"


def _identical_note(results: dict[str, Any]) -> str:
    """Say when two runs did the same computation up to the target (then wall-clock differences are noise)."""
    notes = []
    adaptive = next((r for n, r in results.items() if n.startswith("adaptive")), None)
    small = results.get(f"fixed-{SMALL}")
    if adaptive is not None:
        grows = [t for t in adaptive["trajectory"] if str(t.get("batch_decision", "")).startswith("grow")]
        first = f"step {grows[0]['step']}" if grows else "never"
        notes.append(f"The adaptive run first grew its batch at {first}.")
        if small and adaptive["reached"] and small["reached"] and \
                adaptive["reached"]["tokens"] == small["reached"]["tokens"]:
            notes.append(f"Up to the target it trained exactly like fixed-{SMALL} (same batches, data and losses), "
                         "so the wall-clock and CPU-time differences between those two rows are machine noise "
                         "(other jobs shared the 2 cores), not an effect of the schedule.")
    return " ".join(notes)


def race_plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    (ax1, ax2), (ax3, ax4) = axes
    for name, r in results.items():
        traj = r["trajectory"]
        evals = [t for t in traj if t["val_loss"] is not None]
        ax1.plot([t["elapsed_s"] for t in evals], [t["val_loss"] for t in evals], label=name)
        ax2.plot([t["tokens"] for t in evals], [t["val_loss"] for t in evals], label=name)
        ax3.plot([t["tokens"] for t in traj], [t["global_batch_sequences"] for t in traj], label=name)
        noise = [t for t in traj if t.get("b_simple") is not None and math.isfinite(t["b_simple"])]
        ax4.plot([t["loss"] for t in noise], [t["b_simple"] for t in noise], ".", markersize=3, label=name)
    for ax in (ax1, ax2):
        ax.axhline(TARGET_LOSS, color="grey", linestyle="--", linewidth=1)
        ax.set(ylabel="validation loss (nats/byte)", ylim=(TARGET_LOSS - 0.3, 4.0))
    ax1.set(xlabel="training wall-clock (s) — shared machine, contention-dominated")
    ax2.set(xlabel="tokens")
    ax3.set(xlabel="tokens", ylabel="global batch (sequences)", yscale="log")
    ax4.set(xlabel="training loss (nats/byte)", ylabel="B_simple (sequences, EMA β=0.95)", yscale="log")
    ax4.invert_xaxis()
    for ax in axes.flat:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str]) -> int:
    parts = argv or ["overhead", "seeds", "race"]
    if "overhead" in parts:  # every step (the adaptive schedule) and the runner's default, one step in 4
        runs = {f"every-{k}": overhead(every=k, repeats=40, steps=4) for k in (1, DEFAULT_NOISE_EVERY)}
        _write("noise_adaptive_overhead", runs, "".join(
            f"Noise-hook overhead on {d['model']} (micro {MICRO} × {SEQ_LEN} tokens, accumulation {d['accum']}, "
            f"{THREADS} thread), measuring one step in {d['every']}: process CPU time of forward+backward, "
            f"{len(d['cpu_s']['on'])} interleaved blocks of {d['steps_per_block']} steps in one process (off: no "
            f"tensor hooks): median {100 * d['overhead_fraction_median']:+.1f}%, min-vs-min "
            f"{100 * d['overhead_fraction_min']:+.1f}%, median of paired blocks "
            f"{100 * d['overhead_fraction_paired_median']:+.1f}%\n\n" for d in runs.values()))
    if "seeds" in parts:
        data = seeds()
        rows = "\n".join(f"| {k} | {v['b_simple_sequences']:.2f} | {v['band']['sequences'][0]:.2f}–"
                         f"{v['band']['sequences'][1]:.2f} | {v['loss_first']:.2f} → "
                         f"{v['loss_last']:.2f} |" for k, v in data.items() if k.startswith("seed"))
        _write("noise_adaptive_seeds", data, "| seed | B_simple (seq) | 95% band | loss |\n|---|---|---|---|\n"
               f"{rows}\n\nratio between seeds: {data['ratio']:.2f}\n")
    if "tables" in parts:  # re-render the race's table, growth table and plot from its JSON
        data = json.loads((RESULTS / "noise_adaptive.json").read_text(encoding="utf-8"))
        _write("noise_adaptive", data, race_table(data) + "\n" + growth_table(data))
        race_plot(data, RESULTS / "noise_adaptive.png")
    if "race" in parts:
        data = race()
        _write("noise_adaptive", data, race_table(data) + "\n" + growth_table(data))
        race_plot(data, RESULTS / "noise_adaptive.png")
        print(race_table(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
