"""A ``batchpilot train`` run folder as a model source: ``--model RUN_DIR``.

Examples::

    batchpilot train --steps 200 --out runs/base                       # a run folder
    batchpilot noise --model runs/base --json > noise.json             # B_simple at that checkpoint
    batchpilot train --model runs/base --batch-schedule steps:0=16,1M=64 --out runs/next

The gradient noise scale grows as the loss falls (McCandlish et al. 2018, §3 and Fig. 4), so the useful
measurement of the critical batch is at a checkpoint of the real run, not at random init.

A run folder is recognised by ``summary.json`` (written when a run ends or is stopped by a signal) or
``launch-config.json`` (written before torchrun starts) with no ``config.json`` beside them. Its model is
rebuilt from the run's own recorded ``config.model`` (a preset, a config.json, a pretrained directory, or
another run folder: a chain is followed to its base), then only the weights of the newest checkpoint that
passes its checksums are loaded (:func:`batchpilot.train.checkpoint.load_model_weights`, ``weights_only``).
It is not a resume: optimizer, scaler, RNG, step, data position and schedule state stay behind, so the
new run may use any batch schedule. The tokenizer must be the run's (a different vocabulary would give
the embedding rows other meanings).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchpilot.errors import BatchpilotError
from batchpilot.train.checkpoint import CHECKPOINTS, has_checkpoints
from batchpilot.train.config import DataConfig

RECORDS = ("summary.json", "launch-config.json")
"""Files of a run folder that record its config, read in this order."""
MAX_CHAIN = 32
"""Longest chain of run folders followed (a run started from a run started from a run…)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RunFolder:
    """What a run folder recorded about its model and tokenizer."""

    path: Path
    """The run folder (``--out`` of that run)."""
    record: str
    """The file the config was read from (``summary.json`` or ``launch-config.json``)."""
    model: str
    """The run's own ``--model``: a preset, a config.json, a pretrained directory or another run folder."""
    tokenizer: str
    """The run's ``--tokenizer``."""
    data: str
    """The run's ``--data`` (a ``bpe:`` tokenizer is trained on it)."""
    text_field: str
    """The run's ``--text-field``."""
    val_fraction: float
    """The run's validation share (it decides which documents the BPE was trained on)."""


def is_run_folder(model: str) -> bool:
    """Whether ``--model`` names a ``batchpilot train`` output folder (not a pretrained or config directory)."""
    path = Path(model)
    return (path.is_dir() and not (path / "config.json").exists()
            and (any((path / name).is_file() for name in RECORDS) or (path / CHECKPOINTS).is_dir()))


def read_run_folder(model: str) -> RunFolder:
    """The recorded config of run folder ``model``; one line when it has none that can be read."""
    path = Path(model)
    for name in RECORDS:
        file = path / name
        if not file.is_file():
            continue
        try:
            config: Any = json.loads(file.read_text(encoding="utf-8"))
            if name == "summary.json":
                config = config["config"]
            m, d = config["model"], config["data"]
            return RunFolder(path=path, record=name, model=str(m["model"]), tokenizer=str(d["tokenizer"]),
                             data=str(d["data"]), text_field=str(d.get("text_field", "text")),
                             val_fraction=float(d.get("val_fraction", DataConfig().val_fraction)))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BatchpilotError(f"--model {model!r}: {str(file)!r} does not hold a batchpilot train config "
                                  f"({type(exc).__name__}: {' '.join(str(exc).split())[:120]}); pass a folder "
                                  f"written by `batchpilot train --out`") from None
    raise BatchpilotError(f"--model {model!r} looks like a batchpilot run folder but has no {' or '.join(RECORDS)} "
                          f"recording its model; pass a folder written by `batchpilot train --out`, a preset, a "
                          f"config.json or a pretrained directory")


def _looks_like_path(model: str) -> bool:
    """The rule :func:`batchpilot.specs.model.load_model` uses to tell a path from a preset name."""
    return model.endswith(".json") or "/" in model or Path(model).exists()


def base_model(model: str) -> str:
    """The architecture behind ``--model``: itself unless a run folder, else the base of its recorded chain.

    A recorded path that no longer exists is one line (a relative one is read from the current directory,
    as the run did; nothing else is guessed).
    """
    seen: list[Path] = []
    while is_run_folder(model):
        if Path(model).resolve() in seen or len(seen) >= MAX_CHAIN:
            raise BatchpilotError(f"--model: the run folders {', '.join(map(str, seen))} record each other as their "
                                  f"model (a cycle); pass the base run folder instead")
        seen.append(Path(model).resolve())
        run = read_run_folder(model)
        if _looks_like_path(run.model) and not Path(run.model).exists():
            raise BatchpilotError(
                f"--model {str(run.path)!r}: the run's model {run.model!r} (recorded in {run.record}) no longer "
                f"exists, so its architecture is unknown; restore that file or folder at that path (relative to "
                f"the directory the run was started from) and run again")
        model = run.model
    return model


def _same_path(a: str, b: str) -> bool:
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def check_run_tokenizer(run: RunFolder, data: DataConfig) -> None:
    """The new run's tokenizer must be the run's: the same ``--tokenizer`` and, for a ``bpe:`` one (trained
    on the training split), the same data and split."""
    fix = f"pass --tokenizer {run.tokenizer}"
    if not _same_path(data.tokenizer, run.tokenizer):
        raise BatchpilotError(f"--model {str(run.path)!r} was trained with --tokenizer {run.tokenizer} but this run "
                              f"uses {data.tokenizer}, a different vocabulary; {fix}")
    if not run.tokenizer.startswith("bpe:"):
        return
    same_split = (_same_path(data.data, run.data) and data.text_field == run.text_field
                  and data.val_fraction == run.val_fraction)
    if not same_split:
        raise BatchpilotError(
            f"--model {str(run.path)!r} uses --tokenizer {run.tokenizer} trained on its data {run.data!r}; one trained "
            f"on {data.data!r} would be a different vocabulary; use --data {run.data} with the same split, or save "
            f"the tokenizer as a directory and train the base run with it")


def check_run_model(model: str, data: DataConfig) -> str:
    """Static checks of ``--model RUN_DIR`` (a checkpoint exists, the recorded model exists, the tokenizer is
    the run's) without reading weights; returns the architecture to build (``model`` itself otherwise)."""
    if not is_run_folder(model):
        return model
    run = read_run_folder(model)
    if not has_checkpoints(run.path):
        raise BatchpilotError(f"--model {model!r}: the run folder holds no checkpoint ({str(run.path / CHECKPOINTS)!r} "
                              f"is empty or missing); train it with a checkpoint, or pass another run folder")
    check_run_tokenizer(run, data)
    return base_model(model)
