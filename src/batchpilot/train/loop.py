"""The training loop: gradient accumulation that is numerically the large batch.

For a global batch with ``N`` target tokens (all micro-batches, all ranks), micro-step ``i`` on a
rank back-propagates ``Σ_{t ∈ micro-batch i} ℓ_t × world / N`` (× the fp16 loss scale). DDP and FSDP2
average gradients over ranks, which cancels ``world``; the sum over micro-steps and ranks is then
exactly ``∇ (1/N) Σ_t ℓ_t`` — the gradient of the token-mean loss of the whole global batch, not a
mean of per-micro-batch means (which would weight short micro-batches more). ``N`` is known on
every rank without communication: the global batch's layout is a pure function of the data, the
seed and the step (see :mod:`batchpilot.train.batching`). DDP skips gradient synchronisation on all
but the last micro-step (``no_sync``; FSDP2 ``set_requires_gradient_sync``).

One optimizer step:

1. ask the :class:`~batchpilot.train.schedule.BatchSchedule` for the global batch ``G`` and re-derive
   the accumulation steps with :class:`~batchpilot.specs.batch.BatchTriad` (the micro-batch stays);
2. take rows ``sequences_seen … sequences_seen + G − 1`` of the row stream and lay them out;
3. forward/backward each micro-batch under autocast (bf16/fp16) with the scaled loss above;
4. unscale (fp16), call the hooks, clip, set the LR (warmup, decay, batch-scaling rule), step AdamW;
5. all-reduce the loss sum (and the stop flag) once, write the ``metrics.jsonl`` record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from batchpilot.errors import BatchpilotError, DataError
from batchpilot.measure.step import (
    autocast,
    cross_entropy_sum,
    forward_loss,
    make_optimizer,
    model_inputs,
    optimizer_implementation,
    param_groups,
)
from batchpilot.records.train_summary import TrainSummary
from batchpilot.specs.batch import BatchTriad
from batchpilot.specs.settings import check_recompute_every
from batchpilot.train import checkpoint as ckpt
from batchpilot.train.batching import (
    MicroBatch,
    MicroBatchPlan,
    Row,
    RowStream,
    StepLayout,
    collate,
    layout_step,
)
from batchpilot.train.config import TrainConfig
from batchpilot.train.data import TokenizedCorpus
from batchpilot.train.distributed import (
    DistEnv,
    all_reduce_gradients,
    all_reduce_sum,
    elastic_restart_count,
    gradient_sync,
    unwrap,
)
from batchpilot.train.export import export_hf, open_sinks
from batchpilot.train.finetune import check_layout, prepare_module
from batchpilot.train.grad_norms import clip_grad_norm
from batchpilot.train.hooks import MicroStepInfo, StepInfo, TrainHook, hook_states, restore_hook_states
from batchpilot.train.lr import LRSchedule
from batchpilot.train.metrics import MetricsLog, peak_memory_bytes
from batchpilot.train.model import BuiltModel, build_model
from batchpilot.train.noise_default import default_noise_hook, noise_summary
from batchpilot.train.parallelize import (
    ParallelLayout,
    decoder_layers,
    device_mesh,
    load_full_weights,
    local_value,
    loss_context,
    parallelize,
    sharded,
)
from batchpilot.train.schedule import BatchSchedule, Progress
from batchpilot.train.tokenizer import Tokenizer
from batchpilot.train.tokens import (
    RecordedTokenizer,
    TokenDatasetInfo,
    is_token_dataset,
    open_split,
    prepare,
)
from batchpilot.train.validate import StaticPlan, check_static

RecordCallback = Callable[[dict[str, Any]], None]
TOKENS_DIR = "tokens"
"""``OUT/tokens``: the run's token dataset when ``--data`` is not one (:mod:`batchpilot.train.tokens`)."""


def _empty_corpus() -> TokenizedCorpus:
    import numpy as np

    return TokenizedCorpus(tokens=np.zeros(0, dtype=np.uint16), offsets=np.zeros(1, dtype=np.int64))


