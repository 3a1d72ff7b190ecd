"""batchpilot.train — run a batch plan with PyTorch: data, batching, accumulation, schedules, checkpoints.

Library entry point: :func:`run` (``batchpilot.train.run(TrainConfig(...)) -> summary dict``).
Seams for other components: :mod:`batchpilot.train.hooks` (``TrainHook``) and
:mod:`batchpilot.train.schedule` (``BatchSchedule``). Heavy modules are imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batchpilot.train.config import TrainConfig
    from batchpilot.train.runner import run

__all__ = ["TrainConfig", "run"]


def __getattr__(name: str) -> Any:
    if name == "run":
        from batchpilot.train.runner import run

        return run
    if name == "TrainConfig":
        from batchpilot.train.config import TrainConfig

        return TrainConfig
    raise AttributeError(name)
