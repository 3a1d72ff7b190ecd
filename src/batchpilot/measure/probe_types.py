"""What a probe is asked: the request, the settings it can run, one trial's plain-value spec, the runner protocol.

What it reports is a record (:class:`batchpilot.records.probe.ProbeResult` of
:class:`batchpilot.records.probe.ProbeTrial`). Plain values with no torch import, shared by the orchestration (:mod:`batchpilot.measure.probe`), the
prediction (:mod:`batchpilot.measure.predict`), the trial runners (:mod:`batchpilot.measure.cpu_runner`,
:mod:`batchpilot.measure.cuda_runner`) and the calibration (:mod:`batchpilot.measure.calibrate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from batchpilot.errors import BatchpilotError
from batchpilot.measure.search import DEFAULT_CAP
from batchpilot.records.probe import ProbeTrial
from batchpilot.specs.finetune import format_finetune

if TYPE_CHECKING:
    from batchpilot.specs.model import ModelSpec
    from batchpilot.specs.settings import RunSettings

Device = Literal["cpu", "cuda"]

DEFAULT_TRIAL_TIMEOUT_S = 1800.0
TIMEOUT_ERROR_PREFIX = "trial ran past --trial-timeout"
"""How a timed-out trial's ``error`` starts (the report and the nothing-fits message recognise it)."""


class ProbeError(BatchpilotError):
    """A probe trial failed for a reason other than memory (crash, timeout, unsupported setting)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ProbeRequest:
    """What to probe: model, settings, sequence length, device and budget."""

    model: ModelSpec
    settings: RunSettings
    seq_len: int
    """Worst-case sequence length of the data (see :func:`worst_case_seq_len`)."""
    device: Device = "cpu"
    budget_bytes: int
    """CPU: memory allowed above the trial process's baseline (imports, model, optimizer object).
    CUDA: the caching allocator's cap (everything the step allocates, model included)."""
    warmup_steps: int = 1
    """Untimed full steps first. The optimizer state is created before them, inside the budget
    (:func:`batchpilot.measure.step.materialise_optimizer_state`), so every step holds state, gradients
    and activations."""
    timed_steps: int = 1
    """Timed full steps after the warm-up. A size fits when all ``warmup + timed`` (≥ 2) steps ran: the
    second step's peak can exceed the first's (glibc's small-allocation heap grows between steps; measured
    in :mod:`batchpilot.measure._trial`'s docstring), so one step is not a fit."""
    knee: bool = True
    """Add the halving ladder below the maximum to locate the throughput knee."""
    trial_timeout_s: float = DEFAULT_TRIAL_TIMEOUT_S
    cap: int = DEFAULT_CAP
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("seq_len", "budget_bytes", "warmup_steps", "timed_steps", "cap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BatchpilotError(f"probe {name} must be a positive integer, got {value!r}")
        if self.warmup_steps + self.timed_steps < 2:
            raise BatchpilotError(f"probe warmup {self.warmup_steps} + timed {self.timed_steps} steps < 2: a size "
                                  "fits only after a step with optimizer state; use 2 or more steps in all")
        if self.seq_len > self.model.max_position_embeddings:
            raise BatchpilotError(
                f"--seq-len {self.seq_len} exceeds {self.model.name}'s max_position_embeddings "
                f"{self.model.max_position_embeddings}; use --seq-len ≤ {self.model.max_position_embeddings}")
        check_supported(self.settings, self.device)


class TrialRunner(Protocol):
    """Runs one real trial of ``micro_batch`` sequences."""

    def __call__(self, micro_batch: int) -> ProbeTrial: ...


def check_supported(settings: RunSettings, device: str) -> None:
    """Settings a real single-device step can run here; the rest are one-line errors with the fix."""
    unsupported = {
        "precision": ("fp8",) if device == "cuda" else ("fp8", "fp16"),
        "optimizer": ("adamw-8bit", "adafactor"),
        "recompute": ("selective",),
    }
    for name, bad in unsupported.items():
        value = getattr(settings, name)
        if value in bad:
            raise ProbeError(f"probe cannot run --{name} {value} on {device} (needs a kernel stack that a "
                             f"plain PyTorch step does not have); probe with another --{name}")
    layout = {"tp": settings.tp, "pp": settings.pp, "ep": settings.ep, "zero": settings.zero_stage}
    if any(v not in (0, 1) for v in layout.values()) or settings.offload:
        raise ProbeError(f"probe runs one device without model sharding; got {layout}, offload="
                         f"{settings.offload}; probe with --tp 1 --pp 1 --ep 1 --zero 0 and no --offload")


def worst_case_seq_len(lengths: list[int], cap: int | None = None) -> int:
    """The longest sequence the data will present (clipped to ``cap``, the training sequence length)."""
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths):
        raise BatchpilotError(f"sequence lengths must be a non-empty list of positive integers, got {lengths[:5]}")
    longest = max(lengths)
    return min(longest, cap) if cap else longest


def trial_spec(request: ProbeRequest, micro_batch: int) -> dict[str, Any]:
    """The plain-value description of one trial (``_trial.TrialSpec`` fields)."""
    s = request.settings
    return dict(hf_config=dict(request.model.hf_config), seq_len=request.seq_len, micro_batch=micro_batch,
                device=request.device, budget_bytes=request.budget_bytes, precision=s.precision,
                recompute=s.recompute, recompute_every=s.recompute_every, attention=s.attention,
                optimizer=s.optimizer,
                warmup_steps=request.warmup_steps, timed_steps=request.timed_steps, seed=request.seed,
                param_dtype=s.param_dtype, finetune=format_finetune(s.finetune))
