"""The critical batch measured directly, against B_simple, at three points of one run (CPU).

Examples::

    .venv/bin/python -m benchmarks.critical_batch --quick --out /tmp/cb-quick   # the pipeline, ~1 min
    nohup .venv/bin/python -m benchmarks.critical_batch > critical_batch.log &  # the measurement (~1–2 h)
    .venv/bin/python -m benchmarks.critical_batch --tables                      # md + png from the JSON

What it does (the default CPU task: tiny-llama-1m, byte tokens, the Python standard library's sources):

1. **Base run** at batch B₀ with AdamW at constant LR η₀ (after a short warmup), checkpoints (model and
   optimizer states) at an early, a middle and a late step, the held-out loss every few steps.
2. **B_simple at each checkpoint**, with the parameters frozen: the runner's own step with
   :class:`~batchpilot.train.adaptive.NoiseScaleHook` (plain mean over K steps, β = 1) at an LR of 1e-30,
   so every step measures the same parameters (McCandlish et al. 2018, App. A.1). The base run's own
   running estimate (EMA β = 0.95, as ``batchpilot train`` logs it) is reported beside it.
3. **The sweep**: from each checkpoint, at ≥ 6 global batch sizes B (powers of two), train until the
   held-out loss reaches a fixed target — the loss the base run itself reached some steps later — and
   record the optimizer steps S and examples E = B·S at the crossing (linear interpolation between
   evaluations on a geometric grid of examples; the checkpoint's own loss at E = 0 starts the curve).
   Learning rate per batch: the square-root rule for Adam (Malladi et al. 2022, "On the SDEs and Scaling
   Rules for Adaptive Gradient Algorithms"), η(B) = η₀·√(B/B₀), capped at ``lr_cap``; the optimizer state
   continues from the checkpoint (what a batch change inside a run does), no new warmup. Each batch runs
   with ``seeds`` data orders (seed 0 continues the base run's data; others read the same stream
   position of another permutation) and S is their mean.
4. **Fit** S(B) = S_min + E_min/B ⇔ (S/S_min − 1)(E/E_min − 1) = 1 (McCandlish et al. 2018, Eq. 2.11,
   :func:`batchpilot.estimate.critical_batch.fit_tradeoff`), B_crit = E_min/S_min with a bootstrap band.
5. **LR check** (full mode): at the middle checkpoint, the smallest, base and largest batch at 0.5× and
   2× the rule's LR, to show how far the rule is from the best of three.
6. **Generalisation**: the held-out loss of every batch at equal examples (the smallest batch's crossing),
   and the held-out minus the training loss there (training loss: mean of the per-step losses over the
   last ≥ 64 sequences; every row is fresh, so this is the train/held-out distribution gap per batch); and
   (:func:`generalisation_check`, alone with ``--generalisation``) batches 4, 16 and 64 trained from the middle
   checkpoint on the same rows to equal examples: the loss on rows they trained on, on training rows none
   reached and on the held-out rows, with a one-line verdict (:func:`generalisation_verdict`).

Results: ``benchmarks/results/critical_batch.{json,md,png}`` (``--out`` elsewhere). Wall-clock times are
those of a shared 2-core machine; the science is in steps and examples, which do not depend on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from batchpilot.estimate.critical_batch import TradeoffPoint, fit_tradeoff
from batchpilot.measure.step import forward_loss, model_inputs
from batchpilot.train.adaptive import NoiseScaleHook
from batchpilot.train.batching import MicroBatchPlan, collate
from batchpilot.train.config import TrainConfig
from batchpilot.train.distributed import DistEnv, init_distributed, unwrap
from batchpilot.train.loop import Trainer, TrainState
from batchpilot.train.schedule import ConstantSchedule

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True, kw_only=True, slots=True)
class Setup:
    """Everything the measurement depends on (recorded in the JSON)."""

    model: str = "tiny-llama-1m"
    seq_len: int = 128
    base_batch: int = 16
    """B₀: batch of the base run and the LR rule's reference."""
    base_micro: int = 4
    base_lr: float = 3e-3
    """η₀ at B₀ (constant after ``warmup_steps``)."""
    warmup_steps: int = 10
    checkpoints: tuple[int, ...] = (40, 120, 400)
    """Base-run steps of the early, middle and late checkpoints."""
    target_after: tuple[int, ...] = (30, 60, 120)
    """The target of checkpoint k is the base run's held-out loss ``target_after[k]`` steps later."""
    batches: tuple[tuple[int, ...], ...] = ((1, 2, 4, 8, 16, 32, 64), (2, 4, 8, 16, 32, 64, 128),
                                            (4, 8, 16, 32, 64, 128, 256))
    """Global batches (sequences) swept at each checkpoint: powers of two from about B_simple/8 to 8·B_simple
    (B_simple from a pilot of this run: ≈ 3, 11 and 33 sequences at steps 40, 120 and 400)."""
    micro_max: int = 8
    """Micro-batch = min(B, this)."""
    lr_cap: float = 1.2e-2
    """Upper bound of the square-root rule's LR (4 × η₀, reached at B = 16·B₀); the LR check measures the rule
    against 0.5× and 2× its LR."""
    seeds: int = 2
    val_rows: int = 128
    """Held-out rows (fixed set) of every evaluation."""
    eval_ratio: float = 1.08
    """Evaluations on a geometric grid of examples: the next at ≥ this × the current count."""
    cap_factor: float = 3.0
    """A run stops unreached after cap × the base run's steps (below B₀) or examples (above B₀)."""
    noise_steps: int = 24
    """K frozen-parameter steps of the B_simple measurement."""
    noise_micro: int = 4
    noise_batch: int = 64
    curve_every: int = 10
    """Base run: held-out loss every this many steps (the loss curve)."""
    lr_check: bool = True
    generalisation_batches: tuple[int, ...] = (4, 16, 64)
    """Batches of the generalisation check at the middle checkpoint (equal examples, same rows)."""
    generalisation_examples: int = 4096
    threads: int = 1
    seed: int = 0

    def lr(self, batch: int) -> float:
        """η(B) = min(η₀·√(B/B₀), cap) — the square-root rule for Adam (Malladi et al. 2022)."""
        return min(self.base_lr * math.sqrt(batch / self.base_batch), self.lr_cap)


