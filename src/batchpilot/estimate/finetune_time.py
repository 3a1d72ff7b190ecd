"""Step time of fine-tuning: what a frozen base skips and what adapters and 4-bit weights add, applied to the
per-op layer times of :mod:`batchpilot.estimate.layer_time` through one-line hooks in
:mod:`batchpilot.estimate.steptime`.

    >>> from batchpilot.specs.finetune import parse_finetune
    >>> from batchpilot.specs.model import load_model
    >>> from batchpilot.specs.settings import RunSettings
    >>> qwen = load_model("qwen2.5-7b")
    >>> round(reduced_params(qwen, RunSettings(finetune=parse_finetune("lora,r=16")), qwen.params_total) / 1e6, 1)
    40.4

- **Frozen linears** (LoRA, QLoRA, the frozen head): backward computes the input gradient only — the weight
  gradient GEMM (half of each linear's backward GEMM time, :meth:`_Timer.gemm`'s ``dgrad + wgrad``) is not run.
- **Adapters**: ``lora_A`` (r × in) and ``lora_B`` (out × r) are thin GEMMs bound by memory traffic, not FLOPs:
  forward reads the input and writes r-wide, then reads r-wide and writes the output, which is added to the
  base output (read twice, written once); backward reads the incoming gradient twice (B's two GEMMs), writes the
  input gradient and adds it to the base's, and reads the input again for A's weight gradient. Bytes per token
  per adapted linear: forward ``(in + 4·out)·a``, backward ``(3·in + 2·out)·a`` (a = 2 bytes, 4 in fp32); 5
  kernels forward and 7 backward, each at least the host's launch time in eager mode (PEFT runs unfused).
- **QLoRA**: each 4-bit weight is dequantized to bf16 before its matmul, forward and again in backward
  (bitsandbytes ``MatMul4Bit``): reads 4.127/8 bytes and writes 2 per weight, every micro-batch.
- **Frozen layers**: the frozen prefix runs forward only (nothing below needs a gradient).
- **Data parallelism and the optimizer**: only trainable parameters are reduced and updated (an FSDP/ZeRO-3
  all-gather of a frozen base is still counted as the full model's, an overestimate of that traffic).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from batchpilot.estimate import finetune
from batchpilot.estimate.layer_time import HOST_LAUNCH_S, LayerTimes, Parts, Shape

if TYPE_CHECKING:
    from batchpilot.estimate.kernels import KernelProfile
    from batchpilot.specs.hardware import AcceleratorSpec
    from batchpilot.specs.model import ModelSpec
    from batchpilot.specs.settings import RunSettings

#: Kernels PEFT launches per adapted linear (dropout off): forward A, B, scale, add (+ the input cast); backward
#: the four GEMMs of A and B, the scale's and the add's gradients and the input-gradient accumulation.
ADAPTER_KERNELS_FORWARD = 5
ADAPTER_KERNELS_BACKWARD = 7


def reduced_params(model: ModelSpec, settings: RunSettings, dense_params: float) -> float:
    """Parameters whose gradients are reduced and whose optimizer step runs (of ``dense_params``)."""
    ft = settings.finetune
    if not (ft.adapters or ft.frozen_layers):
        return dense_params
    return float(finetune.trainable_params(model, ft)) * dense_params / model.params_total if not ft.adapters \
        else float(finetune.adapter_params(model, ft))


def _frozen_backward(times: LayerTimes) -> LayerTimes:
    """A layer whose linears are frozen: the weight-gradient half of each backward GEMM is skipped."""
    b = times.backward
    backward = replace(b, gemm=b.gemm / 2, gemm_flops=b.gemm_flops / 2, kernels=b.kernels - b.kernels / 2)
    return LayerTimes(forward=times.forward, backward=backward, attention_forward=times.attention_forward)


def _adapter_parts(model: ModelSpec, settings: RunSettings, sh: Shape, hbm: float,
                   adapted: bool = True) -> tuple[Parts, Parts]:
    """Forward and backward time of one layer's adapters (when ``adapted``) and QLoRA's dequantization."""
    ft = settings.finetune
    a = 4.0 if settings.precision == "fp32" else 2.0
    fwd, bwd = Parts(), Parts()
    shapes = finetune.linear_shapes(model)
    tokens = sh.tokens
    for t in ft.targets if adapted else ():
        n_in, n_out = shapes[t]
        fwd.elementwise += tokens * (n_in + 4 * n_out) * a / sh.tp / hbm
        bwd.elementwise += tokens * (3 * n_in + 2 * n_out) * a / sh.tp / hbm
        fwd.kernels += ADAPTER_KERNELS_FORWARD
        bwd.kernels += ADAPTER_KERNELS_BACKWARD
    if ft.method == "qlora":
        weights = finetune.quantized_params_per_layer(model) / sh.tp
        dequant = weights * (finetune.nf4_bytes_per_param(double_quant=ft.double_quant) + 2.0) / hbm
        fwd.elementwise += dequant
        bwd.elementwise += dequant
        kernels = len(shapes)
        fwd.kernels += kernels
        bwd.kernels += kernels
    fwd.launch = fwd.kernels * HOST_LAUNCH_S
    bwd.launch = bwd.kernels * HOST_LAUNCH_S
    return fwd, bwd


def step_layers(layers: list[tuple[LayerTimes, float]], model: ModelSpec, settings: RunSettings, sh: Shape,
                accelerator: AcceleratorSpec, profile: KernelProfile) -> list[tuple[LayerTimes, float]]:
    """The stage's (layer times, count) list under fine-tuning: adapted layers (frozen GEMMs + adapters), and the
    frozen prefix forward only."""
    ft = settings.finetune
    if not (ft.adapters or ft.frozen_layers):
        return layers
    hbm = accelerator.memory_bandwidth_bytes_per_s * profile.memory_efficiency
    trained_share = finetune.trainable_layers(model, ft) / model.num_layers if settings.pp == 1 else 1.0
    out: list[tuple[LayerTimes, float]] = []
    for times, n in layers:
        trained = times
        if ft.adapters:
            fwd, bwd = _adapter_parts(model, settings, sh, hbm)
            frozen = _frozen_backward(times)
            trained = LayerTimes(forward=Parts().add(frozen.forward).add(fwd),
                                 backward=Parts().add(frozen.backward).add(bwd),
                                 attention_forward=frozen.attention_forward)
        out.append((trained, n * trained_share))
        if trained_share < 1.0:
            forward_only = times
            if ft.method == "qlora":
                fwd, _ = _adapter_parts(model, settings, sh, hbm, adapted=False)
                forward_only = replace(times, forward=Parts().add(times.forward).add(fwd))
            out.append((LayerTimes(forward=forward_only.forward, backward=Parts(),
                                   attention_forward=times.attention_forward), n * (1 - trained_share)))
    return out


def step_head(top: LayerTimes, settings: RunSettings) -> LayerTimes:
    """The output layer: frozen under LoRA/QLoRA (no weight gradient)."""
    return _frozen_backward(top) if settings.finetune.adapters else top
