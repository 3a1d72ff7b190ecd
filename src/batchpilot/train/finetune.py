"""Fine-tuning in the runner: ``batchpilot train --finetune lora,r=16`` trains PEFT adapters over the frozen model
(:func:`batchpilot.measure.finetune.apply_finetune`, the probe's and the estimates' own code), on one process or
under DDP; frozen layers (``full,frozen-layers=N``) too. The optimizer then holds only the trainable parameters
(:func:`batchpilot.measure.step.param_groups`).

Example (CPU, under a minute)::

    batchpilot train --model tiny-llama-1m --finetune lora,r=8 --steps 20 --global-batch 8 --seq-len 128 \\
        --no-noise --out runs/lora

Sharded runs (FSDP2, tensor parallelism) build the model on the meta device and shard it before any weights
exist; adapters are not wrapped into that path: one line says so. QLoRA runs where bitsandbytes' 4-bit kernels do
(CPU and CUDA; ``--precision bf16``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from batchpilot.errors import SpecError
from batchpilot.measure.finetune import apply_finetune
from batchpilot.specs.finetune import FULL, parse_finetune

if TYPE_CHECKING:
    from torch import nn


def check_layout(finetune: str, *, sharded: bool) -> None:
    """Refuse ``--finetune`` (other than ``full``) with a sharded layout, in one line."""
    if sharded and parse_finetune(finetune) != FULL:
        raise SpecError(f"--finetune {finetune} runs on one process or under DDP; drop --fsdp/--tp (FSDP2 and tensor "
                        f"parallelism shard the model before PEFT could wrap it)")


def prepare_module(module: nn.Module, finetune: str, *, precision: str) -> nn.Module:
    """``module`` with ``--finetune`` applied (``full``: unchanged)."""
    ft = parse_finetune(finetune)
    return module if ft == FULL else apply_finetune(module, ft, precision=precision, param_dtype="fp32")
