"""Fine-tuning applied to a real module: frozen layers, LoRA through PEFT, QLoRA's 4-bit base through
bitsandbytes, and bitsandbytes' 8-bit and paged optimizers — the one place the probe, the traced estimate,
the CPU measurements and the trainer get them from (:func:`batchpilot.measure.step.build_step` calls
:func:`apply_finetune`).

Example (CPU, seconds; needs the ``finetune`` extra: ``pip install 'batchpilot[finetune]'``)::

    >>> from batchpilot.measure.step import build_module
    >>> from batchpilot.specs.finetune import parse_finetune
    >>> from batchpilot.specs.model import load_model
    >>> module = apply_finetune(build_module(load_model("tiny-llama-1m").hf_config),
    ...                         parse_finetune("lora,r=8"), precision="fp32", param_dtype="fp32")
    >>> sum(p.numel() for p in module.parameters() if p.requires_grad)   # 4 layers × Σ over 7 linears of r·(in + out)
    83968

What runs where (bitsandbytes 0.50.2 with its CPU backend, peft 0.21.2, torch 2.13 CPU, measured here):

- LoRA (:func:`peft.get_peft_model` with ``LoraConfig(r, lora_alpha, target_modules, lora_dropout,
  layers_to_transform)``): everywhere. The base is cast to the compute dtype (bf16, or fp32 for ``--precision
  fp32``) and frozen; adapters are fp32 (PEFT's ``autocast_adapter_dtype=True``) unless ``param_dtype`` is bf16.
- QLoRA: bitsandbytes ``Linear4bit`` (NF4, ``blocksize=64``, ``compress_statistics`` = double quantization,
  ``compute_dtype=bfloat16``) replaces every linear of the decoder layers; quantization, the 4-bit forward
  (``gemm_4bit``) and backward (``dequantize_4bit`` then a matmul) run on CPU. PEFT then wraps them in
  ``peft.tuners.lora.bnb.Linear4bit``. Unlike ``peft.prepare_model_for_kbit_training`` the embedding, norms
  and head are not upcast to fp32 (that upcast costs 2 more bytes per such parameter).
- 8-bit AdamW (``bitsandbytes.optim.AdamW8bit``: block-wise quantized states) runs on CPU; paged optimizers
  (``PagedAdamW``/``PagedAdamW8bit``) fall back to ordinary CPU memory there (bitsandbytes warns: "Paged
  optimizers are not supported on CPU"), so paging is measured only on CUDA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from batchpilot.errors import SpecError
from batchpilot.specs.finetune import HF_MODULE_NAMES, FineTune

if TYPE_CHECKING:
    import torch
    from torch import nn

#: What to install when PEFT or bitsandbytes is missing.
INSTALL_HINT = "pip install 'batchpilot[finetune]' (peft, bitsandbytes)"


def _import(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise SpecError(f"--finetune needs the {name!r} package, which is not installed; {INSTALL_HINT}") from None


def decoder_layers(module: nn.Module) -> list[nn.Module]:
    """The decoder layers of a ``transformers`` causal LM (``model.layers`` or GPT-2's ``transformer.h``)."""
    get_decoder = getattr(module, "get_decoder", None)  # a PeftModel forwards it to the wrapped model
    decoder = get_decoder() if get_decoder is not None else module
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    if layers is None:
        raise SpecError(f"--finetune: cannot find the decoder layers of {type(module).__name__}")
    return list(layers)


def apply_finetune(module: nn.Module, ft: FineTune, *, precision: str, param_dtype: str) -> nn.Module:
    """``module`` (an fp32 ``transformers`` causal LM) prepared for ``ft``: for full training as is (in bf16 with
    ``param_dtype="bf16"``: pure bf16), with its embedding and first layers frozen for ``frozen_layers``; wrapped by
    PEFT for LoRA/QLoRA."""
    import torch

    if not ft.adapters:
        if param_dtype == "bf16":  # pure bf16: weights, gradients and optimizer states in bf16, no autocast
            cast_floating(module, torch.bfloat16)
        if ft.frozen_layers:
            _freeze_prefix(module, ft.frozen_layers)
        return module

    peft = _import("peft")
    module.requires_grad_(False)
    if precision == "bf16":
        cast_floating(module, torch.bfloat16)
    if ft.method == "qlora":
        from torch._guards import detect_fake_mode

        if detect_fake_mode() is not None:
            raise SpecError("--finetune qlora cannot be traced: bitsandbytes' 4-bit weights (Params4bit, a tensor "
                            "subclass) cannot be fake tensors; use --method analytic (or measure it: probe)")
        _quantize_layers(module, ft)
        setattr(module, "is_loaded_in_4bit", True)  # noqa: B010  PEFT then wraps Linear4bit in lora.bnb.Linear4bit (lora/model.py)
    layers = len(decoder_layers(module))
    if ft.frozen_layers >= layers:
        raise SpecError(f"--finetune frozen-layers={ft.frozen_layers} leaves none of the {layers} layers to adapt; "
                        f"use frozen-layers < {layers}")
    config = peft.LoraConfig(
        r=ft.rank, lora_alpha=ft.alpha, lora_dropout=ft.dropout, bias="none", task_type="CAUSAL_LM",
        target_modules=[HF_MODULE_NAMES[t] for t in ft.targets],
        layers_to_transform=list(range(ft.frozen_layers, layers)) if ft.frozen_layers else None,
    )
    with _fake_safe_module_to():
        return peft.get_peft_model(module, config, autocast_adapter_dtype=param_dtype == "fp32")  # type: ignore[no-any-return]


def cast_floating(module: nn.Module, dtype: torch.dtype) -> None:
    """``module.to(dtype)`` for floating parameters and buffers by replacing them (works on fake tensors too)."""
    import torch

    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                sub._parameters[name] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                sub._buffers[name] = b.to(dtype)


@contextlib.contextmanager
def _fake_safe_module_to() -> Iterator[None]:
    """Under ``FakeTensorMode``, ``nn.Module.to`` swaps each fake parameter (``torch.utils.swap_tensors``), which
    torch 2.13 refuses for tensors the mode holds weak references to ("Couldn't swap Linear.weight"); PEFT moves
    every new adapter with it (``_move_adapter_to_device_of_base_layer``). While fake, ``Module.to`` replaces the
    parameters instead (same device and dtype result); real tensors take torch's own path."""
    import torch
    from torch._guards import detect_fake_mode

    original = torch.nn.Module.to

    def to(self: Any, *args: Any, **kwargs: Any) -> Any:
        if detect_fake_mode() is None:
            return original(self, *args, **kwargs)
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        for sub in self.modules():
            for store in (sub._parameters, sub._buffers):
                for name, t in list(store.items()):
                    if t is None:
                        continue
                    moved = t.detach().to(device=device or t.device,
                                          dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
                    store[name] = torch.nn.Parameter(moved, requires_grad=t.requires_grad) \
                        if isinstance(t, torch.nn.Parameter) else moved
        return self

    torch.nn.Module.to = to  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.to = original  # type: ignore[method-assign]


def _freeze_prefix(module: nn.Module, frozen: int) -> None:
    layers = decoder_layers(module)
    if frozen >= len(layers):
        raise SpecError(f"--finetune frozen-layers={frozen} freezes all {len(layers)} layers; use fewer")
    embedding: Any = module.get_input_embeddings()  # type: ignore[operator]
    embedding.requires_grad_(False)
    for layer in layers[:frozen]:
        layer.requires_grad_(False)


def _quantize_layers(module: nn.Module, ft: FineTune) -> None:
    """Replace every ``nn.Linear`` of the decoder layers by a quantized bitsandbytes ``Linear4bit`` (NF4)."""
    import torch

    bnb = _import("bitsandbytes")
    for layer in decoder_layers(module):
        for name, child in list(layer.named_modules()):
            if type(child) is not torch.nn.Linear:
                continue
            parent = layer.get_submodule(name.rpartition(".")[0]) if "." in name else layer
            quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.bfloat16, compress_statistics=ft.double_quant,
                                          quant_type="nf4", device="meta")
            quantized.weight = bnb.nn.Params4bit(child.weight.data.to(torch.bfloat16), requires_grad=False,
                                                 compress_statistics=ft.double_quant, quant_type="nf4",
                                                 blocksize=64)
            if child.bias is not None:
                quantized.bias = torch.nn.Parameter(child.bias.data.to(torch.bfloat16), requires_grad=False)
            setattr(parent, name.rpartition(".")[2], quantized.to(child.weight.device))


def bnb_optimizer(groups: Iterable[Any], *, name: str, paged: bool, lr: float, betas: tuple[float, float],
                  eps: float) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW for ``adamw-8bit`` (``AdamW8bit``, block-wise 8-bit states) and for paged states
    (``PagedAdamW``, ``PagedAdamW8bit``)."""
    bnb = _import("bitsandbytes")
    cls = {("adamw", True): bnb.optim.PagedAdamW, ("adamw-8bit", False): bnb.optim.AdamW8bit,
           ("adamw-8bit", True): bnb.optim.PagedAdamW8bit}.get((name, paged))
    if cls is None:
        raise SpecError(f"--optimizer {name!r}{' with paged states' if paged else ''} has no bitsandbytes "
                        f"optimizer; use adamw or adamw-8bit")
    import warnings

    with warnings.catch_warnings():  # "Paged optimizers are not supported on CPU" (falls back, said above)
        warnings.simplefilter("ignore", UserWarning)
        return cls(list(groups), lr=lr, betas=betas, eps=eps)  # type: ignore[no-any-return]


def trainable_parameters(module: nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that train (``requires_grad``)."""
    return [p for p in module.parameters() if p.requires_grad]
