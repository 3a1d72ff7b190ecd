"""Time to a target validation loss: fixed, ramped and adaptive batches, here and on a simulated cluster (CPU).

Example (the default CPU task; ~30–60 min on a shared 2-core machine)::

    .venv/bin/python -m benchmarks.noise_adaptive race       # the time-to-target race (+ cluster simulation)
    .venv/bin/python -m benchmarks.noise_adaptive schedule   # a short measurement → a whole-run schedule, validated
    .venv/bin/python -m benchmarks.noise_adaptive tables     # re-render tables and plots from the JSON

Parts, each writing ``benchmarks/results/noise_adaptive*.{json,md,png}``:

- ``race`` — tiny-llama-1m on the stdlib corpus (byte tokens, 128-token rows), micro-batch 4 for every
  run, AdamW at 3e-3 for a batch of 8 sequences after a 5-step warmup, constant, and the square-root LR
  rule (Malladi et al. 2022) for every other batch (η = 3e-3·√(B/8)). Runs: fixed 8, 32, 64 and 128, a
  linear ramp 8→128 over the first third of the token budget, and ``adaptive:min=8,max=128``. Held-out
  loss (64 rows) every 2 steps; the crossing of the target is interpolated between the two evaluations
  around it in optimizer steps, tokens, wall-clock and process CPU time here (evaluation excluded; the
  machine is shared, so CPU time is the steadier of the two), and **simulated time on a data-parallel
  cluster** of 8 ranks × micro-batch 8: a step of global batch B takes ceil(B/64) × t_micro + t_opt +
  t_allreduce, with t_micro the measured process CPU time of one 8-sequence forward+backward here, t_opt
  that of one AdamW step, and t_allreduce a ring all-reduce of the fp32 gradients over 8 ranks on
  InfiniBand NDR from batchpilot's step-time model (:class:`batchpilot.estimate.collectives.Fabric`).
  Every run carries the noise hook (B_simple trajectories at fixed batches; the same overhead for all).
- ``schedule`` — the whole-run schedule from a short measurement (:mod:`batchpilot.plan.schedule_advice`):
  a fixed-16 run's first 15% is the measurement; the advice (schedule, LR per batch, predicted loss and
  costs) is then run against fixed 16 and fixed at the schedule's last batch, to the predicted loss. Added to
  ``noise_adaptive.json`` under ``_schedule`` (the race's results are kept) and rendered after the race in
  ``noise_adaptive.md``.
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
SEQ_LEN, MICRO, SMALL, LR = 128, 4, 8, 3e-3
FIXED = (8, 32, 64, 128)
"""Fixed global batches of the race (sequences)."""
LARGE = 128
"""The ramp's and the adaptive schedule's largest batch."""
TOKEN_BUDGET = 2_000_000
"""Tokens each race run may use (a run stops early once it is ``STOP_MARGIN`` below the target)."""
STOP_MARGIN = 0.05
TARGET_LOSS = 2.5
"""Validation loss (nats per byte) every run is timed to; chosen from a pilot so that all runs reach it."""
THREADS = 1
CLUSTER_RANKS, CLUSTER_MICRO = 8, 8
"""The simulated data-parallel cluster: 8 ranks, 8 sequences per rank per micro-batch."""


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def lr_for(batch: int) -> float:
    """The square-root rule for Adam (Malladi et al. 2022): η(B) = 3e-3·√(B/8)."""
    return LR * math.sqrt(batch / SMALL)


def _base(out: Path, **batch: Any) -> TrainConfig:
    return TrainConfig().replace(
        data={"data": "stdlib", "seq_len": SEQ_LEN},
        batch={"micro_batch_sequences": MICRO, **batch},
        optim={"lr": LR, "warmup_steps": 5, "decay": "constant", "lr_scaling": "sqrt"},
        run={"steps": None, "tokens": TOKEN_BUDGET, "out": str(out), "threads": THREADS, "val_every": 2,
             "val_rows": 64, "seed": 0, "checkpoint_every": 0, "noise_every": 0, "final_checkpoint": False})


def race_configs(root: Path) -> dict[str, TrainConfig]:
    """The runs of the race: fixed batches at their own LR, a ramp and the adaptive schedule from 8 (LR ∝ √B)."""
    runs = {f"fixed-{b}": _base(root / f"fixed-{b}", global_batch_sequences=b).replace(optim={"lr": lr_for(b)})
            for b in FIXED}
    runs[f"ramp-{SMALL}-{LARGE}"] = _base(root / "ramp", global_batch_sequences=LARGE, batch_schedule=(
        f"ramp:start={SMALL},increment={SMALL},over={TOKEN_BUDGET // 3}"))
    runs[f"adaptive-{SMALL}-{LARGE}"] = _base(root / "adaptive", global_batch_sequences=SMALL,
                                              batch_schedule=f"adaptive:min={SMALL},max={LARGE},cooldown=10")
    return runs


class _Reached(Exception):
    """Raised from the record callback once a run is safely past the target, to save benchmark time."""


def time_to_target(records: list[dict[str, Any]], target: float) -> dict[str, float] | None:
    """Interpolate (elapsed_s, cpu_s, step, tokens, cluster_s) at the first crossing of ``target``."""
    keys = (("wall_s", "elapsed_s"), ("cpu_s", "cpu_s"), ("steps", "step"), ("tokens", "tokens"),
            ("cluster_s", "cluster_s"))
    evals = [r for r in records if r.get("val_loss") is not None]
    for prev, cur in zip([None, *evals], evals, strict=False):
        if cur["val_loss"] > target:
            continue
        if prev is None:
            return {k: float(cur[v]) for k, v in keys}
        f = (prev["val_loss"] - target) / (prev["val_loss"] - cur["val_loss"])
        return {k: prev[v] + f * (cur[v] - prev[v]) for k, v in keys}
    return None


def cluster_model(repeats: int = 15) -> dict[str, Any]:
    """Measured t_micro (8 × 128 forward+backward) and t_opt (AdamW step) here, and the modelled all-reduce."""
    from batchpilot.estimate.collectives import Fabric
    from batchpilot.estimate.kernels import profile_for
    from batchpilot.specs.hardware import ClusterSpec, load_accelerator
    from batchpilot.specs.network import load_network
    from batchpilot.train.config import ModelConfig
    from batchpilot.train.model import build_model

    torch.set_num_threads(THREADS)
    model = build_model(ModelConfig(model="tiny-llama-1m"), seed=0).module
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, 256, (CLUSTER_MICRO, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    micro, step = [], []
    for i in range(repeats + 2):
        start = time.process_time()
        model(input_ids=batch, labels=batch).loss.backward()
        middle = time.process_time()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:  # the first two are warm-up
            micro.append(middle - start)
            step.append(time.process_time() - middle)
    params = sum(p.numel() for p in model.parameters())
    acc, net = load_accelerator("h100-sxm"), load_network("ib-ndr")
    cluster = ClusterSpec(accelerator=acc, devices_per_node=1, num_nodes=CLUSTER_RANKS,
                          inter_node_bandwidth_bytes_per_s=net.per_gpu_bandwidth_bytes_per_s)
    all_reduce = Fabric.of(cluster, profile_for(acc), net).all_reduce_s(4.0 * params, CLUSTER_RANKS, 1)
    return {"micro_s": statistics.median(micro), "optimizer_s": statistics.median(step), "all_reduce_s": all_reduce,
            "params": params, "ranks": CLUSTER_RANKS, "micro_batch": CLUSTER_MICRO, "network": "ib-ndr",
            "micro_s_samples": micro}


def cluster_step_s(batch: int, cluster: dict[str, Any]) -> float:
    """ceil(B / (ranks × micro)) × t_micro + t_opt + t_allreduce."""
    waves = math.ceil(batch / (cluster["ranks"] * cluster["micro_batch"]))
    return waves * cluster["micro_s"] + cluster["optimizer_s"] + cluster["all_reduce_s"]


def _run_to_target(cfg: TrainConfig, cluster: dict[str, Any], *, adaptive: bool,
                   target: float = TARGET_LOSS) -> list[dict[str, Any]]:
    """Train ``cfg`` until the held-out loss is ``STOP_MARGIN`` below ``target`` (or the token budget)."""
    cpu0, clock, records = _cpu_s(), [0.0], []

    def keep(record: dict[str, Any]) -> None:
        clock[0] += cluster_step_s(record["global_batch_sequences"], cluster)
        records.append({**record, "cpu_s": _cpu_s() - cpu0, "cluster_s": clock[0]})
        if record.get("val_loss") is not None and record["val_loss"] < target - STOP_MARGIN:
            raise _Reached

    # Every run measures the noise scale (the adaptive schedule installs its own hook): the same
    # overhead everywhere, and B_simple trajectories at fixed batches.
    with contextlib.suppress(_Reached):
        run(cfg, hooks=[] if adaptive else [NoiseScaleHook(skip_single_micro_batch=True)], on_record=keep)
    return records


def race() -> dict[str, Any]:
    cluster = cluster_model()
    print(f"cluster model: {cluster['micro_s'] * 1e3:.1f} ms per 8-sequence micro-batch, "
          f"{cluster['optimizer_s'] * 1e3:.1f} ms optimizer, {cluster['all_reduce_s'] * 1e3:.2f} ms all-reduce", flush=True)
    results: dict[str, Any] = {"_cluster": cluster}
    with tempfile.TemporaryDirectory(prefix="bp-race-") as tmp:
        for name, cfg in race_configs(Path(tmp)).items():
            records = _run_to_target(cfg, cluster, adaptive=name.startswith("adaptive"))
            reached = time_to_target(records, TARGET_LOSS)
            vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
            results[name] = {"schedule": cfg.batch.batch_schedule, "lr": cfg.optim.lr, "reached": reached,
                             "final_val_loss": vals[-1] if vals else None, "steps": records[-1]["step"],
                             "tokens": records[-1]["tokens"], "elapsed_s": records[-1]["elapsed_s"],
                             "trajectory": [{k: r.get(k) for k in ("step", "tokens", "elapsed_s", "cpu_s", "cluster_s",
                                                                     "loss", "val_loss", "global_batch_sequences", "lr",
                                                                     "b_simple", "b_simple_lo", "b_simple_hi",
                                                                     "batch_decision")} for r in records]}
            print(f"{name}: {reached}", flush=True)
    return results


SCHEDULE_TOKENS = 1_000_000
"""The whole run of the ``schedule`` part (tokens)."""
SHORT_FRACTION = 0.15
"""The measurement: this fraction of the fixed-16 run."""
SCHEDULE_BASE = 16


def _deepseek_lr(batch: int) -> float:
    """DeepSeek LLM's η_opt(C) at its B_opt(C) for tiny-llama-1m over SCHEDULE_TOKENS, moved to ``batch`` by √B."""
    from batchpilot.plan.priors import deepseek_batch_tokens, deepseek_flops_per_token, deepseek_learning_rate

    c = deepseek_flops_per_token(num_layers=4, hidden_size=128, seq_len=SEQ_LEN) * SCHEDULE_TOKENS
    return deepseek_learning_rate(c) * math.sqrt(batch / (deepseek_batch_tokens(c) / SEQ_LEN))