QUICK = Setup(seq_len=64, base_batch=8, checkpoints=(20, 40, 80), target_after=(15, 20, 30),
              batches=((1, 2, 4, 8, 16, 32),) * 3, seeds=1, val_rows=32, noise_steps=8, noise_batch=32,
              curve_every=10, lr_check=False, lr_cap=6e-3, cap_factor=4.0, generalisation_batches=(2, 16),
              generalisation_examples=64)
"""The pipeline end to end in about a minute (the slow test); numbers too small to mean much."""


# ---------------------------------------------------------------------------------------- trainers
class Bench:
    """Trainers of one configuration, reused across runs: the batch, LR, data order and weights are set
    per run through the trainer's schedule, LR schedule, row stream and state (the step is the runner's)."""

    def __init__(self, setup: Setup, work: Path) -> None:
        self.setup, self.work = setup, work
        self.env: DistEnv = init_distributed(expected_world_size=None, device="cpu")
        self._trainers: dict[tuple[int, int], Trainer] = {}

    def config(self, *, batch: int, micro: int, lr: float, seed: int, name: str) -> TrainConfig:
        s = self.setup
        return TrainConfig().replace(
            model={"model": s.model}, data={"data": "stdlib", "seq_len": s.seq_len},
            batch={"global_batch_sequences": batch, "micro_batch_sequences": micro},
            optim={"lr": lr, "warmup_steps": 0, "decay": "constant"},
            run={"steps": 1, "out": str(self.work / name), "threads": s.threads, "val_rows": s.val_rows,
                 "seed": seed, "noise_every": 0, "checkpoint_every": 0, "final_checkpoint": False})

    def trainer(self, micro: int, seed: int) -> Trainer:
        key = (micro, seed)
        if key not in self._trainers:
            cfg = self.config(batch=micro, micro=micro, lr=self.setup.base_lr, seed=seed, name=f"m{micro}-s{seed}")
            self._trainers[key] = Trainer(cfg, self.env)
        return self._trainers[key]

    def prepare(self, trainer: Trainer, *, batch: int, lr: float, state: dict[str, Any]) -> None:
        """Point ``trainer`` at a run: batch, constant LR, weights and optimizer state, data position."""
        trainer.schedule = ConstantSchedule(global_batch_sequences=batch)
        trainer.lr = dataclasses.replace(trainer.lr, peak_lr=lr, warmup_steps=0, decay="constant",
                                         reference_batch_sequences=batch)
        unwrap(trainer.model).load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.state = TrainState(sequences_seen=int(state["sequences_seen"]))