@dataclass(kw_only=True, slots=True)
class TrainState:
    """Counters saved in every checkpoint: they fix the data position and the LR."""

    step: int = 0
    """Optimizer steps done."""
    sequences_seen: int = 0
    """Rows consumed: the position in the row stream."""
    tokens_seen: int = 0
    """Input tokens consumed (padding excluded)."""
    target_tokens_seen: int = 0
    elapsed_s: float = 0.0
    """Wall time spent in training steps, summed over resumes."""

    def progress(self, batch_multiple: int) -> Progress:
        return Progress(step=self.step, sequences_seen=self.sequences_seen, tokens_seen=self.tokens_seen,
                        batch_multiple_sequences=batch_multiple)


class Trainer:
    """Owns the model, optimizer, data stream and counters of one process of a run."""

    def __init__(self, config: TrainConfig, env: DistEnv, *, hooks: Sequence[TrainHook] = (),
                 on_record: RecordCallback | None = None) -> None:
        self.config, self.env, self.hooks, self.on_record = config, env, list(hooks), on_record
        self.layout = ParallelLayout(rank=env.rank, world_size=env.world_size, tp=config.parallel.tp)
        self.dp, self.dp_rank = self.layout.dp, self.layout.dp_rank
        self.plan: StaticPlan = check_static(config, env.world_size)
        self.schedule: BatchSchedule = self.plan.schedule
        self.hooks += getattr(self.schedule, "required_hooks", list)()  # e.g. the adaptive schedule's noise hook
        self.noise = default_noise_hook(config, self.plan, self.dp, self.hooks)
        if self.noise.hook is not None:
            self.hooks.append(self.noise.hook)
        self.out = Path(config.run.out)
        self.restarts = elastic_restart_count()
        ckpt.check_fresh_start(self.out, resume=config.run.resume)  # before anything is loaded or written
        self._set_threads()
        # the architecture builds (on the meta device: no memory, no weights read) before rank 0 writes OUT/tokens,
        # so a config transformers refuses leaves nothing behind
        meta = build_model(config.model, seed=config.run.seed, empty=True)
        if config.parallel.recompute != "none":
            check_recompute_every(config.parallel.recompute_every, len(decoder_layers(meta.module)))
        self._load_data()
        self._build()
        self.state = TrainState()
        self._stop_signal: int | None = None
        resume = self._restore()
        self._on_disk_step = self.state.step if resume else -1  # the step whose checkpoint this run wrote or read
        self.lr = self._lr_schedule()
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.metrics = (MetricsLog(self.out / "metrics.jsonl", resume_step=self.state.step if resume else None)
                        if env.is_main else None)
        self.sinks = open_sinks(config.run.log_sinks, self.out, config.to_dict()) if env.is_main else []
        self._step_times: list[tuple[int, float]] = []
        self._slots = [0, 0]  # real input tokens, padded tensor slots (this process's steps)
        self._bad_steps = 0  # consecutive optimizer steps skipped for a non-finite loss or gradient norm
        self._pending: ckpt.PendingCheckpoint | None = None

    # ------------------------------------------------------------------ setup
    def _set_threads(self) -> None:
        if self.env.device.type != "cpu":
            return
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(self.config.run.threads or max(1, (os.cpu_count() or 1) // local))

    def _load_data(self) -> None:
        """Memory-map the token dataset (:mod:`batchpilot.train.tokens`): ``--data`` itself when it is one, else
        ``OUT/tokens`` written by rank 0 alone while the other ranks wait."""
        dc = self.config.data
        self.tokenizer_object: Tokenizer | None = None  # the tokenizer itself where this process built it (export)
        if is_token_dataset(dc.data):
            directory, info = Path(dc.data), TokenDatasetInfo.read(Path(dc.data))
            if info.tokenizer != dc.tokenizer:
                raise DataError(f"the tokens in {dc.data!r} were made with --tokenizer {info.tokenizer}; pass "
                                f"--tokenizer {info.tokenizer} (got {dc.tokenizer})")
        else:
            directory, info = self._prepare_tokens()
        self.tokenizer: Any = self.tokenizer_object or RecordedTokenizer.of(info)
        self.corpus: TokenizedCorpus = open_split(directory, "train", info) or _empty_corpus()
        self.val_corpus = open_split(directory, "val", info)
        self.num_documents = (info.documents["train"], info.documents["val"])
        mode = self.config.batch.batching
        self.stream = RowStream(self.corpus, mode=mode, seq_len=dc.seq_len, seed=self.config.run.seed)
        self.val_rows: list[Row] = []
        if self.val_corpus is not None and self.val_corpus.num_tokens:
            val_stream = RowStream(self.val_corpus, mode="fixed", seq_len=dc.seq_len, seed=0)
            self.val_rows = val_stream.rows(0, min(self.config.run.val_rows, val_stream.rows_per_epoch))

    def _prepare_tokens(self) -> tuple[Path, TokenDatasetInfo]:
        """Rank 0 tokenizes into ``OUT/tokens`` (or finds it there); the others wait, then read its record."""
        dc, env, failed = self.config.data, self.env, 0.0
        error: BatchpilotError | None = None
        if env.is_main:
            try:
                prepared = prepare(dc.data, tokenizer_spec=dc.tokenizer, text_field=dc.text_field,
                                   val_fraction=dc.val_fraction, out=self.out / TOKENS_DIR)
                self.tokenizer_object = prepared.tokenizer
            except BatchpilotError as exc:
                error, failed = exc, 1.0
        if all_reduce_sum([failed], env)[0]:  # the barrier: every rank waits for rank 0's tokens
            raise error or DataError("rank 0 could not prepare the training data (its error is above)")
        return self.out / TOKENS_DIR, TokenDatasetInfo.read(self.out / TOKENS_DIR)

    def _build(self) -> None:
        """The model with the plan's layout and policies (:mod:`batchpilot.train.parallelize`): sharded runs build
        it on the meta device and load rank 0's weights into their shards; others build it whole."""
        cfg, env = self.config, self.env
        self.fsdp = cfg.fsdp
        self.mesh = device_mesh(env, self.layout) if sharded(cfg) else None
        check_layout(cfg.model.finetune, sharded=self.mesh is not None)
        if self.mesh is not None:
            built = build_model(cfg.model, seed=cfg.run.seed, empty=True)
            self._check_vocabulary(built)
            full = build_model(cfg.model, seed=cfg.run.seed) if env.is_main else None
            module = built.module
            self.model = parallelize(module, cfg, env, self.mesh)
            module.to_empty(device=env.device)
            load_full_weights(module, full.module if full is not None else None, env)
            if full is not None:
                built = dataclasses.replace(built, source=full.source)
            del full
        else:
            built = build_model(cfg.model, seed=cfg.run.seed)
            self._check_vocabulary(built)
            module = prepare_module(built.module, cfg.model.finetune, precision=cfg.optim.precision).to(env.device)
            self.model = parallelize(module, cfg, env, None)
        module.train()
        self.built = built
        self.varlen = "flash" in str(getattr(module.config, "_attn_implementation", ""))
        precision = cfg.optim.precision  # FSDP2's MixedPrecisionPolicy computes in 16 bits without autocast
        self.forward_precision = ("fp32" if self.fsdp and precision in ("bf16", "fp16", "fp8")
                                  else "bf16" if precision == "fp8" else precision)
        # --compile compiles the loss as well, as torchtitan does (under tensor parallelism the loss is
        # loss_parallel's, left eager); the memory model counts RunSettings' "compiled" loss for it
        self._compiled_loss = (torch.compile(cross_entropy_sum) if cfg.parallel.compile and cfg.parallel.tp == 1
                               else None)
        oc = cfg.optim  # the one training step's optimizer (batchpilot.measure.step), as the probe runs it
        self.optimizer = make_optimizer(
            param_groups(self.model, oc.weight_decay), lr=oc.lr, betas=oc.betas, eps=oc.eps,
            implementation=optimizer_implementation(env.device.type, fsdp=self.mesh is not None))
        self.scaler = self._make_scaler()
        # dcp.async_save's collectives run in a writer thread: on a group of their own (torchtitan does the same)
        self._checkpoint_group = (dist.new_group(backend="gloo") if cfg.run.async_checkpoint and env.distributed
                                  else None)
        self.manual_sync = any(getattr(h, "requires_local_gradients", False) for h in self.hooks) \
            and env.distributed
        if self.manual_sync and self.fsdp:
            raise BatchpilotError("a hook needs rank-local gradients, which FSDP2 does not keep; run it with DDP")

    def _check_vocabulary(self, built: BuiltModel) -> None:
        if self.tokenizer.vocab_size > built.vocab_size:
            raise BatchpilotError(
                f"tokenizer {self.tokenizer.name!r} has {self.tokenizer.vocab_size} ids but the model's vocabulary "
                f"is {built.vocab_size}; use a smaller tokenizer (e.g. --tokenizer bpe:{built.vocab_size}) or a "
                f"model with a larger vocab_size"
            )

    def _make_scaler(self) -> torch.amp.GradScaler:
        enabled = self.config.optim.precision == "fp16"
        if self.fsdp and enabled:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            return ShardedGradScaler(self.env.device.type, enabled=True)
        return torch.amp.GradScaler(self.env.device.type, enabled=enabled)

    def _lr_schedule(self) -> LRSchedule:
        oc, rc = self.config.optim, self.config.run
        first = Progress(step=0, sequences_seen=0, tokens_seen=0, batch_multiple_sequences=self.plan.batch_multiple)
        return LRSchedule(peak_lr=oc.lr, warmup_steps=oc.warmup_steps, decay=oc.decay, min_lr_ratio=oc.min_lr_ratio,
                          scaling=oc.lr_scaling, reference_batch_sequences=self.schedule.global_batch(first),
                          total_steps=rc.steps, total_tokens=rc.tokens)

    def _restore(self) -> Path | None:
        """With ``--resume``, or after torchrun restarted the worker group (elastic restart) once a checkpoint
        exists: restore the newest checkpoint that passes its checksums (older ones are tried)."""
        if not self.config.run.resume:
            if not self.restarts:
                return None
            if not ckpt.has_checkpoints(self.out):
                self._log_restart("no checkpoint was written yet: starting again from step 0")
                return None
        path, state = ckpt.load_latest(self.out, model=self.model, optimizer=self.optimizer, scaler=self.scaler,
                                       env=self.env)
        if self.restarts:
            self._log_restart(f"resuming from {str(path)!r}")
        self.state = TrainState(**state["train"])
        self.schedule.load_state_dict(state["schedule"])
        restore_hook_states(self.hooks, state.get("hooks"))
        return path

    def _log_restart(self, what: str) -> None:
        if self.env.is_main:
            # stderr without configuration (logging's last-resort handler shows WARNING and above)
            logging.getLogger("batchpilot.train").warning("note: elastic restart %d (torchrun --max-restarts): %s",
                                                          self.restarts, what)

    # ------------------------------------------------------------------ one step
    def _forward_loss(self, model: torch.nn.Module, mb: MicroBatch) -> torch.Tensor:
        dev = self.env.device

        def on_device(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(dev, non_blocking=True)

        kwargs = model_inputs(mb.input_ids.to(dev, non_blocking=True), on_device(mb.attention_mask),
                              on_device(mb.position_ids))
        targets = mb.targets.to(dev, non_blocking=True)
        if self._compiled_loss is not None:  # --compile: the loss compiled too (torchtitan's "model" and "loss")
            with autocast(dev.type, self.forward_precision):
                logits = model(**kwargs).logits
            return self._compiled_loss(logits, targets)  # type: ignore[no-any-return]
        return forward_loss(model, kwargs, targets, precision=self.forward_precision)

    def _layout(self, global_batch: int) -> StepLayout:
        bc, dc = self.config.batch, self.config.data
        if bc.batching != "token-budget":  # the one owner of global = micro × accum × dp checks it
            BatchTriad.from_global(global_batch_sequences=global_batch, micro_batch_sequences=bc.micro_batch_sequences,
                                   data_parallel_ranks=self.dp, seq_len_tokens=dc.seq_len)
        elif global_batch % self.dp:
            raise BatchpilotError(f"global batch {global_batch} is not divisible by dp {self.dp}")
        rows = self.stream.rows(self.state.sequences_seen, global_batch)
        return layout_step(rows, mode=bc.batching, dp=self.dp, micro_batch_sequences=bc.micro_batch_sequences,
                           seq_len=dc.seq_len, max_tokens_per_micro_batch=self.plan.max_tokens_per_micro_batch)

    def _accumulate(self, layout: StepLayout, lr: float) -> tuple[torch.Tensor, float]:
        env, st, dp, dp_rank = self.env, self.state, self.dp, self.dp_rank
        plans = layout.per_rank[dp_rank]
        n_global = max(1, layout.global_target_tokens)
        loss_scale = float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0
        factor = dp / n_global  # DDP/FSDP2 average over the dp ranks; tensor-parallel peers share one batch
        local_targets = layout.local_target_tokens(dp_rank)
        local_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        for i, plan in enumerate(plans):
            mb = collate(plan, self.corpus.tokens, mode=self.config.batch.batching, varlen=self.varlen)
            last = i == len(plans) - 1
            with gradient_sync(self.model, last and not self.manual_sync), loss_context(self.layout.tp):
                loss_sum = self._forward_loss(self.model, mb)
                self.scaler.scale(loss_sum * factor).backward()
                loss_sum = local_value(loss_sum.detach())
            local_sum += loss_sum.double()
            if self.hooks:
                info = MicroStepInfo(
                    step=st.step, micro_index=i, num_micro_steps=len(plans), micro_target_tokens=mb.num_targets,
                    local_target_tokens=local_targets, global_target_tokens=n_global,
                    micro_batch_sequences=len(plan.rows), loss_sum=float(loss_sum.detach()), loss_scale=loss_scale,
                    grad_to_sum_factor=n_global / (dp * loss_scale),
                    grads_synced=last and env.distributed and not self.manual_sync, rank=dp_rank,
                    world_size=dp)
                for hook in self.hooks:
                    hook.on_micro_step(self.model, info)
        step_info = StepInfo(step=st.step, global_batch_sequences=layout.num_rows, global_target_tokens=n_global,
                             local_target_tokens=local_targets, tokens_seen=st.tokens_seen, loss_scale=loss_scale,
                             grad_to_sum_factor=n_global / (dp * loss_scale), lr=lr, rank=dp_rank,
                             world_size=dp)
        if self.manual_sync:
            for hook in self.hooks:
                hook.on_local_gradients(self.model, step_info)
            all_reduce_gradients(self.model, env)
        self.scaler.unscale_(self.optimizer)
        extras: dict[str, float] = {}
        for hook in self.hooks:
            extras.update(hook.on_gradients(self.model, step_info))
        self._extras = extras
        return local_sum, loss_scale

    def _optimizer_step(self, lr: float, loss_finite: bool) -> tuple[float, bool]:
        """Clip and step; returns (grad norm, skipped). The norm is global (DDP/manual sync all-reduced the
        gradients, FSDP2's is a full tensor) and the loss is all-reduced, so every rank decides alike.
        A non-finite loss or norm skips the update (gradients zeroed, weights and AdamW moments unchanged);
        with fp16 the scaler skips an overflowing step itself and lowers its scale, as before."""
        grad_norm = clip_grad_norm(self.model.parameters(), self.config.optim.grad_clip or math.inf)
        skip = not loss_finite or (not self.scaler.is_enabled() and not math.isfinite(grad_norm))
        if not skip:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.scaler.is_enabled():
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, skip

    def train_step(self) -> dict[str, Any]:
        """Run one optimizer step; returns its metrics record (before validation is added)."""
        st, start = self.state, time.perf_counter()
        global_batch = self.schedule.global_batch(st.progress(self.plan.batch_multiple))
        layout = self._layout(global_batch)
        lr = self.lr.lr(step=st.step, tokens_seen=st.tokens_seen, global_batch_sequences=global_batch)
        local_sum, loss_scale = self._accumulate(layout, lr)
        mine = float(local_sum) if self.layout.tp_rank == 0 else 0.0  # one copy per tensor-parallel group
        loss_total, stop = all_reduce_sum([mine, 1.0 if self._stop_signal else 0.0], self.env)
        grad_norm, skipped = self._optimizer_step(lr, math.isfinite(loss_total))
        self._bad_steps = self._bad_steps + 1 if skipped else 0
        self._stop_requested = stop > 0
        seconds = time.perf_counter() - start
        st.step += 1
        st.sequences_seen += layout.num_rows
        st.tokens_seen += layout.global_input_tokens
        st.target_tokens_seen += layout.global_target_tokens
        st.elapsed_s += seconds
        self._step_times.append((layout.global_input_tokens, seconds))
        self._slots[0] += layout.global_input_tokens
        self._slots[1] += layout.global_padded_tokens
        record = self._record(layout, loss_total, lr, grad_norm, seconds, loss_scale)
        if skipped:
            record["skipped"] = "non-finite"
        return record

    def _record(self, layout: StepLayout, loss_total: float, lr: float, grad_norm: float, seconds: float,
                loss_scale: float) -> dict[str, Any]:
        bc = self.config.batch
        micro = (bc.micro_batch_sequences if bc.batching != "token-budget"
                 else max(len(p.rows) for p in layout.per_rank[0]))
        record: dict[str, Any] = {
            "step": self.state.step, "tokens": self.state.tokens_seen,
            "loss": loss_total / max(1, layout.global_target_tokens), "lr": lr,
            "global_batch_sequences": layout.num_rows, "global_batch_tokens": layout.global_input_tokens,
            "micro_batch": micro, "grad_accum": layout.grad_accum_steps, "grad_norm": grad_norm,
            "padding_fraction": layout.padding_fraction, "tokens_per_s": layout.global_input_tokens / seconds,
            "peak_memory_bytes": peak_memory_bytes(self.env.device), "elapsed_s": self.state.elapsed_s,
            "target_tokens": layout.global_target_tokens, "loss_scale": loss_scale,
        }
        record.update(self._extras)
        return record

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> float | None:
        """Token-mean validation loss over ``val_rows`` rows (every rank runs the same number of forwards)."""
        if not self.val_rows:
            return None
        micro = self.config.batch.micro_batch_sequences
        mine = self.val_rows[self.dp_rank::self.dp]
        per_rank = -(-len(self.val_rows) // self.dp)
        model = self.model if self.fsdp else unwrap(self.model)
        totals = [0.0, 0.0]
        was_training = model.training
        model.eval()
        assert self.val_corpus is not None
        with torch.no_grad():
            for start in range(0, per_rank, micro):
                plan = MicroBatchPlan(rows=tuple(mine[start:start + micro]), pad_to=self.config.data.seq_len)
                mb = collate(plan, self.val_corpus.tokens, mode="fixed")
                with loss_context(self.layout.tp):
                    value = float(local_value(self._forward_loss(model, mb)))
                if self.layout.tp_rank == 0:  # tensor-parallel peers computed the same rows
                    totals[0] += value
                    totals[1] += mb.num_targets
        model.train(was_training)
        loss_sum, count = all_reduce_sum(totals, self.env)
        return loss_sum / count if count else None

    # ------------------------------------------------------------------ the run
    def _done(self) -> bool:
        rc = self.config.run
        return self.state.step >= rc.steps if rc.steps is not None else self.state.tokens_seen >= (rc.tokens or 0)

    def _checkpoint(self) -> None:
        if not self._weights_finite():  # an update overflowed: never replace a good checkpoint with inf/NaN
            if self.metrics is not None:
                self.metrics.close()
            kept = ckpt.latest_checkpoint(self.out)
            raise BatchpilotError(
                f"the weights are not finite after step {self.state.step} (an update overflowed), so no checkpoint "
                f"was written; " + (f"the last good one {str(kept)!r} is kept" if kept else "none was written before")
                + f"; lower --lr (now {self.config.optim.lr:g}) or set --grad-clip")
        state = {"train": dataclasses.asdict(self.state), "schedule": self.schedule.state_dict(),
                 "hooks": hook_states(self.hooks), "config": self.config.to_dict()}
        self._publish_pending()
        written = ckpt.save_checkpoint(
            self.out, self.state.step, model=self.model, optimizer=self.optimizer, scaler=self.scaler, state=state,
            env=self.env, keep=self.config.run.keep_checkpoints, unchanged=self._on_disk_step == self.state.step,
            asynchronous=self.config.run.async_checkpoint, group=self._checkpoint_group)
        self._pending = written if isinstance(written, ckpt.PendingCheckpoint) else None
        self._on_disk_step = self.state.step

    def _publish_pending(self) -> None:
        """Finish the asynchronous checkpoint still being written (``--async-checkpoint``)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.publish()

    def _stop_bad_steps(self) -> None:
        """Stop after ``max_bad_steps`` skipped steps in a row, leaving the last checkpoint as it is."""
        if self.metrics is not None:
            self.metrics.close()
        kept = ckpt.latest_checkpoint(self.out)
        raise BatchpilotError(
            f"{self._bad_steps} optimizer steps in a row (up to step {self.state.step}) had a non-finite loss or "
            f"gradient norm and were skipped (--max-bad-steps {self.config.optim.max_bad_steps}); "
            + (f"the last good checkpoint {str(kept)!r} is kept" if kept else "no checkpoint was written")
            + f"; lower --lr (now {self.config.optim.lr:g}) or set --grad-clip, then --resume or start again")

    def _weights_finite(self) -> bool:
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters()]  # FSDP2 shards
        bad = sum(0.0 if bool(torch.isfinite(t.detach()).all()) else 1.0 for t in local)
        return all_reduce_sum([bad], self.env)[0] == 0

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: object) -> None:
            self._stop_signal = signum

        old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _publish(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(record)
            for sink in self.sinks:
                sink.write(record)
            if self.on_record is not None:
                self.on_record(record)
        for hook in self.hooks:
            hook.on_step_end(record)
        self.schedule.observe(record)

    def train(self) -> dict[str, Any]:
        """Train until ``--steps``/``--tokens`` or a signal; returns the summary (also ``summary.json``)."""
        rc = self.config.run
        stopped: str | None = None
        self._stop_requested = False
        with self._signals():
            while not self._done():
                record = self.train_step()
                if rc.val_every and self.state.step % rc.val_every == 0:
                    record["val_loss"] = self.evaluate()
                self._publish(record)
                if self._stop_requested:
                    stopped = signal.Signals(self._stop_signal).name if self._stop_signal else "peer rank signal"
                    break
                if self._bad_steps >= self.config.optim.max_bad_steps:
                    self._stop_bad_steps()
                if rc.checkpoint_every and self.state.step % rc.checkpoint_every == 0 and not record.get("skipped"):
                    self._checkpoint()
            if stopped or rc.final_checkpoint:
                self._checkpoint()
            self._publish_pending()
            val_loss = None if stopped else self.evaluate()
            if self.config.run.export_hf and not stopped:
                export_hf(self.model, self.built.module, self.out, is_main=self.env.is_main,
                          tokenizer=self.tokenizer_object, tokenizer_spec=self.config.data.tokenizer)
        if self.metrics is not None:
            self.metrics.close()
        for sink in self.sinks:
            sink.close()
        return self._summary(val_loss, stopped)

    def _summary(self, val_loss: float | None, stopped: str | None) -> dict[str, Any]:
        """The run's :class:`~batchpilot.records.train_summary.TrainSummary`, saved as ``summary.json`` on the main
        rank; returned as its JSON object (what :func:`batchpilot.train.run` returns)."""
        timed = self._step_times[1:] or self._step_times  # the first step pays one-off warm-up costs
        tokens, seconds = sum(t for t, _ in timed), sum(s for _, s in timed)
        summary = TrainSummary(
            steps=self.state.step, tokens=self.state.tokens_seen, target_tokens=self.state.target_tokens_seen,
            final_loss=self._last_loss(), val_loss=val_loss, tokens_per_s=tokens / seconds if seconds else None,
            padding_fraction=1 - self._slots[0] / self._slots[1] if self._slots[1] else None,
            elapsed_s=self.state.elapsed_s, peak_memory_bytes=peak_memory_bytes(self.env.device),
            world_size=self.env.world_size, device=str(self.env.device), model_params=self.built.num_params,
            model_source=self.built.source, tokenizer=self.tokenizer.name,
            train_documents=self.num_documents[0], val_documents=self.num_documents[1],
            corpus_tokens=self.corpus.num_tokens, batch_schedule=self.schedule.describe(),
            stopped_by_signal=stopped, elastic_restarts=self.restarts, out=str(self.out), config=self.config.to_dict(),
            noise_scale=noise_summary(self.noise, self.hooks),
        )
        if self.env.is_main:
            summary.save(self.out / "summary.json")
        return summary.to_dict()

    def _last_loss(self) -> float | None:
        path = self.out / "metrics.jsonl"
        if not self.env.is_main or not path.exists():
            return None
        from batchpilot.train.metrics import read_metrics

        records = read_metrics(path)
        return records[-1]["loss"] if records else None
