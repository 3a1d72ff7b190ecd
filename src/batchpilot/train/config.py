"""The runner's configuration: one small frozen dataclass per component, grouped in :class:`TrainConfig`.

Every field is plain data (JSON round-trip via :meth:`TrainConfig.to_dict` / :meth:`TrainConfig.from_dict`),
so the same config travels to torchrun workers and into ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from batchpilot.errors import BatchpilotError

BatchingMode = Literal["fixed", "token-budget", "packed"]
BATCHING_MODES: tuple[BatchingMode, ...] = ("fixed", "token-budget", "packed")

Precision = Literal["fp32", "bf16", "fp16", "fp8"]
LRDecay = Literal["cosine", "linear", "constant", "wsd"]
LR_DECAYS: tuple[LRDecay, ...] = ("cosine", "linear", "constant", "wsd")
Recompute = Literal["none", "op", "full"]
RECOMPUTES: tuple[Recompute, ...] = ("none", "op", "full")
"""Recomputation policies the runner applies (:mod:`batchpilot.measure.recompute`, the memory model's own)."""
Reshard = Literal["default", "last", "always", "never"]
RESHARDS: tuple[Reshard, ...] = ("default", "last", "always", "never")
FP8Recipe = Literal["tensorwise", "rowwise"]
FP8_RECIPES: tuple[FP8Recipe, ...] = ("tensorwise", "rowwise")
"""torchao ``Float8LinearConfig.from_recipe_name`` recipes the runner applies (GPU only)."""
LogSink = Literal["tensorboard", "wandb"]
LOG_SINKS: tuple[LogSink, ...] = ("tensorboard", "wandb")
LRScaling = Literal["none", "linear", "sqrt"]
Device = Literal["auto", "cpu", "cuda"]
MAX_RESTARTS = 100
"""Upper bound of ``--max-restarts`` (a worker group failing more often than this is not a transient fault)."""
DEFAULT_NOISE_EVERY = 4
"""The runner measures the gradient noise scale on one optimizer step in this many (``--noise-every``).
Measured CPU cost on tiny-llama-1m, 512 tokens per micro-batch, accumulation 4, 1 thread, against
forward+backward alone (``benchmarks/results/noise_adaptive_overhead.md``, 40 interleaved blocks on a shared
2-core machine): one step in 4 → +1.2% (median of paired blocks; +0.1% min-vs-min, +2.2% median-vs-median),
every step → +3.3%. The norms alone cost 0.64 ms per micro-step against 57 ms of forward+backward (1.1%).
The cost scales as 1/tokens per micro-batch (norms ∝ parameters, forward+backward ∝ parameters × tokens)."""


class ConfigError(BatchpilotError):
    """A training setting that is out of range or inconsistent with another."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """Which model to train."""

    model: str = "tiny-llama-1m"
    """Preset name, a config.json (random init), or a local pretrained directory (safetensors)."""
    trust_remote_code: bool = False
    """Allow a local checkpoint's custom modelling code (off by default, never needed for presets)."""
    attn_implementation: str | None = None
    """``sdpa``, ``eager``, ``flash_attention_2``…; None lets ``transformers`` choose."""
    finetune: str = "full"
    """``--finetune``: what trains (:mod:`batchpilot.train.finetune`)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    """What the model reads."""

    data: str = "stdlib"
    """``stdlib``, a local file/folder (text, JSONL, Parquet) or ``hf:NAME[:SPLIT]``."""
    tokenizer: str = "bytes"
    """``bytes``, ``bpe:VOCAB`` (trained on the corpus, cached) or a local tokenizer directory."""
    text_field: str = "text"
    """Field/column holding the text in JSONL, Parquet and ``datasets`` rows."""
    seq_len: int = 256
    """Tokens per sequence (row)."""
    val_fraction: float = 0.02
    """Share of documents (by key hash) held out for validation."""

    def __post_init__(self) -> None:
        _require(self.seq_len >= 2, f"--seq-len {self.seq_len} must be at least 2 (one input and its target)")
        _require(0.0 <= self.val_fraction < 1.0, f"validation fraction {self.val_fraction} must be in [0, 1)")


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchConfig:
    """The global batch, its micro-batches and its schedule."""

    global_batch_sequences: int = 16
    """Global batch in sequences (the final one for a ramp; ignored by a ``steps:`` schedule)."""
    micro_batch_sequences: int = 16
    """Sequences per micro-batch per rank (fixed and packed batching)."""
    batching: BatchingMode = "fixed"
    """``fixed`` padding, ``token-budget`` dynamic batching or ``packed`` documents."""
    max_tokens_per_micro_batch: int | None = None
    """Token-budget batching: padded tokens per micro-batch (default micro × seq_len)."""
    batch_schedule: str = "constant"
    """See :mod:`batchpilot.train.schedule`."""

    def __post_init__(self) -> None:
        _require(self.batching in BATCHING_MODES, f"--batching {self.batching!r}: use {', '.join(BATCHING_MODES)}")
        _require(self.global_batch_sequences >= 1, "--global-batch must be positive")
        _require(self.micro_batch_sequences >= 1, "--micro-batch must be positive")


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimConfig:
    """AdamW, learning-rate schedule, precision, clipping."""

    lr: float = 3e-3
    """Peak learning rate at the reference global batch."""
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 10
    """Linear warmup over the first optimizer steps."""
    decay: LRDecay = "cosine"
    """Decay after warmup, over ``--steps`` or ``--tokens``."""
    min_lr_ratio: float = 0.1
    """Floor of the decay as a fraction of the peak."""
    lr_scaling: LRScaling = "none"
    """Rescale the LR when the global batch B differs from the first one B₀: ×B/B₀ (linear, Goyal et
    al. 2017) or ×√(B/B₀) (sqrt, Malladi et al. 2022 for Adam)."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping (the norm is still logged)."""
    precision: Precision = "fp32"
    """fp32, bf16 autocast (FSDP2: ``MixedPrecisionPolicy`` bf16 parameters, fp32 reduction), fp16 autocast
    with a gradient scaler, or fp8 (torchao ``Float8Linear`` matmuls over bf16; CUDA only)."""
    decay_ratio: float = 0.2
    """``wsd``: the share of the run (steps or tokens) spent in the final decay; the LR is flat before it.
    0.2: Hägele et al. 2024 (arXiv:2405.18392 §3) found a 20% cooldown matches cosine."""
    max_bad_steps: int = 5
    """Stop after this many consecutive optimizer steps skipped for a non-finite loss or gradient norm (the
    weights are not updated on such a step; fp16 gradient overflows are the scaler's and do not count)."""

    def __post_init__(self) -> None:
        _require(math.isfinite(self.lr) and self.lr > 0, f"--lr {self.lr} must be positive and finite")
        _require(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
                 f"--weight-decay {self.weight_decay} must be a finite number ≥ 0")
        _require(self.warmup_steps >= 0, "--warmup-steps must be ≥ 0")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "min LR ratio must be in [0, 1]")
        _require(self.grad_clip >= 0, "--grad-clip must be ≥ 0")
        _require(self.max_bad_steps >= 1, f"--max-bad-steps {self.max_bad_steps} must be positive")
        _require(self.precision in ("fp32", "bf16", "fp16", "fp8"),
                 f"--precision {self.precision!r}: use fp32, bf16, fp16 or fp8")
        _require(0.0 < self.decay_ratio <= 1.0, f"--decay-ratio {self.decay_ratio} must be in (0, 1]")
        _require(self.lr_scaling in ("none", "linear", "sqrt"), f"--lr-scaling {self.lr_scaling!r}: use none, linear or sqrt")
        _require(self.decay in LR_DECAYS, f"--lr-decay {self.decay!r}: use {', '.join(LR_DECAYS)}")


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    """How long, where, how many processes, checkpoints and evaluation."""

    steps: int | None = 100
    """Optimizer steps to train (exclusive with ``tokens``)."""
    tokens: int | None = None
    """Input tokens to train on (exclusive with ``steps``)."""
    out: str = "runs/train"
    """Output directory: metrics.jsonl, summary.json, checkpoints/."""
    checkpoint_every: int = 0
    """Checkpoint every N steps (0: only at the end and on SIGTERM/SIGINT)."""
    final_checkpoint: bool = True
    """Checkpoint when the run ends (off for measurement runs such as ``batchpilot noise``, whose weights
    are not kept; a signal still checkpoints)."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept on disk."""
    resume: bool = False
    """Continue from the latest checkpoint in ``out``."""
    seed: int = 0
    """Model init and data order."""
    val_every: int = 0
    """Validation loss every N steps (0: only at the end)."""
    val_rows: int = 64
    """Validation rows evaluated each time."""
    noise_every: int = DEFAULT_NOISE_EVERY
    """Measure the gradient noise scale B_simple on one step in this many (0: off). Installed only when a step
    has more than one micro-batch in total (accumulation × dp > 1) and tensor parallelism is off; see
    :mod:`batchpilot.train.noise_default`."""
    nproc: int = 1
    """Local processes; > 1 launches torchrun."""
    max_restarts: int = 0
    """torchrun's elastic restarts when this process launches it (``--nproc`` > 1, or > 0 here with one
    process): a failed worker group starts again and resumes from the last checkpoint."""
    fsdp: bool = False
    """FSDP2 ``fully_shard`` instead of DDP (``--fsdp``: the same as ``ParallelConfig.zero_stage`` 3)."""
    expected_world_size: int | None = None
    """Fail unless the launcher started exactly this many processes."""
    device: Device = "auto"
    """``cuda`` when available under auto."""
    threads: int | None = None
    """``torch.set_num_threads`` per process (default: cores / local processes)."""
    async_checkpoint: bool = False
    """Write checkpoints with ``torch.distributed.checkpoint.async_save`` (training goes on while the files are
    written; the checkpoint is published, manifest and ``latest``, when the write has finished)."""
    export_hf: bool = False
    """At the end, write the final model in the Hugging Face format (``OUT/hf/``: config.json and
    model.safetensors, and the tokenizer when it is a Hugging Face one)."""
    log_sinks: tuple[LogSink, ...] = ()
    """Besides ``metrics.jsonl``: ``tensorboard`` (``torch.utils.tensorboard.SummaryWriter`` in ``OUT/tb``) and
    ``wandb`` (offline mode, in ``OUT/wandb``; needs the wandb package)."""

    def __post_init__(self) -> None:
        _require((self.steps is None) != (self.tokens is None), "give exactly one of --steps and --tokens")
        _require(self.steps is None or self.steps >= 1, "--steps must be positive")
        _require(self.tokens is None or self.tokens >= 1, "--tokens must be positive")
        _require(self.checkpoint_every >= 0 and self.val_every >= 0, "--checkpoint-every/--val-every must be ≥ 0")
        _require(self.noise_every >= 0, f"--noise-every {self.noise_every} must be ≥ 0 (0 turns the measurement off)")
        _require(self.nproc >= 1, "--nproc must be positive")
        _require(self.expected_world_size is None or self.expected_world_size >= 1,
                 f"--expect-world-size {self.expected_world_size} must be positive")
        _require(self.device in ("auto", "cpu", "cuda"), f"--device {self.device!r}: use auto, cpu or cuda")
        _require(0 <= self.max_restarts <= MAX_RESTARTS, f"--max-restarts {self.max_restarts} must be in 0..{MAX_RESTARTS}")
        _require(self.keep_checkpoints >= 1, "--keep-checkpoints must be positive")
        _require(self.threads is None or self.threads >= 1, f"--threads {self.threads} must be positive (omit it for the default)")
        for sink in self.log_sinks:
            _require(sink in LOG_SINKS, f"--log {sink!r}: use {', '.join(LOG_SINKS)}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ParallelConfig:
    """How the model is split and what it recomputes: the layout and policies a ``batchpilot plan`` chooses
    (``RunSettings``' vocabulary), applied in torchtitan's order by :mod:`batchpilot.train.parallelize`."""

    zero_stage: int = 0
    """0: DDP (``--fsdp`` still means 3); 2: FSDP2 without resharding after forward (ZeRO-2: parameters stay
    gathered from forward to backward); 3: FSDP2 full sharding."""
    reshard_after_forward: Reshard = "default"
    """ZeRO-3's ``reshard_after_forward`` per unit, torchtitan's ``fsdp_reshard_after_forward``: ``default``
    (embedding and blocks resharded, ``[norm, output]`` kept), ``last`` (every block but the last; the root
    unit kept), ``always``, ``never``."""
    tp: int = 1
    """Tensor-parallel size: the model's own ``base_model_tp_plan`` (colwise/rowwise linears) over DTensor;
    ranks ``tp·k … tp·k + tp − 1`` form one tensor-parallel group and see the same data."""
    recompute: Recompute = "none"
    """``op`` (torchtitan's per-op selective checkpointing), ``full``, or ``none``."""
    recompute_every: int = 1
    """Checkpoint layers N, 2N, … only (1: every layer)."""
    compile: bool = False
    """``torch.compile`` each decoder layer (after recomputation, before FSDP2, as torchtitan)."""
    fp8_recipe: FP8Recipe = "tensorwise"
    """torchao's float8 recipe under ``--precision fp8``."""

    def __post_init__(self) -> None:
        _require(self.zero_stage in (0, 2, 3), f"--zero {self.zero_stage}: the runner runs 0 (DDP), 2 or 3 (FSDP2)")
        _require(self.reshard_after_forward in RESHARDS,
                 f"--reshard-after-forward {self.reshard_after_forward!r}: use {', '.join(RESHARDS)}")
        _require(self.tp >= 1, f"--tp {self.tp} must be positive")
        _require(self.recompute in RECOMPUTES, f"--recompute {self.recompute!r}: the runner applies "
                 f"{', '.join(RECOMPUTES)} (selective, the attention core, keeps what none keeps under SDPA)")
        _require(self.recompute_every >= 1, f"--recompute-every {self.recompute_every} must be positive")
        _require(self.recompute_every == 1 or self.recompute != "none",
                 f"--recompute-every {self.recompute_every} needs --recompute op or full")
        _require(self.fp8_recipe in FP8_RECIPES, f"--fp8-recipe {self.fp8_recipe!r}: use {', '.join(FP8_RECIPES)}")


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """Everything :func:`batchpilot.train.run` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        zero, p = self.zero_stage, self.parallel
        _require(zero != 0 or p.tp == 1, f"--tp {p.tp} runs with FSDP2 (--zero 2 or 3, or --fsdp): DDP replicates "
                                         f"whole models (torchtitan: DDP has no 2-D parallelism)")
        _require(p.reshard_after_forward == "default" or zero == 3,
                 f"--reshard-after-forward {p.reshard_after_forward} applies to --zero 3 (FSDP2 full sharding)")

    @property
    def zero_stage(self) -> int:
        """0 (DDP), 2 or 3 (FSDP2): ``parallel.zero_stage``, or 3 for the older ``run.fsdp``."""
        return self.parallel.zero_stage or (3 if self.run.fsdp else 0)

    @property
    def fsdp(self) -> bool:
        """FSDP2 shards the model (ZeRO-2 or 3)."""
        return self.zero_stage > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        optim = dict(data.get("optim", {}))
        if "betas" in optim:
            optim["betas"] = tuple(optim["betas"])
        run = dict(data.get("run", {}))
        if "log_sinks" in run:
            run["log_sinks"] = tuple(run["log_sinks"])
        return cls(model=ModelConfig(**data.get("model", {})), data=DataConfig(**data.get("data", {})),
                   batch=BatchConfig(**data.get("batch", {})), optim=OptimConfig(**optim),
                   run=RunConfig(**run), parallel=ParallelConfig(**data.get("parallel", {})))

    def replace(self, **sections: Any) -> TrainConfig:
        """A copy with some fields of some sections changed: ``cfg.replace(run={"steps": 5})``."""
        return dataclasses.replace(self, **{k: dataclasses.replace(getattr(self, k), **v) for k, v in sections.items()})