def val_loss(trainer: Trainer, rows_per_forward: int = 32) -> float:
    """Token-mean loss on the trainer's fixed held-out rows, in forwards of ``rows_per_forward`` rows (the
    runner's ``evaluate`` batches by the micro-batch, one row at a time for B = 1)."""
    model, rows, seq = unwrap(trainer.model), trainer.val_rows, trainer.config.data.seq_len
    assert trainer.val_corpus is not None
    total = count = 0.0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), rows_per_forward):
            mb = collate(MicroBatchPlan(rows=tuple(rows[start:start + rows_per_forward]), pad_to=seq),
                         trainer.val_corpus.tokens, mode="fixed")
            total += float(forward_loss(model, model_inputs(mb.input_ids), mb.targets, precision="fp32"))
            count += mb.num_targets
    model.train()
    return total / count


def _snapshot(trainer: Trainer) -> dict[str, Any]:
    return {"model": {k: v.detach().clone() for k, v in unwrap(trainer.model).state_dict().items()},
            "optimizer": _clone(trainer.optimizer.state_dict()), "sequences_seen": trainer.state.sequences_seen,
            "tokens_seen": trainer.state.tokens_seen}


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------- base run
def base_run(bench: Bench) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
    """Train B₀ to the last target step; returns the checkpoint states and the run's curve."""
    s = bench.setup
    hook = NoiseScaleHook(ema_decay=0.95)
    cfg = bench.config(batch=s.base_batch, micro=s.base_micro, lr=s.base_lr, seed=s.seed, name="base")
    cfg = cfg.replace(optim={"warmup_steps": s.warmup_steps})
    trainer = Trainer(cfg, bench.env, hooks=[hook])
    wanted = set(s.checkpoints) | {c + d for c, d in zip(s.checkpoints, s.target_after, strict=True)}
    last, states, start = max(wanted), {}, time.perf_counter()
    curve: list[dict[str, Any]] = []
    curve.append({"step": 0, "tokens": 0, "val_loss": val_loss(trainer), "b_simple_ema": None})
    for step in range(1, last + 1):
        record = trainer.train_step()
        if step in wanted or step % s.curve_every == 0:
            curve.append({"step": step, "tokens": record["tokens"], "loss": record["loss"],
                          "val_loss": val_loss(trainer), "b_simple_ema": record.get("b_simple"),
                          "b_simple_ema_band": [record.get("b_simple_lo"), record.get("b_simple_hi")]})
        if step in s.checkpoints:
            states[step] = _snapshot(trainer)
    print(f"base run: {last} steps in {time.perf_counter() - start:.0f} s", flush=True)
    return states, {"curve": curve, "seconds": time.perf_counter() - start}


def frozen_b_simple(bench: Bench, state: dict[str, Any]) -> dict[str, Any]:
    """B_simple with the parameters fixed (LR 1e-30): K runner steps with the noise hook, plain mean."""
    s = bench.setup
    hook = NoiseScaleHook(ema_decay=1.0)
    cfg = bench.config(batch=s.noise_batch, micro=s.noise_micro, lr=1e-30, seed=s.seed + 101, name="noise")
    trainer = Trainer(cfg, bench.env, hooks=[hook])
    bench.prepare(trainer, batch=s.noise_batch, lr=1e-30, state=state)
    for _ in range(s.noise_steps):
        trainer.train_step()
    est = hook.last
    assert est is not None
    return {"b_simple": est.b_simple_sequences, "band": list(est.band_sequences), "steps": est.steps,
            "b_small": s.noise_micro, "b_big": s.noise_batch}


# ---------------------------------------------------------------------------------------- one sweep run
@dataclass(kw_only=True, slots=True)
class RunTrace:
    """One sweep run: the held-out curve against examples, and the per-step training losses."""

    batch: int
    seed: int
    lr: float
    evals: list[tuple[float, float]] = field(default_factory=list)
    """(examples, held-out loss), starting at (0, the checkpoint's loss)."""
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def crossing(self, target: float) -> float | None:
        """Examples at the first crossing of ``target`` (linear between evaluations); None if never."""
        for (e0, l0), (e1, l1) in zip(self.evals, self.evals[1:], strict=False):
            if l1 <= target < l0:
                return e0 + (l0 - target) / (l0 - l1) * (e1 - e0)
        return None

    def val_at(self, examples: float) -> float | None:
        for (e0, l0), (e1, l1) in zip(self.evals, self.evals[1:], strict=False):
            if e0 <= examples <= e1:
                return l0 + (examples - e0) / (e1 - e0) * (l1 - l0)
        return None

    def train_loss_at(self, examples: float, window: int = 64) -> float:
        """Mean per-step training loss over the last ≥ ``window`` sequences before ``examples``."""
        last = max(1, min(len(self.losses), math.ceil(examples / self.batch)))
        count = max(1, math.ceil(window / self.batch))
        part = self.losses[max(0, last - count):last]
        return sum(part) / len(part)


