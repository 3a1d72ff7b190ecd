"""The runner's default gradient-noise measurement: B_simple on every ordinary training run.

Examples (CPU-sized)::

    batchpilot train --global-batch 16 --micro-batch 4            # measures one step in 4 (the default)
    batchpilot train --global-batch 16 --micro-batch 4 --noise-every 1
    batchpilot train --global-batch 16 --micro-batch 4 --no-noise  # same as --noise-every 0

The :class:`~batchpilot.train.loop.Trainer` installs a :class:`~batchpilot.train.adaptive.NoiseScaleHook`
(McCandlish et al. 2018, App. A.1: B_small = one micro-batch, B_big = the global batch) unless

- ``--noise-every 0`` / ``--no-noise``;
- a noise hook is already installed — the adaptive schedule's, or one a caller passed (``batchpilot noise``):
  never two, and the summary reports that hook's estimate;
- tensor parallelism is on (``--tp`` > 1): each rank's micro-batch gradient is split over the
  tensor-parallel group (``--batch-schedule adaptive`` with ``--tp`` > 1 is refused in
  :mod:`batchpilot.train.validate` for the same reason). Under FSDP2 it is measured: the micro-batch
  norms on the unsharded parameters, the global one from the shards (:mod:`batchpilot.train.grad_norms`);
- every step has exactly one micro-batch in total (accumulation × dp = 1): then B_small = B_big and
  nothing can be estimated. Where only some steps do (a ramp's first batches, token-budget batching),
  the hook is installed and leaves those steps out.

The hook only reads gradients (tensor hooks that take a norm, and ``p.grad`` before clipping): losses and
weights are bit-identical with and without it (``tests/train/test_train_noise_default.py``). It is
appended *after* the caller's and the schedule's hooks, so the positions of their states in a checkpoint's
``hooks`` list do not depend on it, and its own state (the EMAs) is restored on resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from batchpilot.records.train_summary import TrainNoiseScale
from batchpilot.train.adaptive import NoiseScaleHook
from batchpilot.train.config import TrainConfig
from batchpilot.train.hooks import TrainHook
from batchpilot.train.validate import StaticPlan


@dataclass(frozen=True, kw_only=True, slots=True)
class NoiseSetup:
    """What the runner decided about measuring the noise scale."""

    hook: NoiseScaleHook | None
    """The hook the runner added (None when it added none: off, or another noise hook is installed)."""
    note: str
    """One line for ``summary.json``: how the noise scale is measured, or why it is not."""


def _single_micro_batch(config: TrainConfig, plan: StaticPlan, world_size: int) -> int | None:
    """The global batch when every step is exactly one micro-batch on one rank (else None)."""
    bc = config.batch
    if world_size > 1 or bc.batching == "token-budget":
        return None
    planned = plan.schedule.planned_batches()
    if not planned or max(planned) > bc.micro_batch_sequences:
        return None
    return max(planned)


def default_noise_hook(config: TrainConfig, plan: StaticPlan, world_size: int,
                       installed: Sequence[TrainHook]) -> NoiseSetup:
    """Decide whether the runner measures B_simple by default (see the module doc for the rules)."""
    every = config.run.noise_every
    if any(isinstance(h, NoiseScaleHook) for h in installed):
        return NoiseSetup(hook=None, note="measured by the noise hook already installed (adaptive schedule or caller)")
    if every == 0:
        return NoiseSetup(hook=None, note="off (--noise-every 0 / --no-noise)")
    if config.parallel.tp > 1:
        return NoiseSetup(hook=None, note=f"off: tensor parallelism (--tp {config.parallel.tp}) splits each rank's "
                                          f"micro-batch gradient; run with --tp 1 to measure it")
    single = _single_micro_batch(config, plan, world_size)
    if single is not None:
        micro = config.batch.micro_batch_sequences
        return NoiseSetup(hook=None, note=f"off: each step is one micro-batch (global batch {single} = micro-batch "
                                          f"{micro} × 1 rank), so B_small = B_big; use --micro-batch "
                                          f"{max(1, single // 2)} or smaller to measure it")
    return NoiseSetup(hook=NoiseScaleHook(every=every, skip_single_micro_batch=True),
                      note=f"measured on one step in {every} (micro-batch vs global batch)")


def noise_summary(setup: NoiseSetup, hooks: Sequence[TrainHook]) -> TrainNoiseScale:
    """``summary.json``'s ``noise_scale``: the last estimate (B_simple in sequences and tokens, its 95% band,
    steps measured) of the first noise hook, with ``every`` and ``note``; only those two when none measured."""
    hook = next((h for h in hooks if isinstance(h, NoiseScaleHook)), None)
    if hook is None:
        return TrainNoiseScale(every=0, note=setup.note)
    return TrainNoiseScale(every=hook.every, note=setup.note,
                           estimate=hook.last.to_record() if hook.last is not None else None)