def _short_run(records: list[dict[str, Any]]) -> Any:
    """The first SHORT_FRACTION of a run as a :class:`~batchpilot.plan.schedule_advice.ShortRun` (held-out loss)."""
    from batchpilot.plan.schedule_advice import ShortRun

    short = [r for r in records if r["tokens"] <= SHORT_FRACTION * SCHEDULE_TOKENS]
    evals = [r for r in short if r.get("val_loss") is not None and r["step"] >= 10]  # the EMA needs ~10 steps
    return ShortRun(tokens=[r["tokens"] for r in evals], losses=[r["val_loss"] for r in evals],
                    b_simple=[r.get("b_simple") or math.nan for r in evals], batch_sequences=SCHEDULE_BASE,
                    seq_len=SEQ_LEN, lr=_deepseek_lr(SCHEDULE_BASE))


def schedule_part() -> dict[str, Any]:
    """Fixed-16 run; its first 15% → advice; the advice's schedule and its last batch run to the predicted loss."""
    from batchpilot.plan.priors import deepseek_flops_per_token
    from batchpilot.plan.schedule_advice import advise_schedule

    cluster = cluster_model()
    budget = int(1.25 * SCHEDULE_TOKENS)
    out: dict[str, Any] = {"_cluster": cluster, "_setup": {"train_tokens": SCHEDULE_TOKENS, "short_fraction": SHORT_FRACTION,
                                                           "base_batch": SCHEDULE_BASE}}
    with tempfile.TemporaryDirectory(prefix="bp-schedule-") as tmp:
        base = _base(Path(tmp) / "base", global_batch_sequences=SCHEDULE_BASE).replace(
            optim={"lr": _deepseek_lr(SCHEDULE_BASE)}, run={"tokens": budget})
        records = _run_to_target(base, cluster, adaptive=False, target=-math.inf)
        m = deepseek_flops_per_token(num_layers=4, hidden_size=128, seq_len=SEQ_LEN)
        advice = advise_schedule(_short_run(records), train_tokens=SCHEDULE_TOKENS, multiple=MICRO, max_batch=256,
                                 model_flops_per_token=m)
        print(f"advice: {advice.schedule}, lr {advice.lr_first:.3g}, target {advice.target_loss:.3f}", flush=True)
        out["advice"] = _advice_json(advice)
        final = advice.stages[-1][1]
        runs = {f"fixed-{SCHEDULE_BASE}": records,
                "schedule": _run_to_target(_base(Path(tmp) / "sched", global_batch_sequences=final,
                                                 batch_schedule=advice.schedule).replace(
                    optim={"lr": advice.lr_first}, run={"tokens": budget}), cluster, adaptive=False,
                    target=advice.target_loss),
                f"fixed-{final}": _run_to_target(_base(Path(tmp) / "final", global_batch_sequences=final).replace(
                    optim={"lr": _deepseek_lr(final)}, run={"tokens": budget}), cluster, adaptive=False,
                    target=advice.target_loss)}
    for name, recs in runs.items():
        vals = [r for r in recs if r.get("val_loss") is not None]
        at_total = next((r["val_loss"] for r in vals if r["tokens"] >= SCHEDULE_TOKENS), None)
        out[name] = {"reached": time_to_target(recs, advice.target_loss), "val_loss_at_train_tokens": at_total,
                     "trajectory": [{k: r.get(k) for k in ("step", "tokens", "cpu_s", "cluster_s", "loss", "val_loss",
                                                           "global_batch_sequences", "lr", "b_simple")} for r in recs]}
        print(f"{name}: {out[name]['reached']}", flush=True)
    return out


