"""The batch rules each RL framework enforces — before launch or deep inside a running job — applied
first, so a bad combination is refused in one line with the rule, the values and the nearest valid choices.

Example (DeepSeek-R1-Zero's batch on 480 GPUs: verl needs the samples to split evenly over the GPUs)::

    >>> from batchpilot.rl.batch import RLBatch
    >>> ctx = RuleContext(batch=RLBatch(prompts_per_rollout=512, group_size=16, samples_per_update=512),
    ...                   gpus=480, gpus_per_node=8, max_prompt_tokens=1024, max_response_tokens=32768)
    >>> check("verl", ctx)
    Traceback (most recent call last):
    ...
    batchpilot.rl.batch.RLBatchError: verl: samples per rollout 8192 (512 prompts × group 16) must divide by the 480 GPUs ...

Sources (the version each rule was read at):

- verl 0.9.1 (PyPI wheel; the pre-launch check also at git commit f9c855f7, tag v0.7.0):
  ``verl/utils/config.py`` ``validate_config`` L123 ``real_train_batch_size % minimal_bsz == 0``
  (``data.train_batch_size × rollout.n`` by the GPUs); ``verl/protocol.py`` L872 ``DataProto.chunk``
  "only support equal chunk" (every dispatch to the workers splits the batch into world-size equal
  parts, also with dynamic batching, where ``validate_config`` skips the check);
  ``verl/workers/config/actor.py`` L227 ``train_batch_size >= ppo_mini_batch_size``;
  ``verl/workers/engine_workers.py`` L267 ``mini_batch_size % data_parallel_size == 0`` (asserted in the
  worker, after the first rollout) and L659 "rollout world_size … is not divisible by infer_world_size";
  ``verl/utils/seqlen_balancing.py`` L385 "max_token_len must be greater than the sequence length"
  (``ppo_max_token_len_per_gpu × ulysses_sequence_parallel_size ≥ prompt + response``);
  ``verl/workers/rollout/vllm_rollout/vllm_async_server.py`` L1107 ``max_model_len ≤
  max_position_embeddings``; the legacy FSDP worker (``verl/workers/fsdp_workers.py`` L256 at v0.7.0)
  "normalized ppo_mini_batch_size … should be divisible by ppo_micro_batch_size_per_gpu".
- vLLM: tensor parallelism divides the attention heads (``ModelConfig.verify_with_parallel_config``).
- TRL 1.9.0 (git commit a785283c): ``trl/trainer/grpo_config.py`` ``GRPOConfig.__post_init__``:
  ``generation_batch_size`` divisible by the global batch (per device × processes) and by
  ``num_generations``; ``num_generations ≥ 2``. batchpilot adds: an update never straddles two
  generations (``steps_per_generation`` a multiple of ``gradient_accumulation_steps``; TRL's
  ``_prepare_inputs`` would otherwise train one update on two policies' samples).
- OpenRLHF 0.11.0 (git commit 3c3be623): ``openrlhf/cli/train_ppo_ray.py`` L57–63 (colocated: actor GPUs =
  vLLM engines × vLLM TP), L613 (group estimators need ``n_samples_per_prompt > 1``), L711–716 (sample
  batches ≥ actor processes); ``openrlhf/utils/deepspeed/deepspeed.py`` L110–114 (accumulation =
  train_batch_size ÷ micro ÷ world, floored, then DeepSpeed's ``train_batch_size == micro × accum ×
  world`` assertion); ``openrlhf/trainer/ppo_utils/replay_buffer.py`` L101 (updates per rollout =
  samples ÷ train_batch_size, floored: a remainder is silently dropped — refused here).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from batchpilot.rl.batch import RLBatch, RLBatchError, divisors, nearest

Framework = Literal["verl", "trl", "openrlhf"]
FRAMEWORKS: tuple[str, ...] = ("verl", "trl", "openrlhf")


@dataclass(frozen=True, kw_only=True, slots=True)
class RuleContext:
    """Everything the frameworks' batch rules look at."""

    batch: RLBatch
    gpus: int
    """GPUs of the job (all of them when colocated; the training GPUs when rollout runs separately)."""
    gpus_per_node: int
    max_prompt_tokens: int
    max_response_tokens: int
    model_parallel: int = 1
    """GPUs holding one training replica (tensor/sequence × pipeline parallel); dp = gpus ÷ this."""
    micro_batch_per_gpu: int = 1
    token_budget_per_gpu: int | None = None
    """Dynamic batching's tokens per GPU (None: a fixed micro-batch)."""
    sequence_parallel: int = 1
    """Ulysses sequence parallel size (verl FSDP) — the sequence is split over this many GPUs."""
    rollout_tp: int = 1
    rollout_gpus: int | None = None
    """GPUs running the rollout engines (None: the same as ``gpus``, colocated)."""
    num_heads: int = 0
    """Attention heads of the model (0: not checked)."""
    max_position_embeddings: int = 0
    """The model's longest context (0: not checked)."""
    algorithm: str = "grpo"

    @property
    def dp(self) -> int:
        return max(1, self.gpus // self.model_parallel)

    @property
    def max_tokens(self) -> int:
        return self.max_prompt_tokens + self.max_response_tokens


def _fail(framework: str, rule: str, ctx: RuleContext, fixes: str) -> RLBatchError:
    return RLBatchError(f"{framework}: {rule}; {fixes}" if fixes else f"{framework}: {rule}")


# ------------------------------------------------------------------------------------------------ rules
Rule = Callable[[RuleContext], str | None]
"""A rule returns None when satisfied, else the one-line statement of what is violated (values included)."""


def _samples_by_gpus(ctx: RuleContext) -> str | None:
    b = ctx.batch
    if b.samples_per_rollout % ctx.gpus:
        return (f"samples per rollout {b.samples_per_rollout} ({b.prompts_per_rollout} prompts × group "
                f"{b.group_size}) must divide by the {ctx.gpus} GPUs (verl validate_config: real_train_batch_size "
                f"% n_gpus; DataProto.chunk: 'only support equal chunk')")
    return None


def _update_whole_prompts(ctx: RuleContext) -> str | None:
    b = ctx.batch
    if b.samples_per_update % b.group_size:
        return (f"samples per update {b.samples_per_update} must be whole prompt groups of {b.group_size} "
                f"(actor.ppo_mini_batch_size counts prompts)")
    return None


def _update_by_dp(ctx: RuleContext) -> str | None:
    b = ctx.batch
    if b.samples_per_update % ctx.dp:
        return (f"samples per update {b.samples_per_update} must divide by the {ctx.dp} data-parallel ranks "
                f"(verl engine_workers: mini_batch_size % data_parallel_size, asserted after the first rollout)")
    return None


def _micro_divides(ctx: RuleContext) -> str | None:
    if ctx.token_budget_per_gpu is not None:
        return None
    per_rank = ctx.batch.samples_per_update // ctx.dp
    if per_rank % ctx.micro_batch_per_gpu:
        return (f"the {per_rank} samples per rank and update must divide by the micro-batch "
                f"{ctx.micro_batch_per_gpu} (verl: normalized ppo_mini_batch_size divisible by "
                f"ppo_micro_batch_size_per_gpu)")
    return None


def _token_budget(ctx: RuleContext) -> str | None:
    if ctx.token_budget_per_gpu is None:
        return None
    if ctx.token_budget_per_gpu * ctx.sequence_parallel < ctx.max_tokens:
        return (f"token budget {ctx.token_budget_per_gpu} × sequence parallel {ctx.sequence_parallel} < prompt "
                f"{ctx.max_prompt_tokens} + response {ctx.max_response_tokens} = {ctx.max_tokens} "
                f"(verl seqlen_balancing: 'max_token_len must be greater than the sequence length')")
    return None


def _rollout_tp_divides(ctx: RuleContext) -> str | None:
    gpus = ctx.rollout_gpus or ctx.gpus
    if gpus % ctx.rollout_tp:
        return f"the {gpus} rollout GPUs must divide by the rollout TP {ctx.rollout_tp} (one engine per TP group)"
    if ctx.num_heads and ctx.num_heads % ctx.rollout_tp:
        return f"rollout TP {ctx.rollout_tp} must divide the {ctx.num_heads} attention heads (vLLM)"
    return None


def _context_fits(ctx: RuleContext) -> str | None:
    if ctx.max_position_embeddings and ctx.max_tokens > ctx.max_position_embeddings:
        return (f"prompt {ctx.max_prompt_tokens} + response {ctx.max_response_tokens} = {ctx.max_tokens} exceeds "
                f"the model's max_position_embeddings {ctx.max_position_embeddings} (vLLM max_model_len)")
    return None


def _group_for_grpo(ctx: RuleContext) -> str | None:
    if ctx.algorithm == "grpo" and ctx.batch.group_size < 2:
        return f"GRPO needs a group of at least 2 responses per prompt, got {ctx.batch.group_size}"
    return None


def _trl_no_model_parallel(ctx: RuleContext) -> str | None:
    """GRPOTrainer runs the update under accelerate with DDP/FSDP/DeepSpeed only: no tensor or pipeline
    parallelism, and ``GRPOConfig`` refuses sequence/context parallel sizes above 1."""
    if ctx.model_parallel > 1 or ctx.sequence_parallel > 1:
        return (f"GRPOTrainer has no tensor, pipeline or sequence parallelism; the update layout holds one replica "
                f"on {ctx.model_parallel} GPUs (Ulysses sequence parallel {ctx.sequence_parallel} of them; one GPU "
                f"per replica is needed)")
    return None


def _trl_generation_by_global(ctx: RuleContext) -> str | None:
    glob = ctx.micro_batch_per_gpu * ctx.gpus
    b = ctx.batch
    if b.samples_per_rollout % glob:
        return (f"generation_batch_size {b.samples_per_rollout} must divide by the global batch per_device "
                f"{ctx.micro_batch_per_gpu} × {ctx.gpus} processes = {glob} (GRPOConfig)")
    if b.samples_per_update % glob:
        return (f"samples per update {b.samples_per_update} must be per_device {ctx.micro_batch_per_gpu} × "
                f"{ctx.gpus} processes × gradient_accumulation_steps")
    return None


def _openrlhf_colocate(ctx: RuleContext) -> str | None:
    if ctx.rollout_gpus is None and ctx.gpus % ctx.rollout_tp:
        return (f"colocated: actor GPUs {ctx.gpus} must equal vllm.num_engines × vllm.tensor_parallel_size "
                f"{ctx.rollout_tp}")
    return None


def _openrlhf_train_batch(ctx: RuleContext) -> str | None:
    b, per_step = ctx.batch, ctx.micro_batch_per_gpu * ctx.dp
    if b.samples_per_update % per_step:
        return (f"train.batch_size {b.samples_per_update} must be train.micro_batch_size {ctx.micro_batch_per_gpu} × "
                f"{ctx.dp} data-parallel ranks × accumulation (DeepSpeed's train_batch_size assertion)")
    return None


RULES: dict[str, tuple[Rule, ...]] = {
    "verl": (_group_for_grpo, _samples_by_gpus, _update_whole_prompts, _update_by_dp, _micro_divides,
             _token_budget, _rollout_tp_divides, _context_fits),
    "trl": (_group_for_grpo, _trl_no_model_parallel, _trl_generation_by_global, _context_fits),
    "openrlhf": (_group_for_grpo, _openrlhf_colocate, _openrlhf_train_batch, _rollout_tp_divides, _context_fits),
}
"""The rules of each framework, in the order they fire (first violated = the one reported)."""


LAYOUT_FIXES: dict[Rule, str] = {
    _trl_no_model_parallel: "plan the update for TRL (--framework trl) or pin --train-tp 1",
}
"""Rules about the update's layout rather than the batch: their fix is a layout, not another batch size."""


def _first_violation(framework: str, ctx: RuleContext) -> tuple[Rule, str] | None:
    if framework not in RULES:
        raise RLBatchError(f"--framework {framework!r} is not one of: {', '.join(FRAMEWORKS)}")
    for rule in RULES[framework]:
        message = rule(ctx)
        if message is not None:
            return rule, message
    return None


def violation(framework: str, ctx: RuleContext) -> str | None:
    """The first rule of ``framework`` that ``ctx`` violates, or None."""
    found = _first_violation(framework, ctx)
    return None if found is None else found[1]


def check(framework: str, ctx: RuleContext) -> None:
    """Raise one line naming the violated rule, its values and the nearest valid choices (or the layout fix)."""
    found = _first_violation(framework, ctx)
    if found is not None:
        rule, message = found
        fix = LAYOUT_FIXES.get(rule) or nearest_choices(framework, ctx)
        raise _fail(framework, message, ctx, fix)


# ------------------------------------------------------------------------------------- nearest valid choices
def _with_batch(ctx: RuleContext, *, prompts: int | None = None, group: int | None = None) -> RuleContext | None:
    """``ctx`` with another prompts-per-rollout or group size, keeping the updates per rollout."""
    b = ctx.batch
    try:
        batch = RLBatch.from_updates(prompts_per_rollout=prompts or b.prompts_per_rollout,
                                     group_size=group or b.group_size, updates_per_rollout=b.updates_per_rollout,
                                     epochs=b.epochs, reference_refresh_updates=b.reference_refresh_updates)
    except RLBatchError:
        return None
    return dataclasses.replace(ctx, batch=batch)


def _ok(framework: str, ctx: RuleContext | None) -> bool:
    return ctx is not None and violation(framework, ctx) is None


def nearest_choices(framework: str, ctx: RuleContext) -> str:
    """The closest GPU counts, group sizes and prompts per rollout that satisfy every rule (others unchanged)."""
    options: list[str] = []
    step = ctx.gpus_per_node if ctx.gpus >= ctx.gpus_per_node else 1
    gpu_candidates = [g for g in range(step, 2 * ctx.gpus + step, step) if g != ctx.gpus]
    gpu_candidates += [d for d in divisors(ctx.gpus_per_node) if d < step]
    gpus = [g for g in gpu_candidates
            if _ok(framework, dataclasses.replace(ctx, gpus=g, rollout_gpus=None if ctx.rollout_gpus is None else g))]
    if gpus:
        options.append("--gpus " + " or ".join(map(str, nearest(gpus, ctx.gpus))))
    b = ctx.batch
    groups = [g for g in range(2, 4 * b.group_size + 1) if g != b.group_size and _ok(framework, _with_batch(ctx, group=g))]
    if groups:
        options.append("--group-size " + " or ".join(map(str, nearest(groups, b.group_size))))
    prompts = [p for p in range(1, 2 * b.prompts_per_rollout + 1)
               if p != b.prompts_per_rollout and _ok(framework, _with_batch(ctx, prompts=p))]
    if prompts:
        options.append("--prompts-per-rollout " + " or ".join(map(str, nearest(prompts, b.prompts_per_rollout))))
    if not options:
        return "no GPU count, group size or prompts per rollout near these values satisfies it; change the updates per rollout"
    return "nearest valid: " + "; ".join(options) + f" (updates per rollout {b.updates_per_rollout} kept)"
