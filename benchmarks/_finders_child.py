"""One batch-size finder, run whole in this process (``python -m benchmarks._finders_child SPEC_JSON``).

The harness (:mod:`benchmarks.probe_vs_finders`) starts this module in a fresh process per finder with
``MALLOC_MMAP_THRESHOLD_=131072`` in the environment. Every finder sees the same conditions: torch and
transformers imported, the model built (seeded), the thread pool started; then the process measures
its address-space size (``VmSize``) as the baseline and — for the in-process finders (Lightning,
Accelerate) — sets ``RLIMIT_AS = baseline + budget`` before the finder runs. batchpilot's probe sets
that limit in each of its trial processes instead (its own design). ``precision`` ``bf16`` runs every
finder's forward under CPU autocast (Lightning: ``precision="bf16-mixed"``).

The imports are not timed for any finder. batchpilot's trial processes fork from a server that imports
torch and transformers itself; it is started first thing here (``start_trial_server``, before this
process's own imports), as a caller that knows the model starts it, so its imports run alongside this
process's. Whatever wait for it remains is inside the timed probe call (``server_wait_s``: the first
trial's fork request to the fork's return, from the probe's phase trace).

Prints one JSON line: finder, size found, the sizes tried in order, and the finder call's wall time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import tempfile
import time
from typing import Any

if __name__ == "__main__" and json.loads(sys.argv[1])["finder"] == "batchpilot":
    from batchpilot.measure.cpu_runner import start_trial_server

    start_trial_server(json.loads(sys.argv[1])["hf_config"].get("model_type"))

import torch
import transformers

from batchpilot.measure._trial import _proc_status_bytes


def _model(spec: dict[str, Any]) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**spec["hf_config"])
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=spec["attn"])


def _limit(budget_bytes: int) -> int:
    torch.ones(256, 256) @ torch.ones(256, 256)  # thread pool up before the baseline, as in the probe
    baseline = _proc_status_bytes("VmSize")
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (baseline + budget_bytes, hard))
    return baseline


def _tokens(batch: int, spec: dict[str, Any]) -> torch.Tensor:
    return torch.randint(0, int(spec["hf_config"]["vocab_size"]), (batch, spec["seq_len"]))


def _autocast(spec: dict[str, Any]) -> Any:
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.get("precision", "fp32") == "bf16")


def run_accelerate(spec: dict[str, Any]) -> dict[str, Any]:
    """``accelerate.utils.find_executable_batch_size(starting_batch_size=128)`` around 2 full AdamW steps."""
    from accelerate.utils import find_executable_batch_size

    model = _model(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tried: list[int] = []

    @find_executable_batch_size(starting_batch_size=spec.get("accelerate_start", 128))
    def train(batch_size: int) -> int:
        tried.append(batch_size)
        x = _tokens(batch_size, spec)
        for _ in range(2):
            with _autocast(spec):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return batch_size

    _limit(spec["budget_bytes"])
    start = time.perf_counter()
    found = train()
    return {"found": found, "tried": tried, "seconds": time.perf_counter() - start}


def run_lightning(spec: dict[str, Any], mode: str) -> dict[str, Any]:
    """Lightning ``Tuner.scale_batch_size(mode=...)`` with its defaults (init 2, 3 steps per trial)."""
    import lightning.pytorch as pl
    from lightning.pytorch.tuner import Tuner
    from torch.utils.data import DataLoader, TensorDataset

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _model(spec)
            self.batch_size = 2
            self.tried: list[int] = []

        def train_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(_tokens(self.batch_size * 4, spec)), batch_size=self.batch_size)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if batch_idx == 0:
                self.tried.append(self.batch_size)
            x = batch[0]
            return self.model(input_ids=x, labels=x).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    module = Module()
    with tempfile.TemporaryDirectory() as root:
        precision = "bf16-mixed" if spec.get("precision") == "bf16" else "32-true"
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                             precision=precision)
        _limit(spec["budget_bytes"])
        start = time.perf_counter()
        found = Tuner(trainer).scale_batch_size(module, mode=mode)
        seconds = time.perf_counter() - start
    return {"found": found, "tried": module.tried, "seconds": seconds}


def run_batchpilot(spec: dict[str, Any]) -> dict[str, Any]:
    """``batchpilot.measure.probe.run_probe`` (search only; each trial sets its own RLIMIT_AS)."""
    from batchpilot.measure.probe import run_probe
    from batchpilot.measure.probe_types import ProbeRequest
    from batchpilot.measure.trace import TRACE_ENV
    from batchpilot.specs.model import load_model
    from batchpilot.specs.settings import RunSettings

    _model(spec)  # same warm state as the other finders (modeling module imported, allocator used)
    request = ProbeRequest(model=load_model(spec["model"]),
                           settings=RunSettings(precision=spec.get("precision", "fp32"), attention=spec["attention"]),
                           seq_len=spec["seq_len"], device="cpu", budget_bytes=spec["budget_bytes"], knee=False)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ[TRACE_ENV] = trace_path = os.path.join(tmp, "trace.jsonl")
        start = time.perf_counter()
        result = run_probe(request)
        seconds = time.perf_counter() - start
        os.environ.pop(TRACE_ENV)
        with open(trace_path, encoding="utf-8") as fh:
            events = [json.loads(line) for line in fh]
    return {"found": result.max_micro_batch, "tried": [t.micro_batch for t in result.trials],
            "seconds": seconds, "predicted": result.predicted_max_micro_batch, "server_wait_s": _server_wait(events),
            "trials": [dataclasses.asdict(t) for t in result.trials], "trace": events}


def _server_wait(events: list[dict[str, Any]]) -> float | None:
    """Seconds from the first trial's fork request to the fork's return (the fork server's readiness)."""
    times = {e["event"]: e["t"] for e in reversed(events) if e["event"] in ("spawn", "spawned")}
    return times["spawned"] - times["spawn"] if len(times) == 2 else None


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    finder = spec["finder"]
    try:
        if finder == "accelerate":
            out = run_accelerate(spec)
        elif finder in ("lightning-power", "lightning-binsearch"):
            out = run_lightning(spec, finder.split("-")[1])
        elif finder == "batchpilot":
            out = run_batchpilot(spec)
        else:
            raise SystemExit(f"unknown finder {finder!r}")
    except Exception as exc:  # a finder that crashes is a result too (e.g. no size found)
        out = {"found": None, "tried": [], "seconds": None, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    out["finder"] = finder
    sys.stdout.write("\n" + json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
