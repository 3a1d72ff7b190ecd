"""torchrun worker: several runner configurations in one launch (one process group), each rank's results saved.

    torchrun --nproc-per-node N tests/train/parallel_worker.py CASES.json RESULTS

``CASES.json``: a list of ``{"name", "config" (TrainConfig.to_dict()), "measure_after" (optional: the step after
which the CPU allocator's peak is measured, torch profiler with profile_memory as
batchpilot.measure.cpu_peak does), "start_memory" (optional: only build the Trainer and report the peak RSS
over the post-import baseline)}``. Writes ``RESULTS.rankR`` (JSON): per case the metrics records (rank 0), the
measured peak bytes, the world size and the layout.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from batchpilot.measure.cpu_peak import allocation_records, flatten_events, live_bytes
from batchpilot.train.config import TrainConfig
from batchpilot.train.distributed import exit_skipping_teardown, init_distributed, shutdown
from batchpilot.train.hooks import BaseHook
from batchpilot.train.loop import Trainer
from batchpilot.train.metrics import read_metrics

MARK = "measured-steps"


class _MeasureAfter(BaseHook):
    """Opens the profiler's ``measured-steps`` range once step ``after`` has ended (steady state: optimizer
    state exists, DDP rebuilt its buckets)."""

    name = "measure_after"

    def __init__(self, after: int) -> None:
        self.after, self.range = after, record_function(MARK)

    def on_step_end(self, record: dict[str, Any]) -> None:
        if record["step"] == self.after:
            self.range.__enter__()


def _peak_since_mark(prof: Any) -> int:
    events = flatten_events(prof.profiler.kineto_results.experimental_event_tree())
    start = min(e.start_time_ns for e in events if e.name == MARK)
    return max(current for time_ns, current in live_bytes(allocation_records(events)) if time_ns >= start)


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _run(case: dict[str, Any], env: Any) -> dict[str, Any]:
    config = TrainConfig.from_dict(case["config"])
    result: dict[str, Any] = {"world": env.world_size}
    if case.get("start_memory"):
        baseline = _rss_bytes()
        trainer = Trainer(config, env)
        result["start_rss_over_baseline_bytes"] = _rss_bytes() - baseline
        result["params_local"] = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                                     for p in trainer.model.parameters())
        return result
    after = case.get("measure_after")
    if after is None:
        Trainer(config, env).train()
    else:
        hook = _MeasureAfter(after)
        gc.collect()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            Trainer(config, env, hooks=[hook]).train()
            hook.range.__exit__(None, None, None)
        result["peak_bytes"] = _peak_since_mark(prof)
    if env.is_main:
        result["records"] = read_metrics(Path(config.run.out) / "metrics.jsonl")
    return result


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    cases = json.loads(Path(argv[0]).read_text())
    env = init_distributed(expected_world_size=int(os.environ["WORLD_SIZE"]), device="cpu")
    results = {case["name"]: _run(case, env) for case in cases}
    Path(f"{argv[1]}.rank{env.rank}").write_text(json.dumps(results))
    shutdown()
    return 0


if __name__ == "__main__":
    exit_skipping_teardown(main(sys.argv[1:]))
