"""``tune --reuse``: read a stage's record instead of running the stage, only when it was made for this run.

A record is reusable when what it was measured or planned for (:func:`made_for`) matches what this run asks
(:func:`asked_for`) on every key both name: the model, the sequence length, the device, the data and the
run settings, the probe budget when ``--memory-budget`` is given, and the plan's target cluster (``--gpu``,
``--gpus``, ``--gpus-per-node``; none without them). Anything else is one line naming the
file, each differing value and the fix (a probe at 96 MiB says nothing about 1 GiB; a plan for bf16 is not
one for fp32).

    >>> _differences({"model": "a", "seq_len": 64}, {"model": "a", "seq_len": 128})
    ['seq_len 64 (now 128)']
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from batchpilot.errors import BatchpilotError
from batchpilot.records.base import Record
from batchpilot.records.memory_curve import MemoryCurve
from batchpilot.records.noise import NoiseRecord
from batchpilot.records.plan import PlanRecord
from batchpilot.records.probe import ProbeResult
from batchpilot.records.verify import VerifyRecord
from batchpilot.specs.settings import RunSettings
from batchpilot.tune.config import TuneConfig


class ReuseError(BatchpilotError):
    """A record in the run directory was made for another model, sequence length, device, data or settings."""


def _settings(settings: RunSettings) -> dict[str, Any]:
    return asdict(settings)


def _entry(config: dict[str, Any], section: str, key: str) -> Any:
    """``config[section][key]`` of a training config, None where the config does not hold it."""
    part = config.get(section)
    return part.get(key) if isinstance(part, dict) else None


def made_for(record: Record) -> dict[str, Any]:
    """What a stage record was made for, as comparable values."""
    if isinstance(record, ProbeResult):
        return {"model": record.model, "seq_len": record.seq_len, "device": record.device,
                "budget_bytes": record.budget_bytes, **_settings(record.settings)}
    if isinstance(record, MemoryCurve):
        return {"model": record.model, "seq_len": record.seq_len, "device": record.device,
                **_settings(record.settings)}
    if isinstance(record, NoiseRecord):
        return {"model": record.model, "seq_len": record.seq_len, "data": record.data}
    if isinstance(record, PlanRecord):
        cluster = record.cluster_plan.cluster if record.cluster_plan is not None else None
        return {"model": record.model, "seq_len": record.seq_len, **_settings(record.settings),
                "cluster": None if cluster is None else _cluster(cluster["accelerator"], cluster["total_devices"],
                                                                 cluster["devices_per_node"])}
    if isinstance(record, VerifyRecord):
        config = record.summary.config
        return {"model": _entry(config, "model", "model"), "seq_len": _entry(config, "data", "seq_len"),
                "data": _entry(config, "data", "data"), "precision": _entry(config, "optim", "precision")}
    raise TypeError(f"no reuse rule for a {type(record).__name__}")


def _cluster(accelerator: str, gpus: int, per_node: int) -> str:
    return f"{accelerator} × {gpus} ({per_node} per node)"


def asked_for(cfg: TuneConfig, device: str) -> dict[str, Any]:
    """What this run asks for, under the keys of :func:`made_for` (the probe budget only when given; the target
    cluster, None without ``--gpu``, which only the plan record names)."""
    cluster = None
    if cfg.gpu and cfg.gpus:
        from batchpilot.specs.hardware import load_accelerator

        cluster = _cluster(load_accelerator(cfg.gpu).name, cfg.gpus, min(cfg.gpus_per_node, cfg.gpus))
    asked: dict[str, Any] = {"model": cfg.model, "seq_len": cfg.seq_len, "device": device, "data": cfg.data,
                             **_settings(cfg.settings), "cluster": cluster}
    if cfg.memory_budget_bytes is not None:
        asked["budget_bytes"] = cfg.memory_budget_bytes
    return asked


def _differences(found: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    return [f"{key} {found[key]!r} (now {wanted[key]!r})" for key in wanted
            if key in found and found[key] != wanted[key]]


def check_reusable(stage: str, path: Path, record: Record, cfg: TuneConfig, device: str) -> None:
    """Refuse, in one line, a record made for something else than this run."""
    wanted = asked_for(cfg, device)
    if isinstance(record, VerifyRecord):  # the verification trains in the precision it can (fp8 runs as bf16)
        wanted["precision"] = cfg.settings.precision if cfg.settings.precision != "fp8" else "bf16"
    differences = _differences(made_for(record), wanted)
    if differences:
        raise ReuseError(f"--reuse: {str(path)!r} was made for {', '.join(differences)}; drop --reuse (or delete "
                         f"{path.name}) to run the {stage} stage again for this run")