def sweep_run(bench: Bench, state: dict[str, Any], *, batch: int, seed: int, lr: float, start_loss: float,
              target: float, base_steps: int) -> RunTrace:
    """From ``state``, train at ``batch`` until the held-out loss is below ``target`` (or the cap)."""
    s = bench.setup
    trainer = bench.trainer(min(batch, s.micro_max), seed)  # its row stream is seed ``seed``'s permutation
    bench.prepare(trainer, batch=batch, lr=lr, state=state)
    trace, start = RunTrace(batch=batch, seed=seed, lr=lr, evals=[(0.0, start_loss)]), time.perf_counter()
    base_examples = base_steps * s.base_batch
    max_steps = s.cap_factor * base_steps * max(1.0, s.base_batch / batch)
    max_examples = s.cap_factor * base_examples * max(1.0, batch / s.base_batch)
    next_eval, step = max(float(batch), base_examples / 16), 0
    while step < max_steps and step * batch < max_examples:
        record = trainer.train_step()
        step += 1
        trace.losses.append(record["loss"] if math.isfinite(record["loss"]) else math.inf)
        if step * batch >= next_eval:
            trace.evals.append((float(step * batch), val_loss(trainer)))
            next_eval = max(step * batch * s.eval_ratio, step * batch + batch)
            if trace.evals[-1][1] <= target or not math.isfinite(trace.evals[-1][1]):
                break
    trace.seconds = time.perf_counter() - start
    return trace