def _advice_json(advice: Any) -> dict[str, Any]:
    nf, lf = advice.noise_fit, advice.loss_fit
    return {"schedule": advice.schedule, "lr_first": advice.lr_first, "lr_by_batch": advice.lr_by_batch,
            "lr_anchor": advice.lr_anchor, "target_loss": advice.target_loss, "target_band": advice.target_band,
            "extrapolation": advice.extrapolation,
            "noise_fit": {"b_star": nf.b_star, "alpha_b": nf.alpha_b, "rms_log_error": nf.rms_log_error,
                          "loss_range": nf.loss_range, "points": nf.points},
            "loss_fit": {"a": lf.a, "alpha": lf.alpha, "rms_error": lf.rms_error, "tokens_range": lf.tokens_range},
            "costs": [{"name": c.name, "steps": c.steps, "tokens": c.tokens, "final_batch": c.final_batch}
                      for c in advice.costs]}


def schedule_table(data: dict[str, Any]) -> str:
    a, c = data["advice"], data["_cluster"]
    lines = [f"Short measurement: the first {SHORT_FRACTION:.0%} of a fixed-{SCHEDULE_BASE} run (held-out loss, B_simple "
             f"EMA). Whole run: {SCHEDULE_TOKENS:,} tokens. Fits: B_simple(L) = {a['noise_fit']['b_star']:.3g}·"
             f"L^(−1/{a['noise_fit']['alpha_b']:.3g}) (rms {a['noise_fit']['rms_log_error']:.2f} in log B, losses "
             f"{a['noise_fit']['loss_range'][0]:.2f}–{a['noise_fit']['loss_range'][1]:.2f}); L(D) = "
             f"{a['loss_fit']['a']:.3g}·D^−{a['loss_fit']['alpha']:.3f}.", "",
             f"Advice: `--batch-schedule {a['schedule']} --lr {a['lr_first']:.3g} --lr-scaling sqrt` "
             f"({a['lr_anchor']}); predicted loss at {SCHEDULE_TOKENS:,} tokens of fixed-{SCHEDULE_BASE}: "
             f"{a['target_loss']:.3f} (band {a['target_band'][0]:.3f}–{a['target_band'][1]:.3f}); "
             f"extrapolation: {a['extrapolation']}.", "",
             "| run | predicted steps | predicted tokens | measured steps to the predicted loss | measured tokens | "
             "simulated cluster (s) | held-out loss at the whole run's tokens |", "|---|---|---|---|---|---|---|"]
    predicted = {x["name"]: x for x in a["costs"]}
    for name, r in ((k, v) for k, v in data.items() if not k.startswith("_") and k != "advice"):
        p, hit = predicted.get(name, {}), r["reached"]
        measured = (f"{hit['steps']:.0f} | {hit['tokens']:,.0f} | {hit['cluster_s']:.1f}" if hit
                    else "not reached | — | —")
        lines.append(f"| {name} | {_num(p.get('steps'))} | {_num(p.get('tokens'), ',.0f')} | {measured} | "
                     f"{_num(r['val_loss_at_train_tokens'], '.3f')} |")
    lines.append(f"\nRuns stop {STOP_MARGIN} below the predicted loss, so only fixed-{SCHEDULE_BASE} (the measurement's "
                 f"run) reaches the whole run's tokens. Cluster model as in the race ({c['micro_s'] * 1e3:.1f} ms per "
                 "8-sequence micro-batch).")
    lines += ["", schedule_verdict(data)]
    return "\n".join(lines) + "\n"


