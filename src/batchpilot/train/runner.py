"""``run(config)``: the one library entry point of the runner (the CLI and ``tune`` call it).

Examples (Python)::

    from batchpilot.train import TrainConfig, run
    summary = run(TrainConfig())                        # tiny-llama-1m on the stdlib corpus, CPU
    cfg = TrainConfig().replace(run={"steps": 20, "nproc": 2, "out": "runs/ddp"})
    run(cfg)                                            # the same under torchrun, 2 processes (gloo)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from batchpilot.records.train_summary import TrainSummary
from batchpilot.train.checkpoint import check_fresh_start
from batchpilot.train.config import TrainConfig
from batchpilot.train.distributed import LaunchError, init_distributed, launch_torchrun, shutdown
from batchpilot.train.hooks import TrainHook
from batchpilot.train.loop import RecordCallback, Trainer
from batchpilot.train.validate import check_static

ERROR_FILE = "error.txt"


def run(config: TrainConfig, *, hooks: Sequence[TrainHook] = (), on_record: RecordCallback | None = None) -> dict[str, Any]:
    """Train per ``config``; returns the summary (also written to ``OUT/summary.json``).

    With ``config.run.nproc > 1`` (or ``max_restarts > 0``) outside a launcher, torchrun is started here (hooks cannot cross the
    process boundary: pass them inside workers instead); under a launcher this process is one rank.
    """
    if (config.run.nproc > 1 or config.run.max_restarts > 0) and "WORLD_SIZE" not in os.environ:
        return _launch(config, on_record)
    env = init_distributed(expected_world_size=config.run.expected_world_size, device=config.run.device)
    try:
        trainer = Trainer(config, env, hooks=hooks, on_record=on_record)
        return trainer.train()
    finally:
        shutdown()


def _launch(config: TrainConfig, on_record: RecordCallback | None) -> dict[str, Any]:
    nproc = config.run.nproc
    check_static(config, nproc)  # bad input fails here, before any process starts
    out = Path(config.run.out)
    check_fresh_start(out, resume=config.run.resume)  # here too: a worker's refusal would only trigger a restart
    child = config.replace(run={"expected_world_size": nproc})
    error_file = out / ERROR_FILE
    error_file.unlink(missing_ok=True)
    code = launch_torchrun(child.to_dict(), nproc, out, on_record, max_restarts=config.run.max_restarts)
    if code != 0:
        if error_file.exists():
            raise LaunchError(error_file.read_text(encoding="utf-8").strip())
        raise LaunchError(f"torchrun with {nproc} processes exited with code {code}"
                          + (f" after {config.run.max_restarts} restarts" if config.run.max_restarts else "")
                          + "; see the workers' output above")
    error_file.unlink(missing_ok=True)  # an attempt that failed before a restart succeeded
    return TrainSummary.load(out / "summary.json").to_dict()  # rank 0 wrote it; read through its loader
