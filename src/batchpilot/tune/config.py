"""``batchpilot tune`` settings (the run directory's stage log is :mod:`batchpilot.records.tune_state`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from batchpilot.errors import BatchpilotError
from batchpilot.records.tune_state import TuneSettings
from batchpilot.specs.settings import RunSettings

STAGES: tuple[str, ...] = ("probe", "memory", "noise", "plan", "verify", "report")
"""The stages, in order. ``memory`` draws the analytic and traced curves at the probed sizes."""

#: Share of the time budget each timed stage may use (the rest is start-up, planning and the report).
TIME_SHARES: dict[str, float] = {"probe": 0.40, "memory": 0.05, "noise": 0.20, "verify": 0.30}


@dataclass(frozen=True, kw_only=True, slots=True)
class TuneConfig:
    """What ``tune`` measures, plans and proves."""

    model: str = "tiny-llama-1m"
    """Preset name or config.json."""
    data: str = "stdlib"
    """Training data for the noise and verification stages (see ``batchpilot train --data``)."""
    tokenizer: str = "bytes"
    seq_len: int = 256
    device: Literal["auto", "cpu", "cuda"] = "auto"
    memory_budget_bytes: int | None = None
    """Probe budget; None: the device's memory on CUDA, :data:`CPU_DEFAULT_BUDGET_BYTES` on CPU."""
    settings: RunSettings = field(default_factory=lambda: RunSettings(precision="fp32", attention="flash"))
    gpu: str | None = None
    """Target accelerator (catalog name or file) for a cluster plan, besides the local device's."""
    gpus: int | None = None
    gpus_per_node: int = 8
    engine: str = "batchpilot"
    """The engine the cluster plan is for (``plan --engine``): by default batchpilot's runner, the one ``tune``
    measures and verifies with, whose ``torchrun`` export launches the same training on the cluster."""
    train_tokens: int | None = None
    """Planned training tokens: the cluster plan's global batch then also shows the scaling-law prior."""
    time_budget_s: float = 300.0
    out: Path = Path("runs/tune")
    skip: tuple[str, ...] = ()
    """Stages not to run."""
    reuse: bool = False
    """Reuse a stage's record already in ``out`` instead of running it again."""
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [s for s in self.skip if s not in STAGES]
        if unknown:
            raise BatchpilotError(f"--skip {','.join(unknown)}: unknown stage; stages are {', '.join(STAGES)}")
        if (self.gpu is None) != (self.gpus is None):
            raise BatchpilotError("give --gpu and --gpus together (the target cluster), or neither")
        if self.gpus is not None and (self.gpus < 1 or self.gpus_per_node < 1):
            raise BatchpilotError(f"--gpus {self.gpus} and --gpus-per-node {self.gpus_per_node} must be positive")
        if self.gpus is not None and self.gpus % min(self.gpus_per_node, self.gpus):
            raise BatchpilotError(f"--gpus {self.gpus} is not a multiple of --gpus-per-node {self.gpus_per_node}; "
                                  f"use a multiple of {self.gpus_per_node} GPUs")
        if self.seq_len < 2:
            raise BatchpilotError(f"--seq-len {self.seq_len} must be at least 2")
        if self.time_budget_s < 30:
            raise BatchpilotError(f"--time-budget {self.time_budget_s:.0f}s is too short; give at least 30s")

    def stage_seconds(self, stage: str) -> float:
        return self.time_budget_s * TIME_SHARES.get(stage, 0.05)

    def to_record(self) -> TuneSettings:
        """The settings as ``tune.json`` records them."""
        return TuneSettings(model=self.model, data=self.data, seq_len=self.seq_len, device=self.device,
                            memory_budget_bytes=self.memory_budget_bytes, settings=self.settings, gpu=self.gpu,
                            gpus=self.gpus, time_budget_s=self.time_budget_s, skip=self.skip, reuse=self.reuse,
                            seed=self.seed)


CPU_DEFAULT_BUDGET_BYTES = 1 << 30
"""CPU probe budget when none is given: 1 GiB keeps the demo's trials to seconds each; pass
``--memory-budget`` for the real limit of a job."""