def schedule_verdict(data: dict[str, Any]) -> str:
    """The prediction (loss at the whole run's tokens) and the race (schedule against the fixed batches)."""
    a = data["advice"]
    base = data.get(f"fixed-{SCHEDULE_BASE}", {})
    out = []
    if base.get("val_loss_at_train_tokens") is not None and base.get("reached"):
        lo, hi = a["target_band"]
        inside = lo <= base["val_loss_at_train_tokens"] <= hi
        out.append(f"Prediction: fixed-{SCHEDULE_BASE} reached the predicted loss {a['target_loss']:.3f} after "
                   f"{base['reached']['tokens']:,.0f} tokens ({base['reached']['tokens'] / SCHEDULE_TOKENS:.2f}× the "
                   f"{SCHEDULE_TOKENS:,} predicted) and stood at {base['val_loss_at_train_tokens']:.3f} at "
                   f"{SCHEDULE_TOKENS:,} tokens, {'inside' if inside else 'outside'} the predicted band.")
    fixed = {n: r["reached"] for n, r in data.items() if n.startswith("fixed") and r.get("reached")}
    sched = data.get("schedule", {}).get("reached")
    if not fixed or sched is None:
        out.append("Race: no verdict (the schedule or every fixed batch missed the predicted loss).")
        return " ".join(out)
    best_name, best = min(fixed.items(), key=lambda kv: kv[1]["cluster_s"])
    time_ratio = sched["cluster_s"] / best["cluster_s"]
    tokens = ", ".join(f"{sched['tokens'] / r['tokens']:.2f}× {n}'s" for n, r in fixed.items())
    ran = sorted({t["global_batch_sequences"] for t in data["schedule"]["trajectory"]})
    stages = [b for _, b in (x.split("=") for x in a["schedule"].removeprefix("steps:").split(","))]
    out.append(f"Race to the predicted loss: the schedule took {time_ratio:.2f}× the simulated cluster time of the "
               f"fastest fixed batch ({best_name}) with {tokens} tokens — it "
               f"{'beat' if time_ratio < 1 else 'did not beat'} the fixed batches on time (batches run: "
               f"{', '.join(map(str, ran))} of the schedule's {', '.join(stages)}).")
    return " ".join(out)


