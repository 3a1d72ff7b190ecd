"""The model to train: a real ``transformers`` causal LM, randomly initialised or loaded from disk.

- a preset name (``tiny-llama-1m``) or a ``config.json`` → :func:`batchpilot.measure.step.build_module`
  (``AutoModelForCausalLM.from_config`` in fp32 under ``torch.manual_seed(seed)``: the module the probe
  and the estimates build, and the same weights on every rank);
- a directory with ``config.json`` and ``*.safetensors`` → ``from_pretrained(local_files_only=True,
  use_safetensors=True, trust_remote_code=False)`` unless the user opts in to remote code;
- a ``batchpilot train`` run folder → the run's recorded model rebuilt as above, then only the weights of
  its newest good checkpoint (:mod:`batchpilot.train.run_folder`); ``source`` is ``run:DIR@step-NNNNNNNN``.

Weights are kept in fp32 (master weights); bf16/fp16 come from autocast or FSDP2's mixed-precision policy.

``empty=True`` builds the same architecture on the meta device (no storage, no weights read): what every
rank of a sharded run (FSDP2, tensor parallelism) builds before ``to_empty``; rank 0 alone builds the
real weights (:func:`batchpilot.train.parallelize.load_full_weights`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from batchpilot.errors import SpecError
from batchpilot.measure.step import build_module
from batchpilot.specs.model import load_model
from batchpilot.train.checkpoint import load_model_weights
from batchpilot.train.config import ModelConfig
from batchpilot.train.run_folder import base_model, is_run_folder


@dataclass(frozen=True, kw_only=True, slots=True)
class BuiltModel:
    """A model ready to train and the limits the data must respect."""

    module: nn.Module
    vocab_size: int
    """Rows of the input embedding: every token id must be below this."""
    max_positions: int
    """``max_position_embeddings``: the longest sequence the model accepts."""
    num_params: int
    source: str
    """``random-init``, ``pretrained`` or ``run:DIR@step-NNNNNNNN`` (the checkpoint whose weights were loaded)."""


def _is_pretrained_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def build_model(config: ModelConfig, *, seed: int, empty: bool = False) -> BuiltModel:
    """Build the model named by ``--model`` (see the module docstring); ``empty``: on the meta device."""
    if is_run_folder(config.model):
        return _from_run_folder(config, seed=seed, empty=empty)
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(config.model)
    extra: dict[str, Any] = {}
    if config.attn_implementation:
        extra["attn_implementation"] = config.attn_implementation
    module: Any
    if _is_pretrained_dir(path):
        try:
            if empty:
                hf = AutoConfig.from_pretrained(str(path), local_files_only=True,
                                                trust_remote_code=config.trust_remote_code)
                with torch.device("meta"):
                    module = AutoModelForCausalLM.from_config(hf, dtype=torch.float32,
                                                              trust_remote_code=config.trust_remote_code, **extra)
            else:
                module = AutoModelForCausalLM.from_pretrained(
                    str(path), local_files_only=True, use_safetensors=True, dtype=torch.float32,
                    trust_remote_code=config.trust_remote_code, **extra)
        except (OSError, ValueError) as exc:
            raise SpecError(f"model directory {config.model!r} cannot be loaded: {' '.join(str(exc).split())[:200]}") from None
        source = "pretrained"
    else:  # the one training step's module (batchpilot.measure.step), as the probe builds it
        with torch.device("meta") if empty else contextlib.nullcontext():
            module = build_module(load_model(config.model).hf_config, name=config.model,
                                  attn_implementation=config.attn_implementation, seed=seed)
        source = "random-init"
    cfg = module.config
    embedding: Any = module.get_input_embeddings()
    return BuiltModel(
        module=module, vocab_size=int(embedding.weight.shape[0]),
        max_positions=int(getattr(cfg, "max_position_embeddings", 0) or getattr(cfg, "n_positions", 0)),
        num_params=sum(p.numel() for p in module.parameters()), source=source,
    )


def _from_run_folder(config: ModelConfig, *, seed: int, empty: bool) -> BuiltModel:
    """The run's architecture (its recorded ``--model``, followed to the base of a chain) with the weights of
    its newest checkpoint that passes its checksums; the fallback warning is rank 0's alone."""
    built = build_model(dataclasses.replace(config, model=base_model(config.model)), seed=seed, empty=empty)
    if empty:
        return dataclasses.replace(built, source=f"run:{Path(config.model)}")
    used = load_model_weights(Path(config.model), built.module, warn=os.environ.get("RANK", "0") == "0")
    return dataclasses.replace(built, source=f"run:{Path(config.model)}@{used.name}")
