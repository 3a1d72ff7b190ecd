"""The train-summary record: what a training run did (``summary.json``, ``batchpilot train --json``).

The trainer (:meth:`batchpilot.train.loop.Trainer.train`) builds and saves it when a run ends or is stopped by
a signal; tune's verification stage and the report read it back with :meth:`TrainSummary.load`.

    >>> TrainNoiseScale(every=0, note="off").to_dict()
    {'every': 0, 'note': 'off'}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from batchpilot.records.base import JsonValue, Record, decode_dataclass, decode_key, to_json
from batchpilot.records.noise import NoiseScale

SCHEMA_VERSION = 1


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainNoiseScale(JsonValue):
    """``noise_scale``: how the run measured the gradient noise scale, and its last estimate.

    JSON: ``every`` and ``note``, then the estimate's keys (:class:`NoiseScale`) when one was made, else
    ``steps_measured: 0`` when a measuring hook ran but measured no step.
    """

    every: int
    """Optimizer steps between measurements; 0: not measured."""
    note: str
    """How it is measured, or why it is not."""
    estimate: NoiseScale | None = None
    """The last estimate of the run's first noise hook; None before a step was measured."""

    def json_encode(self) -> dict[str, Any]:
        """The ``noise_scale`` object (flat: the estimate's keys beside ``every`` and ``note``)."""
        data: dict[str, Any] = {"every": self.every, "note": self.note}
        if self.estimate is not None:
            data.update(to_json(self.estimate))
        elif self.every:
            data["steps_measured"] = 0
        return data

    @classmethod
    def json_decode(cls, data: dict[str, Any], path: str) -> TrainNoiseScale:
        """The inverse of :meth:`json_encode`."""
        estimate = decode_dataclass(NoiseScale, data, path) if "b_simple_sequences" in data else None
        return cls(every=decode_key(int, data, "every", path), note=decode_key(str, data, "note", path),
                   estimate=estimate)


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainSummary(Record):
    """A finished (or signal-stopped) training run."""

    SCHEMA_VERSION: ClassVar[int] = SCHEMA_VERSION
    KIND: ClassVar[str] = "train summary"
    RERUN: ClassVar[str] = ("run the training again (`batchpilot train --out DIR`, or `batchpilot tune` without "
                            "--reuse for its verification run)")

    steps: int
    """Optimizer steps done."""
    tokens: int
    """Input tokens consumed (padding excluded)."""
    target_tokens: int
    """Loss (target) tokens consumed."""
    final_loss: float | None
    """Loss of the last logged step."""
    val_loss: float | None
    """Validation loss at the end; null when stopped by a signal."""
    tokens_per_s: float | None
    """Input tokens per second over the timed steps (the first step's warm-up excluded)."""
    padding_fraction: float | None
    """Share of batch slots that were padding."""
    elapsed_s: float
    """Seconds spent in training steps."""
    peak_memory_bytes: int
    """CUDA: the allocator's peak; CPU: the process's peak resident set."""
    world_size: int
    """Ranks."""
    device: str
    """The torch device of rank 0."""
    model_params: int
    """Parameters of the model."""
    model_source: str
    """Where the weights came from (``random-init``, ``pretrained``, ``run:DIR@step-N``)."""
    tokenizer: str
    """The tokenizer's name."""
    train_documents: int
    """Documents in the training split."""
    val_documents: int
    """Documents in the validation split."""
    corpus_tokens: int
    """Tokens in the training corpus."""
    batch_schedule: str
    """The global-batch schedule, in its own syntax."""
    stopped_by_signal: str | None
    """The signal that stopped the run, if one did."""
    elastic_restarts: int
    """torchrun restarts before this attempt."""
    out: str
    """The run folder."""
    config: dict[str, Any]
    """The full training config (:meth:`batchpilot.train.config.TrainConfig.to_dict`)."""
    noise_scale: TrainNoiseScale
    """The gradient noise scale measured during the run."""