# ---------------------------------------------------------------------------------------- one checkpoint
def sweep_checkpoint(bench: Bench, k: int, state: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    s = bench.setup
    step, after = s.checkpoints[k], s.target_after[k]
    by_step = {p["step"]: p for p in base["curve"]}
    start_loss, target = by_step[step]["val_loss"], by_step[step + after]["val_loss"]
    noise = frozen_b_simple(bench, state)
    print(f"checkpoint {step}: loss {start_loss:.3f} → target {target:.3f}, frozen B_simple "
          f"{noise['b_simple']:.2f} {noise['band']}", flush=True)
    traces = [sweep_run(bench, state, batch=b, seed=r, lr=s.lr(b), start_loss=start_loss, target=target,
                        base_steps=after) for b in s.batches[k] for r in range(s.seeds)]
    points = _points(traces, target)
    fit = _fit(points)
    print(f"checkpoint {step}: B_crit fit {fit.get('b_crit')} band {fit.get('band')}", flush=True)
    return {"step": step, "loss": start_loss, "target_loss": target, "target_after_steps": after,
            "b_simple": noise["b_simple"], "b_simple_band": noise["band"], "b_simple_frozen": noise,
            "b_simple_ema_base_run": by_step[step]["b_simple_ema"], "b_crit_fit": fit.get("b_crit"), "fit": fit,
            "points": points, "runs": [_trace_json(t, target) for t in traces],
            "generalisation": _generalisation(traces, target)}


def _points(traces: list[RunTrace], target: float) -> list[dict[str, Any]]:
    """Per batch: mean steps and examples over the seeds that reached the target."""
    out = []
    for batch in sorted({t.batch for t in traces}):
        crossings = [t.crossing(target) for t in traces if t.batch == batch]
        reached = [c for c in crossings if c is not None]
        examples = sum(reached) / len(reached) if reached else None
        out.append({"batch": batch, "steps": examples / batch if examples else None, "examples": examples,
                    "seeds_reached": len(reached), "seeds": len(crossings),
                    "steps_per_seed": [None if c is None else c / batch for c in crossings]})
    return out


def _fit(points: list[dict[str, Any]]) -> dict[str, Any]:
    usable = [TradeoffPoint(batch=p["batch"], steps=p["steps"]) for p in points
              if p["steps"] is not None and p["seeds_reached"] == p["seeds"]]
    try:
        fit = fit_tradeoff(usable, bootstrap=400)
    except Exception as exc:  # the benchmark records a fit that failed instead of stopping
        return {"error": str(exc), "points_used": len(usable)}
    return {"b_crit": fit.b_crit, "s_min": fit.s_min, "e_min": fit.e_min, "band": list(fit.band),
            "rms_rel_error": fit.rms_rel_error, "points_used": fit.points}


def _trace_json(t: RunTrace, target: float) -> dict[str, Any]:
    crossing = t.crossing(target)
    return {"batch": t.batch, "seed": t.seed, "lr": t.lr, "reached": crossing is not None,
            "examples": crossing, "steps": None if crossing is None else crossing / t.batch,
            "steps_run": len(t.losses), "seconds": t.seconds, "evals": t.evals, "losses": t.losses}


def _generalisation(traces: list[RunTrace], target: float) -> dict[str, Any]:
    """Held-out loss at equal examples (the smallest batch's crossing) and held-out − training loss there."""
    crossings = [c for t in traces if (c := t.crossing(target)) is not None]
    if not crossings:
        return {}
    at = min(crossings)
    rows = []
    for batch in sorted({t.batch for t in traces}):
        runs = [t for t in traces if t.batch == batch]
        vals = [v for t in runs if (v := t.val_at(at)) is not None]
        train = [t.train_loss_at(at) for t in runs]
        rows.append({"batch": batch, "val_loss": sum(vals) / len(vals) if vals else None,
                     "train_loss": sum(train) / len(train),
                     "gap": (sum(vals) / len(vals) - sum(train) / len(train)) if vals else None})
    return {"examples": at, "rows": rows}


def lr_check(bench: Bench, state: dict[str, Any], sweep: dict[str, Any], batches: list[int]) -> list[dict[str, Any]]:
    """Steps to the same target at 0.5×, 1× and 2× the rule's LR (seed 0; 1× is the sweep's own run)."""
    s, out = bench.setup, []
    for batch in batches:
        own = next(r for r in sweep["runs"] if r["batch"] == batch and r["seed"] == 0)
        row: dict[str, Any] = {"batch": batch, "rule_lr": s.lr(batch), "steps_x1": own["steps"]}
        for mult in (0.5, 2.0):
            trace = sweep_run(bench, state, batch=batch, seed=0, lr=s.lr(batch) * mult, start_loss=sweep["loss"],
                              target=sweep["target_loss"], base_steps=sweep["target_after_steps"])
            crossing = trace.crossing(sweep["target_loss"])
            row[f"steps_x{mult:g}"] = None if crossing is None else crossing / batch
        out.append(row)
        print(f"lr check B={batch}: {row}", flush=True)
    return out


def rows_loss(trainer: Trainer, rows: list[Any], tokens: Any, rows_per_forward: int = 32) -> float:
    """Token-mean loss of ``trainer``'s model on ``rows`` of the ``tokens`` array (no gradient)."""
    model, seq = unwrap(trainer.model), trainer.config.data.seq_len
    total = count = 0.0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), rows_per_forward):
            mb = collate(MicroBatchPlan(rows=tuple(rows[start:start + rows_per_forward]), pad_to=seq), tokens, mode="fixed")
            total += float(forward_loss(model, model_inputs(mb.input_ids), mb.targets, precision="fp32"))
            count += mb.num_targets
    model.train()
    return total / count