def _num(x: Any, spec: str = ".0f") -> str:
    return "—" if x is None else format(x, spec)


def seeds(k: int = 30) -> dict[str, Any]:
    out = {}
    for seed in (0, 1):
        record = measure_noise(NoiseRunSettings(seq_len=SEQ_LEN, micro_batch_sequences=MICRO,
                                                global_batch_sequences=4 * MICRO, steps=k, seed=seed, lr=LR,
                                                threads=THREADS)).to_dict()
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


def _runs(results: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in results.items() if not k.startswith("_")}


def growth_table(results: dict[str, Any]) -> str:
    """B_simple (EMA, β = 0.95) against the training loss along each run: does it grow as the loss falls?"""
    lines = ["| run | step | train loss | val loss | B_simple (seq) | 95% band |", "|---|---|---|---|---|---|"]
    for name, r in _runs(results).items():
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
    c = results["_cluster"]
    lines = [f"Target validation loss {TARGET_LOSS} (nats/byte), tiny-llama-1m, stdlib, seq {SEQ_LEN}, micro {MICRO}, "
             f"torch {torch.__version__}, {THREADS} thread on a shared 2-core machine. Simulated cluster: "
             f"{c['ranks']} ranks × micro-batch {c['micro_batch']}; step = ceil(B/{c['ranks'] * c['micro_batch']}) × "
             f"{c['micro_s'] * 1e3:.1f} ms (one 8-sequence forward+backward here, CPU time) + "
             f"{c['optimizer_s'] * 1e3:.1f} ms (AdamW step) + {c['all_reduce_s'] * 1e3:.2f} ms (all-reduce of "
             f"{4 * c['params'] / 1e6:.1f} MB, {c['network']}).", "",
             "| run | LR | optimizer steps | tokens | wall-clock here (s) | CPU time here (s) | simulated cluster (s) "
             "| final val loss |", "|---|---|---|---|---|---|---|---|"]
    for name, r in _runs(results).items():
        hit = r["reached"]
        if hit is None:
            lines.append(f"| {name} | {r['lr']:.2g} | not reached | — | — | — | — | {r['final_val_loss']:.3f} |")
        else:
            lines.append(f"| {name} | {r['lr']:.2g} | {hit['steps']:.1f} | {hit['tokens']:,.0f} | {hit['wall_s']:.1f} | "
                         f"{hit['cpu_s']:.1f} | {hit['cluster_s']:.1f} | {r['final_val_loss']:.3f} |")
    lines += ["", verdict(results), "", _growth_note(results)]
    return "\n".join(lines) + "\n"


