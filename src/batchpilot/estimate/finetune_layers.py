"""Fine-tuning over a stage's layers: the frozen prefix and the first trainable layer (what they need not save),
and the CPU kernels' documented extra (:func:`cpu_step_extra_bytes`) — the part of
:mod:`batchpilot.estimate.finetune` that reads the activation terms (kept apart so that
:mod:`batchpilot.estimate.activations` can call :mod:`batchpilot.estimate.finetune` without a cycle).

    >>> from batchpilot.specs.model import load_model
    >>> from batchpilot.specs.settings import RunSettings
    >>> from batchpilot.specs.finetune import parse_finetune
    >>> s = RunSettings(precision="fp32", finetune=parse_finetune("lora,dropout=0.1"))
    >>> cpu_step_extra_bytes(load_model("tiny-llama-1m"), s, micro_batch=1, seq_len=8) > 0   # CPU dropout noise
    True
"""

from __future__ import annotations

from dataclasses import replace

from batchpilot.estimate.activations import LayerBytes, activation_terms, layer_policies
from batchpilot.estimate.finetune import FIRST_LAYER_UNNEEDED, adjust_layer_terms, trainable_layers
from batchpilot.specs.model import ModelSpec
from batchpilot.specs.settings import RunSettings


def stage_layers(layers: list[LayerBytes], model: ModelSpec, settings: RunSettings, *, first: bool,
                 seq_len: int) -> list[LayerBytes]:
    """The layers of a stage in forward order: the frozen prefix saves nothing and runs no backward; the first
    trainable layer's input needs no gradient (its attention norm saves nothing, nor is its input kept)."""
    ft = settings.finetune
    if not first or not (ft.adapters or ft.frozen_layers):
        return layers
    k = min(ft.frozen_layers, len(layers))
    out = [replace(lb, saved=0.0, backward=0.0) for lb in layers[:k]]
    if k < len(layers):
        lb = layers[k]
        policy = layer_policies(settings, len(layers))[k]
        terms = activation_terms(model, settings, seq_len=seq_len, policy="none")
        unneeded = 0.0 if policy in ("full", "op") else sum(
            v for name, v in terms.items() if name in FIRST_LAYER_UNNEEDED)
        out.append(LayerBytes(saved=max(0.0, lb.saved - unneeded), backward=max(0.0, lb.backward - unneeded),
                              forward_transient=lb.forward_transient))
    return out + layers[k + 1:]



def cpu_step_extra_bytes(model: ModelSpec, settings: RunSettings, *, micro_batch: int, seq_len: int) -> float:
    """Bytes a real CPU step saves beyond the (GPU) analytic terms at the start of backward: dropout's noise
    tensors and QLoRA's per-adapter input casts under CPU autocast (:func:`adjust_layer_terms` with ``cpu``)."""
    if not settings.finetune.adapters or settings.recompute in ("op", "full"):
        return 0.0
    full = replace(settings, finetune=replace(settings.finetune, method="full"), param_dtype="bf16") \
        if settings.precision == "bf16" else replace(settings, finetune=replace(settings.finetune, method="full"))
    base = activation_terms(model, full, seq_len=seq_len, policy="none")
    gpu = adjust_layer_terms(base, model, settings, "none", settings.tp)
    cpu = adjust_layer_terms(base, model, settings, "none", settings.tp, cpu=True)
    per_token = (sum(cpu.values()) - sum(gpu.values())) * trainable_layers(model, settings.finetune)
    per_token -= sum(cpu.get(k, 0.0) - gpu.get(k, 0.0) for k in FIRST_LAYER_UNNEEDED)
    return per_token * micro_batch * seq_len