def generalisation_check(bench: Bench, state: dict[str, Any], *, batches: tuple[int, ...], examples: int,
                         rows: int = 128) -> list[dict[str, Any]]:
    """From ``state``, train each batch on the same ``examples`` rows (seed 0 continues the data order, so every
    batch sees the same rows, in the same order) and measure three losses on fixed row sets: the first ``rows``
    rows every run trained on (*seen*), ``rows`` training rows none of them reached (*fresh*), and the held-out
    documents. seen < fresh is memorisation; held-out − fresh is the train/held-out distribution gap; a
    large-batch generalisation penalty would show as a larger fresh − seen or held-out − seen at equal examples."""
    s, out = bench.setup, []
    for batch in batches:
        trainer = bench.trainer(min(batch, s.micro_max), 0)
        bench.prepare(trainer, batch=batch, lr=s.lr(batch), state=state)
        start = int(state["sequences_seen"])
        seen = trainer.stream.rows(start, rows)
        fresh = trainer.stream.rows(start + examples + 10 * rows, rows)
        steps = -(-examples // batch)
        for _ in range(steps):
            trainer.train_step()
        assert trainer.val_corpus is not None
        losses = {"seen": rows_loss(trainer, seen, trainer.corpus.tokens),
                  "fresh": rows_loss(trainer, fresh, trainer.corpus.tokens), "held_out": val_loss(trainer)}
        out.append({"batch": batch, "lr": s.lr(batch), "steps": steps, "examples": steps * batch, **losses,
                    "fresh_minus_seen": losses["fresh"] - losses["seen"],
                    "held_out_minus_fresh": losses["held_out"] - losses["fresh"]})
        print(f"generalisation B={batch}: {out[-1]}", flush=True)
    return out


# ---------------------------------------------------------------------------------------- whole benchmark
def measure(setup: Setup, partial: Path | None = None) -> dict[str, Any]:
    """The whole measurement; with ``partial``, the results so far are written there after every checkpoint."""
    torch.set_num_threads(setup.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bp-critical-") as tmp:
        bench = Bench(setup, Path(tmp))
        states, base = base_run(bench)
        checkpoints: list[dict[str, Any]] = []
        for k, c in enumerate(setup.checkpoints):
            checkpoints.append(sweep_checkpoint(bench, k, states[c], base))
            if partial is not None:
                partial.write_text(json.dumps({"setup": dataclasses.asdict(setup), "base_run": base,
                                               "checkpoints": checkpoints}, indent=1) + "\n", encoding="utf-8")
        checks = []
        if setup.lr_check:
            mid = len(checkpoints) // 2
            b = setup.batches[mid]
            checks = lr_check(bench, states[setup.checkpoints[mid]], checkpoints[mid], [b[0], setup.base_batch, b[-1]])
        mid = len(checkpoints) // 2
        general = generalisation_check(bench, states[setup.checkpoints[mid]], batches=setup.generalisation_batches,
                                       examples=setup.generalisation_examples)
    return {"setup": dataclasses.asdict(setup), "torch": torch.__version__, "base_run": base,
            "checkpoints": checkpoints, "lr_check": checks, "generalisation": general,
            "seconds": time.perf_counter() - start}


def generalisation_only(setup: Setup) -> list[dict[str, Any]]:
    """The base run replayed to the middle checkpoint, then :func:`generalisation_check`."""
    torch.set_num_threads(setup.threads)
    mid = setup.checkpoints[len(setup.checkpoints) // 2]
    short = dataclasses.replace(setup, checkpoints=(mid,), target_after=(0,))
    with tempfile.TemporaryDirectory(prefix="bp-critical-") as tmp:
        bench = Bench(short, Path(tmp))
        states, _ = base_run(bench)
        return generalisation_check(bench, states[mid], batches=setup.generalisation_batches,
                                    examples=setup.generalisation_examples)


# ---------------------------------------------------------------------------------------- tables and plot
def _fmt(x: Any, spec: str = ".3g") -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def tables(data: dict[str, Any]) -> str:
    s = data["setup"]
    lines = [f"{s['model']}, stdlib, seq {s['seq_len']}, AdamW, base batch {s['base_batch']} at LR {s['base_lr']:g}; "
             f"sweep LR η(B) = min({s['base_lr']:g}·√(B/{s['base_batch']}), {s['lr_cap']:g}); {s['seeds']} data "
             f"order(s) per batch; torch {data['torch']}, {s['threads']} thread, shared 2-core machine, "
             f"{data['seconds'] / 60:.0f} min.", "",
             "| checkpoint (step) | held-out loss | target | B_simple (seq, frozen, 95% band) | B_simple EMA in the run "
             "| B_crit fit (seq, 5–95%) | B_crit / B_simple | fit rms error |", "|---|---|---|---|---|---|---|---|"]
    for c in data["checkpoints"]:
        fit, (lo, hi) = c["fit"], c["b_simple_band"]
        ratio = c["b_crit_fit"] / c["b_simple"] if c["b_crit_fit"] and c["b_simple"] else None
        band = fit.get("band") or [None, None]
        lines.append(f"| {c['step']} | {c['loss']:.3f} | {c['target_loss']:.3f} | {_fmt(c['b_simple'])} ({_fmt(lo)}–"
                     f"{_fmt(hi)}) | {_fmt(c['b_simple_ema_base_run'])} | {_fmt(c['b_crit_fit'])} ({_fmt(band[0])}–"
                     f"{_fmt(band[1])}) | {_fmt(ratio, '.2f')} | {_fmt(fit.get('rms_rel_error'), '.1%')} |")
    lines += ["", "Sweep points (mean over the data orders that reached the target; — = not reached within the cap):", "",
              "| checkpoint | batch | LR | steps S | examples E | reached |", "|---|---|---|---|---|---|"]
    for c in data["checkpoints"]:
        for p in c["points"]:
            lr = min(s["base_lr"] * math.sqrt(p["batch"] / s["base_batch"]), s["lr_cap"])
            lines.append(f"| {c['step']} | {p['batch']} | {lr:.2g} | {_fmt(p['steps'], '.1f')} | "
                         f"{_fmt(p['examples'], '.0f')} | {p['seeds_reached']}/{p['seeds']} |")
    lines += _lr_check_lines(data) + _generalisation_lines(data)
    return "\n".join(lines) + "\n"


def _lr_check_lines(data: dict[str, Any]) -> list[str]:
    if not data.get("lr_check"):
        return []
    lines = ["", "LR check at the middle checkpoint: steps to the target at 0.5×, 1× and 2× the rule's LR:", "",
             "| batch | rule LR | S at 0.5× | S at 1× | S at 2× |", "|---|---|---|---|---|"]
    for r in data["lr_check"]:
        lines.append(f"| {r['batch']} | {r['rule_lr']:.2g} | {_fmt(r['steps_x0.5'], '.1f')} | {_fmt(r['steps_x1'], '.1f')} "
                     f"| {_fmt(r['steps_x2'], '.1f')} |")
    return lines


def _generalisation_lines(data: dict[str, Any]) -> list[str]:
    lines = []
    if data.get("generalisation"):
        mid = data["setup"]["checkpoints"][len(data["setup"]["checkpoints"]) // 2]
        lines += ["", f"Generalisation check from the step-{mid} checkpoint: every batch trains on the same rows "
                  "(same order) to equal examples; losses on the first 128 rows all of them trained on (seen), on 128 "
                  "training rows none reached (fresh) and on the held-out rows:", "",
                  "| batch | LR | steps | examples | seen | fresh | held-out | fresh − seen | held-out − fresh |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in data["generalisation"]:
            lines.append(f"| {r['batch']} | {r['lr']:.2g} | {r['steps']} | {r['examples']} | {r['seen']:.4f} | "
                         f"{r['fresh']:.4f} | {r['held_out']:.4f} | {r['fresh_minus_seen']:+.4f} | "
                         f"{r['held_out_minus_fresh']:+.4f} |")
        lines += ["", generalisation_verdict(data["generalisation"])]
    lines += ["", "Held-out loss of every batch of the sweep at equal examples (the smallest batch's crossing), and "
              "held-out minus training loss there (training loss: mean of the per-step losses over the last ≥ 64 "
              "sequences, which spans more steps — so lags more — at small batches):", "",
             "| checkpoint | examples | batch | held-out loss | training loss | held-out − training |",
             "|---|---|---|---|---|---|"]
    for c in data["checkpoints"]:
        g = c.get("generalisation") or {}
        for r in g.get("rows", []):
            lines.append(f"| {c['step']} | {g['examples']:.0f} | {r['batch']} | {_fmt(r['val_loss'], '.4f')} | "
                         f"{r['train_loss']:.4f} | {_fmt(r['gap'], '+.4f')} |")
    return lines


def generalisation_verdict(rows: list[dict[str, Any]]) -> str:
    """One plain line on the generalisation check: the largest batch against the smallest at equal examples.

    Held-out loss at equal examples is the question; the gaps tell its cause: fresh − seen (training rows not
    trained on against those trained on, one distribution) and held-out − seen (= fresh − seen + held-out −
    fresh). The part of the loss difference that a wider gap explains is a generalisation penalty; the rest,
    a higher loss on every row set, is less progress for the same data (fewer optimizer steps)."""
    small, large = min(rows, key=lambda r: r["batch"]), max(rows, key=lambda r: r["batch"])
    lost = large["held_out"] - small["held_out"]
    memo = large["fresh_minus_seen"] - small["fresh_minus_seen"]
    wider = (large["held_out"] - large["seen"]) - (small["held_out"] - small["seen"])
    head = (f"At {large['examples']} examples, batch {large['batch']} ({large['steps']} steps) ends at held-out "
            f"{large['held_out']:.4f} against {small['held_out']:.4f} for batch {small['batch']} ({small['steps']} "
            f"steps), {lost:+.4f} nats")
    gaps = (f"fresh − seen {large['fresh_minus_seen']:+.4f} against {small['fresh_minus_seen']:+.4f} ({memo:+.4f}), "
            f"held-out − seen {wider:+.4f} wider at batch {large['batch']}")
    if abs(lost) < 0.01:
        return f"{head}: the larger batch lost nothing measurable at equal examples ({gaps})."
    if lost < 0:
        return f"{head}: the larger batch did better at equal examples ({gaps})."
    share = max(0.0, wider) / lost
    return (f"{head}: the larger batch lost at equal examples on this task. {gaps[0].upper()}{gaps[1:]}: a wider gap "
            f"explains {share:.0%} of the difference, the rest is less progress per example (fewer steps), not a "
            f"generalisation penalty.")


def plot(data: dict[str, Any], path: Path) -> None:
    """S against E per checkpoint (log–log), the fitted hyperbola, B_crit and B_simple marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    checkpoints = data["checkpoints"]
    fig, axes = plt.subplots(1, len(checkpoints), figsize=(5 * len(checkpoints), 4.5), squeeze=False)
    for ax, c in zip(axes[0], checkpoints, strict=True):
        pts = [p for p in c["points"] if p["steps"]]
        ax.loglog([p["examples"] for p in pts], [p["steps"] for p in pts], "o", label="measured")
        for p in pts:
            ax.annotate(str(p["batch"]), (p["examples"], p["steps"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        fit = c["fit"]
        if "b_crit" in fit:
            lo, hi = min(p["batch"] for p in c["points"]) / 2, max(p["batch"] for p in c["points"]) * 4
            bs = [lo * (hi / lo) ** (i / 100) for i in range(101)]
            ax.loglog([fit["e_min"] + fit["s_min"] * b for b in bs], [fit["s_min"] + fit["e_min"] / b for b in bs],
                      "-", color="grey", label=f"fit: B_crit = {fit['b_crit']:.3g}")
            _mark(ax, fit, fit["b_crit"], "s", "tab:red", "B_crit (fit)")
            if c["b_simple"] and math.isfinite(c["b_simple"]):
                _mark(ax, fit, c["b_simple"], "D", "tab:green", f"B_simple = {c['b_simple']:.3g}")
        ax.set(title=f"step {c['step']}: loss {c['loss']:.2f} → {c['target_loss']:.2f}", xlabel="examples E (sequences)",
               ylabel="optimizer steps S")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _mark(ax: Any, fit: dict[str, Any], batch: float, marker: str, color: str, label: str) -> None:
    ax.loglog([fit["e_min"] + fit["s_min"] * batch], [fit["s_min"] + fit["e_min"] / batch], marker, color=color,
              markersize=9, label=label)


def write(data: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "critical_batch.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    (out / "critical_batch.md").write_text(tables(data), encoding="utf-8")
    plot(data, out / "critical_batch.png")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small configuration (about a minute)")
    parser.add_argument("--tables", action="store_true", help="re-render md and png from the JSON in --out")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--seeds", type=int, default=None, help="data orders per batch (default: the setup's)")
    parser.add_argument("--generalisation", action="store_true",
                        help="only the generalisation check, added to the JSON in --out (the base run is replayed "
                             "to the middle checkpoint: deterministic on one thread)")
    args = parser.parse_args(argv)
    if args.generalisation:
        path = args.out / "critical_batch.json"
        data = json.loads(path.read_text(encoding="utf-8"))
        data["generalisation"] = generalisation_only(QUICK if args.quick else Setup())
        write(data, args.out)
        return 0
    if args.tables:
        write(json.loads((args.out / "critical_batch.json").read_text(encoding="utf-8")), args.out)
        return 0
    setup = QUICK if args.quick else Setup()
    if args.seeds:
        setup = dataclasses.replace(setup, seeds=args.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    data = measure(setup, partial=args.out / "critical_batch.partial.json")
    write(data, args.out)
    (args.out / "critical_batch.partial.json").unlink(missing_ok=True)
    print(tables(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