def verdict(results: dict[str, Any]) -> str:
    """The acceptance question: adaptive's simulated cluster time and tokens against the best fixed batch's."""
    runs = _runs(results)
    fixed = {n: r["reached"] for n, r in runs.items() if n.startswith("fixed") and r["reached"]}
    adaptive = next((r["reached"] for n, r in runs.items() if n.startswith("adaptive")), None)
    if not fixed or adaptive is None:
        return "No verdict: the adaptive run or every fixed run missed the target."
    best_name, best = min(fixed.items(), key=lambda kv: kv[1]["cluster_s"])
    time_ratio, token_ratio = adaptive["cluster_s"] / best["cluster_s"], adaptive["tokens"] / best["tokens"]
    ok = time_ratio <= 0.8 and token_ratio <= 1.2
    return (f"Adaptive vs the fastest fixed batch on the simulated cluster ({best_name}): {time_ratio:.2f}× its "
            f"cluster time with {token_ratio:.2f}× its tokens — the goal (≤ 0.8× time, ≤ 1.2× tokens) is "
            f"{'met' if ok else 'not met'}.")


def _growth_note(results: dict[str, Any]) -> str:
    adaptive = next((r for n, r in _runs(results).items() if n.startswith("adaptive")), None)
    if adaptive is None:
        return ""
    grows = [t for t in adaptive["trajectory"] if str(t.get("batch_decision", "")).startswith("grow")]
    changes = ", ".join(f"{t['batch_decision'].split(':')[1]} at step {t['step']}" for t in grows) or "none"
    return f"Adaptive growth decisions (band lower bound above the batch): {changes}."


