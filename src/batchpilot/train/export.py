"""Outputs beside ``metrics.jsonl``: the Hugging Face export of the final model, TensorBoard and W&B sinks.

Examples::

    batchpilot train --export-hf --out runs/demo          # runs/demo/hf: from_pretrained("runs/demo/hf") loads it
    batchpilot train --log tensorboard --out runs/demo    # tensorboard --logdir runs/demo/tb
    batchpilot train --log wandb --out runs/demo          # offline; wandb sync runs/demo/wandb/offline-run-*

:func:`export_hf` gathers the full state dict (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``:
rank 0 receives it, the others only take part in the gathers) and writes ``config.json`` and
``model.safetensors`` (``safetensors.torch.save_file``, ``{"format": "pt"}`` metadata as ``save_pretrained``
writes it; a tied output head is left out as ``transformers`` does), plus the tokenizer when it is a
Hugging Face one: ``tokenizer.json`` and its config (a ``bpe:`` trained here gets ``<|endoftext|>`` as its
EOS). The byte tokenizer has no Hugging Face form and is named in the export's ``batchpilot.json``.

Sinks (:func:`open_sinks`, rank 0): every numeric field of each ``metrics.jsonl`` record becomes a scalar
at its step — ``torch.utils.tensorboard.SummaryWriter`` in ``OUT/tb``, ``wandb`` in offline mode in
``OUT/wandb`` (never networked by the runner; needs the package).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from batchpilot.errors import BatchpilotError

HF_DIR = "hf"


def export_hf(model: nn.Module, module: nn.Module, out: Path, *, is_main: bool, tokenizer: Any,
              tokenizer_spec: str) -> Path:
    """Write ``out / "hf"`` from the trained ``model`` (wrapped or sharded; ``module``: the transformers
    model inside it, for its config). A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state: dict[str, Any] = dict(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                                      cpu_offload=True)))
    target = out / HF_DIR
    if not is_main:
        return target
    config: Any = module.config
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # transformers ties it again on load
    tmp = target.with_name(f".{HF_DIR}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    use_cache = config.use_cache
    config.use_cache = True  # the runner turns the K/V cache off for recomputation; inference wants it
    try:
        config.save_pretrained(str(tmp))
    finally:
        config.use_cache = use_cache
    _copy_tokenizer(tokenizer, tmp)
    (tmp / "batchpilot.json").write_text(json.dumps({"tokenizer": tokenizer_spec}), encoding="utf-8")
    if target.exists():
        shutil.rmtree(target)
    tmp.replace(target)
    return target


def _copy_tokenizer(tokenizer: Any, folder: Path) -> None:
    """A Hugging Face tokenizer's files into ``folder`` (nothing for ``bytes``)."""
    source = getattr(tokenizer, "path", None)
    if source is None:
        return
    source = Path(source)
    if source.is_file():  # a bpe: trained here (tokenizers JSON): GPT-2 style config around it
        from batchpilot.train.tokenizer import EOS_TEXT

        shutil.copyfile(source, folder / "tokenizer.json")
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TEXT, "bos_token": EOS_TEXT,
                  "unk_token": EOS_TEXT, "model_max_length": 1_000_000_000}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
        return
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                 "vocab.json", "merges.txt"):
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)


class MetricSink(Protocol):
    """Receives every ``metrics.jsonl`` record (rank 0)."""

    def write(self, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def _scalars(record: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(float(v))}


class TensorBoardSink:
    """``SummaryWriter(OUT/tb)``: one scalar per numeric field, at the record's step."""

    def __init__(self, out: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tb"))

    def write(self, record: Mapping[str, Any]) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, global_step=int(record["step"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """``wandb.init(mode="offline", dir=OUT)``: the run's config, then ``wandb.log`` per record."""

    def __init__(self, out: Path, config: Mapping[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise BatchpilotError("--log wandb needs the wandb package: pip install wandb (or drop wandb from --log)") from None
        self.wandb = wandb
        self.run = wandb.init(mode="offline", dir=str(out), project="batchpilot", config=dict(config))

    def write(self, record: Mapping[str, Any]) -> None:
        self.run.log(_scalars(record), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


def open_sinks(names: Sequence[str], out: Path, config: Mapping[str, Any]) -> list[MetricSink]:
    """The sinks ``--log`` names (:data:`batchpilot.train.config.LOG_SINKS`)."""
    sinks: list[MetricSink] = []
    for name in names:
        out.mkdir(parents=True, exist_ok=True)
        sinks.append(TensorBoardSink(out) if name == "tensorboard" else WandbSink(out, config))
    return sinks

