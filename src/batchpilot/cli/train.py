"""``batchpilot train`` — run a batch plan: accumulation, mixed precision, dynamic batching, schedules.

Examples::

    batchpilot train                                    # ~2 min CPU demo: tiny-llama-1m on the stdlib source
    batchpilot train --global-batch 32 --micro-batch 8 --batching packed --steps 200 --out runs/packed
    batchpilot train --global-batch-tokens 64Ki --seq-len 512 --batch-schedule steps:0=32,2M=128
    batchpilot train --nproc 2 --fsdp --steps 20        # torchrun, 2 local processes (gloo on CPU)
    batchpilot train --nproc 4 --zero 3 --tp 2 --recompute op --compile   # FSDP2 × TP, per-op checkpointing
    torchrun --nnodes 2 --nproc-per-node 8 ... -m batchpilot.cli train --expect-world-size 16 ...
    batchpilot train --out runs/demo --resume           # continue exactly where the last checkpoint left off
    batchpilot tokenize --data corpus/ --tokenizer bpe:8192 --out tokens/   # pre-tokenized, memory-mapped
"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from batchpilot.cli._common import console, handle_errors, print_json
from batchpilot.cli._finetune import FinetuneOpt
from batchpilot.cli._options import (
    DEMO_MODEL,
    DEMO_SEQ_LEN,
    DataOpt,
    DeviceOpt,
    GlobalBatchTokensOpt,
    JsonOpt,
    SeedOpt,
    ThreadsOpt,
    TokenizerOpt,
    TrainModelOpt,
    choice,
    count,
    number,
    option,
    whole,
)
from batchpilot.cli._settings import (
    CompileOpt,
    RecomputeEveryOpt,
    ReshardOpt,
    StepPrecisionOpt,
    TpOpt,
    step_precision,
)
from batchpilot.errors import BatchpilotError
from batchpilot.specs.batch import sequences_from_tokens
from batchpilot.specs.settings import RECOMPUTES
from batchpilot.train.config import (
    BATCHING_MODES,
    DEFAULT_NOISE_EVERY,
    FP8_RECIPES,
    LOG_SINKS,
    LR_DECAYS,
    BatchConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
)
from batchpilot.units import format_bytes, format_count

_PANEL = "Run settings"
#: ``--zero`` and ``--recompute`` as everywhere (same values), with what the runner does with each.
TrainZeroOpt = Annotated[int, option(
    "--zero", whole("--zero"), help="0 = DDP; 2 = FSDP2 without resharding after forward (ZeRO-2); 3 = FSDP2 full "
    "sharding (ZeRO-3, as --fsdp). ZeRO-1 is not run (FSDP2 has no optimizer-only sharding).",
    rich_help_panel=_PANEL)]
TrainRecomputeOpt = Annotated[str, option(
    "--recompute", choice("--recompute", RECOMPUTES),
    help="Activation recomputation of the decoder layers, wrapped before FSDP2 as torchtitan does: op = "
         "torchtitan's per-op selective checkpointing (every second matmul recomputed), full = only each layer's "
         "input kept. selective (Megatron's attention core) is not run: under SDPA it keeps what none keeps.",
    rich_help_panel=_PANEL)]

#: The no-argument demo: small enough that the loss visibly falls within a couple of CPU minutes.
TRAIN_SEQ_LEN = 128
DEMO_GLOBAL_BATCH = 16
DEMO_STEPS = 30


def _global_batch(sequences: int | None, tokens: int | None, seq_len: int) -> int:
    if sequences is not None and tokens is not None:
        raise BatchpilotError("give --global-batch (sequences) or --global-batch-tokens, not both")
    if tokens is not None:
        return sequences_from_tokens(tokens, seq_len_tokens=seq_len)
    return sequences if sequences is not None else DEMO_GLOBAL_BATCH


def _duration(steps: int | None, tokens: int | None) -> tuple[int | None, int | None]:
    if steps is not None and tokens is not None:
        raise BatchpilotError("give --steps or --tokens, not both")
    if tokens is not None:
        return None, tokens
    return (steps if steps is not None else DEMO_STEPS), None


class _ProgressView:
    """A rich progress bar fed with each ``metrics.jsonl`` record: loss, tokens/s and the ETA."""

    def __init__(self, total: int, by_tokens: bool) -> None:
        self.by_tokens = by_tokens
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), TextColumn("{task.fields[where]}"),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
        )
        self.task = self.progress.add_task("train", total=total, where="", loss="—", speed="—")

    def __call__(self, record: dict[str, Any]) -> None:
        done = record["tokens"] if self.by_tokens else record["step"]
        where = f"step {record['step']}" + (f" · {format_count(record['tokens'])} tok" if self.by_tokens else "")
        loss = f"{record['loss']:.3f}" + (f" (val {record['val_loss']:.3f})" if record.get("val_loss") else "")
        self.progress.update(self.task, completed=done, where=where, loss=loss,
                             speed=format_count(record["tokens_per_s"]))


def _noise_row(noise: dict[str, Any] | None) -> str:
    """The last B_simple estimate, its 95% band and whether it is confident, or why there is none."""
    if not noise:
        return "—"
    b = noise.get("b_simple_sequences")
    if b is None:
        return str(noise.get("note") or "not measured")
    lo, hi = (noise.get("band") or {}).get("sequences") or (None, None)
    if lo is None:
        band = "no band yet"
    elif hi is None or not math.isfinite(hi):
        band = f"95% band {lo:.3g} – no upper bound yet"
    else:
        band = f"95% band {lo:.3g}–{hi:.3g}"
    confident = "confident" if noise.get("confident") else f"not yet confident, {noise.get('steps_measured', 0)} steps"
    return f"B_simple ≈ {b:.3g} sequences ({band}; {confident})"


def _render(summary: dict[str, Any]) -> None:
    table = Table("result", "value", title=f"batchpilot train → {summary['out']}")
    rows = [
        ("steps", str(summary["steps"])), ("tokens", format_count(summary["tokens"])),
        ("final loss", f"{summary['final_loss']:.4f}" if summary.get("final_loss") is not None else "—"),
        ("validation loss", f"{summary['val_loss']:.4f}" if summary.get("val_loss") is not None else "—"),
        ("tokens/s", format_count(summary["tokens_per_s"] or 0)),
        ("padding", f"{100 * (summary.get('padding_fraction') or 0):.1f}%"),
        ("peak memory", format_bytes(summary["peak_memory_bytes"])),
        ("model", f"{format_count(summary['model_params'])} params ({summary['model_source']})"),
        ("world size", f"{summary['world_size']} × {summary['device']}"),
        ("batch schedule", summary["batch_schedule"]),
        ("noise scale", _noise_row(summary.get("noise_scale"))),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def train(
    model: TrainModelOpt = DEMO_MODEL,
    data: DataOpt = "stdlib",
    tokenizer: TokenizerOpt = "bytes",
    text_field: Annotated[str, option("--text-field", help="Text field of JSONL/Parquet/datasets rows.")] = "text",
    seq_len: Annotated[int, option("--seq-len", count("--seq-len"), help=(
        f"Tokens per sequence ({TRAIN_SEQ_LEN}, not {DEMO_SEQ_LEN} as elsewhere, keeps the no-argument demo at "
        "about two CPU minutes)."))] = TRAIN_SEQ_LEN,
    global_batch: Annotated[int | None, option("--global-batch", count("--global-batch"), show_default=str(
        DEMO_GLOBAL_BATCH), help="Global batch in sequences (per optimizer step).")] = None,
    global_batch_tokens: GlobalBatchTokensOpt = None,
    micro_batch: Annotated[int | None, option("--micro-batch", count("--micro-batch"), show_default=(
        "the global batch / --nproc"), help="Sequences per micro-batch per data-parallel rank (--nproc / --tp of "
                                            "them; the default divides by that).")] = None,
    batching: Annotated[str, option("--batching", choice("--batching", BATCHING_MODES), help=(
        "How sequences fill a micro-batch."))] = "fixed",
    max_tokens_per_micro_batch: Annotated[int | None, option(
        "--max-tokens-per-micro-batch", count("--max-tokens-per-micro-batch"),
        help="Token-budget batching: padded tokens per micro-batch.")] = None,
    precision: StepPrecisionOpt = None,
    lr: Annotated[float, option("--lr", number("--lr"), help="Peak learning rate (at the first global batch).")] = 3e-3,
    warmup_steps: Annotated[int, option("--warmup-steps", whole("--warmup-steps"), help=(
        "Linear learning-rate warmup steps."))] = 10,
    lr_decay: Annotated[str, option("--lr-decay", choice("--lr-decay", LR_DECAYS), help=(
        "Learning-rate decay after the warmup; wsd = warmup-stable-decay (flat, then linear over the last "
        "--decay-ratio of the run)."))] = "cosine",
    decay_ratio: Annotated[float, option("--decay-ratio", number("--decay-ratio"), help=(
        "--lr-decay wsd: the share of the run spent decaying (Hägele et al. 2024: 0.2 matches cosine)."))] = 0.2,
    lr_scaling: Annotated[str | None, option("--lr-scaling", choice("--lr-scaling", ("none", "linear", "sqrt")),
                                             show_default="sqrt with an adaptive --batch-schedule, else none",
                                             help="Learning-rate rule applied when the global batch changes.")] = None,
    grad_clip: Annotated[float, option("--grad-clip", number("--grad-clip"), help=(
        "Max gradient norm (0: no clipping)."))] = 1.0,
    max_bad_steps: Annotated[int, option("--max-bad-steps", whole("--max-bad-steps"), help=(
        "Stop after this many consecutive steps skipped for a non-finite loss/gradient."))] = 5,
    weight_decay: Annotated[float, option("--weight-decay", number("--weight-decay"), help=(
        "AdamW weight decay (matrices only)."))] = 0.1,
    batch_schedule: Annotated[str, option("--batch-schedule", help=(
        "constant | ramp:start=S,increment=I,over=TOKENS | steps:0=B0,TOKENS=B1 | adaptive:… "
        "(…-tokens: batches in tokens)."))] = "constant",
    steps: Annotated[int | None, option("--steps", whole("--steps"), show_default=str(DEMO_STEPS),
                                        help="Optimizer steps.")] = None,
    tokens: Annotated[int | None, option("--tokens", count("--tokens"), help=(
        "Train on this many tokens instead of --steps (e.g. 10M)."))] = None,
    nproc: Annotated[int, option("--nproc", whole("--nproc"), help=(
        "Local processes (launches torchrun when > 1)."))] = 1,
    max_restarts: Annotated[int, option("--max-restarts", whole("--max-restarts"), help=(
        "torchrun elastic restarts of a failed run (launches torchrun); each restart resumes from the last "
        "checkpoint."))] = 0,
    fsdp: Annotated[bool, option("--fsdp", help="FSDP2 fully_shard instead of DDP (the same as --zero 3).")] = False,
    zero: TrainZeroOpt = 0,
    reshard_after_forward: ReshardOpt = "default",
    tp: TpOpt = 1,
    recompute: TrainRecomputeOpt = "none",
    recompute_every: RecomputeEveryOpt = 1,
    compile_blocks: CompileOpt = False,
    fp8_recipe: Annotated[str, option("--fp8-recipe", choice("--fp8-recipe", FP8_RECIPES), help=(
        "torchao float8 recipe of --precision fp8 (CUDA only)."), rich_help_panel=_PANEL)] = "tensorwise",
    async_checkpoint: Annotated[bool, option("--async-checkpoint", help=(
        "Write checkpoints in the background (torch.distributed.checkpoint.async_save); published when "
        "written."))] = False,
    export_hf: Annotated[bool, option("--export-hf", help=(
        "At the end, write the final model in the Hugging Face format to OUT/hf (config.json, "
        "model.safetensors, the tokenizer when it is a Hugging Face one)."))] = False,
    log_to: Annotated[str, option("--log", show_default="none: metrics.jsonl only", help=(
        f"Metrics sinks besides metrics.jsonl, comma-separated: {', '.join(LOG_SINKS)} (TensorBoard in OUT/tb; "
        "W&B offline in OUT/wandb, needs the wandb package)."))] = "",
    expect_world_size: Annotated[int | None, option("--expect-world-size", whole("--expect-world-size"), help=(
        "Fail unless the launcher started this many processes."))] = None,
    out: Annotated[str, option("--out", help="Output directory.")] = "runs/train",
    checkpoint_every: Annotated[int, option("--checkpoint-every", whole("--checkpoint-every"), help=(
        "Checkpoint every N steps (always at the end and on SIGTERM/SIGINT); 0: only then."))] = 0,
    resume: Annotated[bool, option("--resume", help="Continue from the latest checkpoint in --out.")] = False,
    seed: SeedOpt = 0,
    val_every: Annotated[int, option("--val-every", whole("--val-every"), help=(
        "Validation loss every N steps (always at the end); 0: only at the end."))] = 0,
    noise_every: Annotated[int | None, option("--noise-every", whole("--noise-every"), show_default=str(
        DEFAULT_NOISE_EVERY), help="Measure the gradient noise scale B_simple (critical batch) on one step in N; "
                                   "0: off.")] = None,
    no_noise: Annotated[bool, option("--no-noise", help=(
        "Do not measure the gradient noise scale (same as --noise-every 0)."))] = False,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    trust_remote_code: Annotated[bool, option("--trust-remote-code", help=(
        "Allow a local checkpoint's own modelling code."))] = False,
    finetune: FinetuneOpt = "full",
    json_output: JsonOpt = False,
) -> None:
    """Train a transformers causal LM with the chosen batch triad, batching, precision and schedule."""
    steps_n, tokens_n = _duration(steps, tokens)
    g = _global_batch(global_batch, global_batch_tokens, seq_len)
    from batchpilot.train.distributed import env_int

    world = max(1, expect_world_size or env_int("WORLD_SIZE", nproc))  # 0 or less: refused by RunConfig/launch
    dp = world // tp if tp >= 1 and world % tp == 0 else world  # data-parallel ranks (a bad --tp: refused later)
    config = TrainConfig(
        model=ModelConfig(model=model, trust_remote_code=trust_remote_code, finetune=finetune),
        data=DataConfig(data=data, tokenizer=tokenizer, text_field=text_field, seq_len=seq_len),
        batch=BatchConfig(global_batch_sequences=g, micro_batch_sequences=max(1, g // dp) if micro_batch is None else micro_batch,
                          batching=batching, max_tokens_per_micro_batch=max_tokens_per_micro_batch,  # type: ignore[arg-type]
                          batch_schedule=batch_schedule),
        optim=OptimConfig(lr=lr, warmup_steps=warmup_steps, decay=lr_decay, decay_ratio=decay_ratio,  # type: ignore[arg-type]
                          lr_scaling=_default_lr_scaling(lr_scaling, batch_schedule),  # type: ignore[arg-type]
                          grad_clip=grad_clip, weight_decay=weight_decay, precision=step_precision(precision, device),  # type: ignore[arg-type]
                          max_bad_steps=max_bad_steps),  # type: ignore[arg-type]
        run=RunConfig(steps=steps_n, tokens=tokens_n, out=out, checkpoint_every=checkpoint_every, resume=resume,
                      seed=seed, val_every=val_every, noise_every=_noise_every(noise_every, no_noise), nproc=nproc, max_restarts=max_restarts, fsdp=fsdp, expected_world_size=expect_world_size,
                      device=device, threads=threads, async_checkpoint=async_checkpoint,  # type: ignore[arg-type]
                      export_hf=export_hf, log_sinks=_sinks(log_to)),  # type: ignore[arg-type]
        parallel=ParallelConfig(zero_stage=zero, reshard_after_forward=reshard_after_forward.lower(),  # type: ignore[arg-type]
                                tp=tp, recompute=recompute.lower(), recompute_every=recompute_every,  # type: ignore[arg-type]
                                compile=compile_blocks, fp8_recipe=fp8_recipe.lower()),  # type: ignore[arg-type]
    )
    _run_and_report(config, json_output, world)


def _sinks(value: str) -> tuple[str, ...]:
    """``--log tensorboard,wandb`` → the sinks (each checked by RunConfig)."""
    return tuple(s.strip().lower() for s in value.split(",") if s.strip())


def _noise_every(noise_every: int | None, no_noise: bool) -> int:
    """--no-noise is --noise-every 0; both with another interval contradict each other."""
    if no_noise and noise_every not in (None, 0):
        raise BatchpilotError(f"give --no-noise or --noise-every {noise_every}, not both")
    return 0 if no_noise else DEFAULT_NOISE_EVERY if noise_every is None else noise_every


def _default_lr_scaling(lr_scaling: str | None, batch_schedule: str) -> str:
    """An explicit --lr-scaling wins; an adaptive schedule otherwise gets sqrt (Adam's rule, Malladi et al.
    2022); every other schedule keeps none."""
    if lr_scaling is not None:
        return lr_scaling
    return "sqrt" if batch_schedule.strip().lower().startswith("adaptive") else "none"


def _run_and_report(config: TrainConfig, json_output: bool, world: int) -> None:
    from batchpilot.train import run
    from batchpilot.train.checkpoint import check_fresh_start
    from batchpilot.train.validate import check_static

    is_main = os.environ.get("RANK", "0") == "0"
    if not json_output and is_main:
        check_static(config, world)  # bad input (e.g. --batch-schedule) fails before the progress bar starts
        check_fresh_start(Path(config.run.out), resume=config.run.resume)
    view = None if json_output or not is_main else _ProgressView(
        config.run.tokens or config.run.steps or 0, by_tokens=config.run.tokens is not None)
    if view is None:
        summary = run(config)
    else:
        with view.progress:
            summary = run(config, on_record=view)
    if not is_main:
        return
    if json_output:
        print_json(summary)
    else:
        _render(summary)
    stopped = summary.get("stopped_by_signal")
    if stopped:
        console.print(f"stopped by {stopped} at step {summary['steps']}; checkpoint saved — continue with --resume")
        raise typer.Exit(128 + int(getattr(signal, stopped, signal.SIGTERM)))


train_command = handle_errors(train)


def tokenize(
    data: DataOpt = "stdlib",
    tokenizer: TokenizerOpt = "bytes",
    text_field: Annotated[str, option("--text-field", help="Text field of JSONL/Parquet/datasets rows.")] = "text",
    val_fraction: Annotated[float, option("--val-fraction", number("--val-fraction"), help=(
        "Share of documents (by the sha256 of their key) held out for validation, as train splits them."))] = 0.02,
    out: Annotated[str, option("--out", help="Directory to write (train.bin/.idx, val.bin/.idx and "
                                              "batchpilot-tokens.json).")] = "tokens",
    json_output: JsonOpt = False,
) -> None:
    """Tokenize --data once into memory-mapped token files that batchpilot train --data OUT reads on every rank
    (documents framed by the tokenizer's BOS/EOS)."""
    import dataclasses

    from batchpilot.train.config import DataConfig
    from batchpilot.train.tokens import prepare

    DataConfig(data=data, tokenizer=tokenizer, text_field=text_field, val_fraction=val_fraction)  # the checks
    info = prepare(data, tokenizer_spec=tokenizer, text_field=text_field, val_fraction=val_fraction,
                   out=Path(out)).info
    record = {"out": out, **dataclasses.asdict(info)}
    if json_output:
        print_json(record)
        return
    table = Table("split", "documents", "tokens", title=f"batchpilot tokenize → {out} ({info.tokenizer_name}, "
                                                          f"vocabulary {info.vocab_size}, {info.dtype})")
    for split in ("train", "val"):
        table.add_row(split, format_count(info.documents[split]), format_count(info.tokens[split]))
    console.print(table)
    console.print(f"train on it: batchpilot train --data {out} --tokenizer {info.tokenizer} …")


tokenize_command = handle_errors(tokenize)