def race_plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    (ax1, ax2), (ax3, ax4) = axes
    for name, r in _runs(results).items():
        traj = r["trajectory"]
        evals = [t for t in traj if t["val_loss"] is not None]
        ax1.plot([t["cluster_s"] for t in evals], [t["val_loss"] for t in evals], label=name)
        ax2.plot([t["tokens"] for t in evals], [t["val_loss"] for t in evals], label=name)
        ax3.plot([t["tokens"] for t in traj], [t["global_batch_sequences"] for t in traj], label=name)
        noise = [t for t in traj if t.get("b_simple") is not None and math.isfinite(t["b_simple"])]
        ax4.plot([t["loss"] for t in noise], [t["b_simple"] for t in noise], ".", markersize=3, label=name)
    for ax in (ax1, ax2):
        ax.axhline(TARGET_LOSS, color="grey", linestyle="--", linewidth=1)
        ax.set(ylabel="validation loss (nats/byte)", ylim=(TARGET_LOSS - 0.3, 4.0))
    ax1.set(xlabel="simulated cluster time (s): 8 ranks × micro-batch 8")
    ax2.set(xlabel="tokens", xscale="log")
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
    if "tables" in parts:  # re-render the race's and the schedule's tables and the plot from the JSON
        data = _load()
        _write("noise_adaptive", data, full_table(data))
        race_plot(data, RESULTS / "noise_adaptive.png")
    if "schedule" in parts:  # added to the race's JSON under "_schedule" (the race results are kept)
        schedule = schedule_part()
        data = {**_load(), "_schedule": schedule}
        _write("noise_adaptive", data, "")  # the measurement is on disk before anything is rendered
        _write("noise_adaptive", data, full_table(data))
        print(schedule_table(schedule))
    if "race" in parts:
        old = _load()
        data = {**race(), **({"_schedule": old["_schedule"]} if "_schedule" in old else {})}
        _write("noise_adaptive", data, full_table(data))
        race_plot(data, RESULTS / "noise_adaptive.png")
        print(race_table(data))
    return 0


def _load() -> dict[str, Any]:
    path = RESULTS / "noise_adaptive.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def full_table(data: dict[str, Any]) -> str:
    """noise_adaptive.md: the race (if measured), its B_simple growth table, then the whole-run schedule."""
    parts = [race_table(data) + "\n" + growth_table(data)] if "_cluster" in data else []
    if "_schedule" in data:
        parts.append("## Whole-run schedule, validated\n\n" + schedule_table(data["_schedule"]))
    return "\n".join(parts)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
