"""Memory terms of fine-tuning: LoRA/QLoRA adapters over a frozen (16-bit or 4-bit NF4) base, frozen layers,
pure bf16 with Kahan summation, 8-bit optimizer states — derived from what autograd saves, called by the
analytic assembly (:mod:`batchpilot.estimate.memory`, :mod:`batchpilot.estimate.activations`) through one-line
hooks.

    >>> from batchpilot.specs.finetune import parse_finetune
    >>> from batchpilot.specs.model import load_model
    >>> llama7b = load_model("llama-7b")
    >>> round(adapter_params(llama7b, parse_finetune("lora,r=8,targets=qv")) / 1e6, 2)   # LoRA paper: 4.2M
    4.19
    >>> round(nf4_bytes_per_param(double_quant=True) * 8, 3)   # QLoRA §3: 4 + 8/64 + 32/(64·256) bits
    4.127
    >>> round((nf4_bytes_per_param(double_quant=False) - nf4_bytes_per_param(double_quant=True)) * 8, 3)
    0.373

**Model states.** LoRA (Hu et al. 2021) trains ``A`` (r × in) and ``B`` (out × r) per targeted linear; the base
is frozen: its weights only, in the compute dtype (bf16; fp32 under ``--precision fp32``), or — QLoRA (Dettmers
et al. 2023 §3) — the decoder-layer linears in NF4: 4 bits per weight plus one block scale per 64 weights, an
fp32 scale without double quantization (32/64 bits) or an 8-bit one with an fp32 second-level scale per 256
blocks (8/64 + 32/(64·256) bits); the embedding, norms and head stay 16-bit (bitsandbytes ``Linear4bit``
replaces linears only). Adapters are fp32 (PEFT ``autocast_adapter_dtype=True``) with fp32 gradients and AdamW
states (4 + 4 + 8 bytes), or bf16 with ``--param-dtype bf16`` (2 + 2 + 4). bitsandbytes' 8-bit AdamW keeps two
uint8 states plus one fp32 absmax per 256-element block each (``bitsandbytes/optim/optimizer.py``
``Optimizer2State``, ``blocksize=256``): 2 + 8/256 bytes per parameter, whatever the parameter dtype — but
tensors under ``min_8bit_size`` = 4096 elements keep 32-bit states (8 bytes). Under autocast the adapters'
bf16 casts are cached for backward (leaf tensors that require grad; ``aten/src/ATen/autocast_mode.cpp``
``cached_cast``). Full training with frozen layers: gradients, optimizer states and autocast's cached casts
only for the trainable parameters. Kahan summation of a pure bf16 update keeps one bf16 compensation buffer per
parameter (2 bytes); stochastic rounding none. Paged optimizer states live in unified memory, evicted to the
host when the GPU runs short (QLoRA §3): not counted on the GPU.

**Activations** (bytes per token, policy ``none``; what autograd saves, ``tools/autograd/derivatives.yaml``: a
matmul saves its input only if its weight needs a gradient and its weight only if its input does). For a frozen
linear nothing of its input is saved; so:

- a norm with a frozen weight does not save its normalised tensor (``norm*_normalized``);
- the attention norm's output is saved only when one of q, k, v carries an adapter (``lora_A`` saves it);
  the FFN norm's when gate or up does; SwiGLU's product (the down projection's input) when down does; the
  attention output stays (the attention kernel saves it);
- each adapter saves ``lora_A``'s r-wide output (``lora_B``'s input) and, with dropout, a mask (1 byte) and
  the dropped-out input per element of its input;
- PEFT casts the input to the adapter dtype (``_cast_input_dtype`` in ``peft/tuners/lora/layer.py``
  ``Linear.forward``, peft 0.21.2): with fp32 adapters under bf16 autocast, each adapted linear's ``lora_A``
  saves its own bf16 cast of that fp32 copy (2 bytes per input element per adapted linear) instead of sharing
  the input; bitsandbytes' ``lora.bnb.Linear4bit`` skips the cast under autocast (QLoRA shares the input);
- the first trainable layer's input needs no gradient, so its attention norm saves nothing (nor does the
  layer keep its input);
- frozen layers below every trainable one save nothing at all; the final norm's normalised tensor and output
  are not saved (frozen norm weight and head).

**Transients.** QLoRA's backward dequantizes each 4-bit weight to bf16 before the matmul
(``bitsandbytes/autograd/_functions.py`` ``MatMul4Bit.backward``): one linear's bf16 weight at a time.
Known error: see ``benchmarks/results/finetune_memory.md`` (real CPU steps with PEFT and bitsandbytes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from batchpilot.errors import SpecError
from batchpilot.estimate.dtypes import ACTIVATION_BYTES
from batchpilot.specs.finetune import DOUBLE_QUANT_BLOCK, LINEARS, NF4_BLOCK, FineTune

if TYPE_CHECKING:
    from batchpilot.estimate.model_states import ModelStates
    from batchpilot.specs.model import ModelSpec
    from batchpilot.specs.settings import RunSettings

#: bitsandbytes' 8-bit optimizers: two uint8 states + one fp32 absmax per block of 256 for each
#: (``Optimizer2State``, ``blockwise=True``); tensors under ``min_8bit_size`` elements keep fp32 states.
BNB_8BIT_BLOCK = 256
BNB_MIN_8BIT_SIZE = 4096
ADAMW_8BIT_STATE_BYTES = 2 + 2 * 4 / BNB_8BIT_BLOCK
#: Kahan-compensated bf16 update: one bf16 compensation buffer per parameter.
KAHAN_BYTES = 2
#: What the first trainable layer does not save, its input needing no gradient: the attention norm's saved
#: tensors (and the input itself, which that norm saves in an fp32 block), and the attention adapters' dropout
#: masks (only their outputs, ``lora_A``'s inputs, are saved).
FIRST_LAYER_UNNEEDED = ("layer_input", "norm1_fp32_input", "norm1_rstd", "lora_q_dropout_mask",
                         "lora_k_dropout_mask", "lora_v_dropout_mask")
#: Input groups of a Llama block: which linears read the same tensor, and the saved term that holds it.
_GROUPS: tuple[tuple[tuple[str, ...], str], ...] = ((("q", "k", "v"), "norm1_out"), (("o",), "attn_proj_in"),
                                                   (("gate", "up"), "norm2_out"), (("down",), "mlp_product"))


def nf4_bytes_per_param(*, double_quant: bool) -> float:
    """Stored bytes per NF4 weight: 4 bits + the block scale (QLoRA §3: 32/64 bits, or 8/64 + 32/(64·256))."""
    scale_bits = 8 / NF4_BLOCK + 32 / (NF4_BLOCK * DOUBLE_QUANT_BLOCK) if double_quant else 32 / NF4_BLOCK
    return (4 + scale_bits) / 8


def linear_shapes(model: ModelSpec) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear of one Llama-style block (:data:`LINEARS` names)."""
    _check_supported(model)
    h, i = model.hidden_size, model.intermediate_size
    q, kv = model.num_heads * model.head_dim_qk, model.num_kv_heads * model.head_dim_qk
    v, o_in = model.num_kv_heads * model.head_dim_v, model.num_heads * model.head_dim_v
    return {"q": (h, q), "k": (h, kv), "v": (h, v), "o": (o_in, h), "gate": (h, i), "up": (h, i), "down": (i, h)}


def _check_supported(model: ModelSpec) -> None:
    if model.family != "llama" or model.mlp_kind != "swiglu":
        raise SpecError(f"--finetune lora/qlora is modelled for dense Llama-style blocks (q/k/v/o/gate/up/down); "
                        f"{model.name} is a {model.family} model; use --finetune full")


def adapter_params_per_layer(model: ModelSpec, ft: FineTune) -> int:
    """LoRA parameters of one adapted layer: Σ over the targets of r·(in + out)."""
    shapes = linear_shapes(model)
    return sum(ft.rank * (shapes[t][0] + shapes[t][1]) for t in ft.targets)


def trainable_layers(model: ModelSpec, ft: FineTune) -> int:
    """Decoder layers that train (all but the frozen prefix)."""
    if ft.frozen_layers >= model.num_layers:
        raise SpecError(f"--finetune frozen-layers={ft.frozen_layers} freezes all {model.num_layers} layers of "
                        f"{model.name}; use frozen-layers < {model.num_layers}")
    return model.num_layers - ft.frozen_layers


def adapter_params(model: ModelSpec, ft: FineTune) -> int:
    """All LoRA parameters of the model."""
    return adapter_params_per_layer(model, ft) * trainable_layers(model, ft)


def quantized_params_per_layer(model: ModelSpec) -> int:
    """Weights of one block's linears (what QLoRA stores in NF4)."""
    return sum(i * o for i, o in linear_shapes(model).values())


def trainable_params(model: ModelSpec, ft: FineTune) -> int:
    """Parameters with gradients and optimizer states: the adapters, or all but the input embedding (and a
    head tied to it) and the frozen layers."""
    if ft.adapters:
        return adapter_params(model, ft)
    if not ft.frozen_layers:
        return model.params_total
    return round(model.params_total - model.vocab_size * model.hidden_size - ft.frozen_layers * _layer_params(model))


def _layer_params(model: ModelSpec) -> float:
    """One average decoder layer's parameters."""
    return (model.params_total - model.params_embedding - model.params_final_norm) / model.num_layers


def is_default(settings: RunSettings) -> bool:
    """Full training of every parameter with the engines' own optimizer bookkeeping (no hook applies)."""
    ft = settings.finetune
    return (ft.method == "full" and not ft.frozen_layers and ft.bf16_update != "kahan" and not ft.paged
            and settings.optimizer != "adamw-8bit")


# ---------------------------------------------------------------------------------------------- model states
def _adapter_dtype_bytes(settings: RunSettings) -> int:
    return 2 if settings.param_dtype == "bf16" else 4


def _autocast(settings: RunSettings) -> bool:
    return settings.precision in ("bf16", "fp16") and settings.param_dtype == "fp32"


def _optimizer_state_bytes(settings: RunSettings, sizes: list[float], dtype_bytes: int) -> float:
    """Optimizer state bytes of tensors of ``sizes`` elements stored in ``dtype_bytes``-byte parameters."""
    from batchpilot.estimate.model_states import OPTIMIZER_STATE_BYTES

    if settings.optimizer == "adamw-8bit":
        return sum(ADAMW_8BIT_STATE_BYTES * n if n >= BNB_MIN_8BIT_SIZE else 8 * n for n in sizes)
    return OPTIMIZER_STATE_BYTES[settings.optimizer] * dtype_bytes / 4 * sum(sizes)


def adapter_tensor_sizes(model: ModelSpec, ft: FineTune) -> list[int]:
    """Elements of every LoRA tensor of one adapted layer (A and B per target)."""
    shapes = linear_shapes(model)
    return [n for t in ft.targets for n in (ft.rank * shapes[t][0], ft.rank * shapes[t][1])]


def model_states(model: ModelSpec, settings: RunSettings, *, params: float, matmul_params: float, layers: int,
                 first: bool, dp: int, shard: int, tp: int) -> ModelStates | None:
    """Model states of one GPU holding ``params`` parameters (``layers`` decoder layers, ÷ tp) for a
    fine-tuning setting, or None when the engine's own table applies (:func:`is_default`)."""
    from batchpilot.estimate.model_states import ModelStates

    if is_default(settings):
        return None
    ft = settings.finetune
    if not ft.adapters:
        return _full_states(model, settings, params=params, matmul_params=matmul_params, layers=layers, first=first,
                            dp=dp, shard=shard, tp=tp)
    group = max(1, shard)
    base_dtype = 4 if settings.precision == "fp32" else 2
    per_layer_adapted = min(layers, trainable_layers(model, ft)) if first else layers
    adapters = adapter_params_per_layer(model, ft) * per_layer_adapted / tp
    quantized = quantized_params_per_layer(model) * layers / tp if ft.method == "qlora" else 0.0
    base = (params - quantized) * base_dtype + quantized * nf4_bytes_per_param(double_quant=ft.double_quant)
    a = _adapter_dtype_bytes(settings)
    sizes = [n / tp for n in adapter_tensor_sizes(model, ft)] * per_layer_adapted
    optimizer = 0.0 if (settings.offload or ft.paged) else _optimizer_state_bytes(settings, sizes, a)
    zero = settings.zero_stage
    return ModelStates(
        weights_bytes=(base / group if zero >= 3 else base) + a * adapters,
        gradients_bytes=a * adapters / (group if zero >= 2 else 1),
        optimizer_bytes=optimizer / (group if zero >= 1 else 1),
        compute_copies_bytes=2 * adapters * _uncheckpointed_share(settings, layers) if _autocast(settings) else 0.0,
    )


def _uncheckpointed_share(settings: RunSettings, layers: int) -> float:
    """Share of the layers whose autocast casts survive the forward: a checkpointed layer (``op``, ``full``)
    saves none, and the cast cache is cleared when the forward leaves autocast."""
    layers = max(layers, 1)
    checkpointed = layers // settings.recompute_every if settings.recompute in ("op", "full") else 0
    return (layers - checkpointed) / layers  # activations.layer_policies: layers N, 2N, … are checkpointed


def _full_states(model: ModelSpec, settings: RunSettings, *, params: float, matmul_params: float, layers: int,
                 first: bool, dp: int, shard: int, tp: int) -> ModelStates:
    """Full training with a frozen prefix, Kahan summation, 8-bit or paged states: weights of every parameter,
    gradients, optimizer states and autocast's cached casts of the trainable ones."""
    from batchpilot.estimate.model_states import ModelStates, bytes_per_param, model_state_bytes

    ft = settings.finetune
    frozen = 0.0
    if first and ft.frozen_layers:
        frozen = (min(ft.frozen_layers, layers) * _layer_params(model) + model.vocab_size * model.hidden_size) / tp
    train = max(0.0, params - frozen)
    share = train / params if params else 0.0
    every = model_state_bytes(settings, params=params, dp=dp, matmul_params=matmul_params, shard=shard)
    trained = model_state_bytes(settings, params=train, dp=dp, matmul_params=matmul_params * share, shard=shard)
    optimizer = trained.optimizer_bytes
    group = max(1, shard) if settings.zero_stage >= 1 else 1
    pb = bytes_per_param(settings)
    if settings.optimizer == "adamw-8bit" and not settings.offload:
        optimizer = (pb.master + ADAMW_8BIT_STATE_BYTES) * train / group
    if ft.bf16_update == "kahan" and not settings.offload:
        optimizer += KAHAN_BYTES * train / group
    if ft.paged:
        optimizer = 0.0
    return ModelStates(weights_bytes=every.weights_bytes, gradients_bytes=trained.gradients_bytes,
                       optimizer_bytes=optimizer, compute_copies_bytes=trained.compute_copies_bytes)


def autocast_copies_apply(settings: RunSettings) -> bool:
    """Whether the engine's autocast weight copies apply: not over a frozen 16-bit/4-bit LoRA base (already in
    the compute dtype; the adapters' casts are in :func:`model_states`)."""
    return not settings.finetune.adapters


def embedding_gradient(settings: RunSettings) -> bool:
    """Whether the input embedding trains (a tied embedding's dense gradient exists)."""
    return not settings.finetune.adapters and not settings.finetune.frozen_layers


def dequant_buffer_bytes(model: ModelSpec, settings: RunSettings, tp: int = 1) -> float:
    """QLoRA: the largest linear of a block dequantized to bf16 while its backward matmul runs."""
    if settings.finetune.method != "qlora":
        return 0.0
    return 2.0 * max(i * o for i, o in linear_shapes(model).values()) / tp


def optimizer_transient(model: ModelSpec, settings: RunSettings, *, foreach: bool, fused: bool, tp: int = 1,
                        dp_shard: int = 1) -> float | None:
    """The optimizer step's temporaries over the trainable parameters (None: the engine's own rule applies).
    ``foreach`` AdamW: one ``sqrt(v)`` list in the states' dtype (fp32: 4 bytes per trainable parameter; pure
    bf16: 2); the per-tensor loop: two temporaries of the largest trainable tensor; fused kernels and
    bitsandbytes' 8-bit step: none."""
    from batchpilot.estimate.model_states import LOOP_STEP_TRANSIENT_TENSORS, OPTIMIZER_STEP_TRANSIENT_BYTES

    ft = settings.finetune
    pure = settings.param_dtype == "bf16" and not ft.adapters
    if not (ft.adapters or pure) or settings.engine != "torch" or fused or settings.offload:
        return None if not ft.adapters else 0.0
    if settings.optimizer == "adamw-8bit":
        return 0.0
    a = _adapter_dtype_bytes(settings)
    per_param = OPTIMIZER_STEP_TRANSIENT_BYTES[settings.optimizer] * a / 4
    if pure:  # full training in pure bf16: every trainable parameter of this GPU's share
        if not foreach:
            return None
        shard = dp_shard if settings.zero_stage >= 1 else 1
        return per_param * trainable_params(model, ft) / (tp * settings.pp * shard)
    if foreach:
        return per_param * adapter_params(model, ft) / tp / dp_shard
    largest = max(adapter_tensor_sizes(model, ft)) / tp
    return LOOP_STEP_TRANSIENT_TENSORS[settings.optimizer] * a * largest


# ---------------------------------------------------------------------------------------------- activations
def adjust_layer_terms(terms: dict[str, float], model: ModelSpec, settings: RunSettings, policy: str,
                       tp: int, *, cpu: bool = False) -> dict[str, float]:
    """One adapted layer's saved tensors (``none``/``selective``; ``op`` and ``full`` save what they save: the
    per-op cache keeps matmul outputs whoever needs them, full recomputation the layer input) under LoRA.
    ``cpu``: the CPU kernels' differences (:func:`cpu_step_extra_bytes`); the default is what runs on a GPU."""
    ft = settings.finetune
    if not ft.adapters or policy in ("op", "full"):
        return terms
    act = ACTIVATION_BYTES[settings.precision]  # the block's matmul dtype (activations.block_style's act)
    out = {k: v for k, v in terms.items() if not k.endswith("_normalized")}
    product = max(1, model.intermediate_size // tp) * act
    widths = {"norm1_out": model.hidden_size * act, "attn_proj_in": out.get("attn_proj_in", 0.0),
              "norm2_out": model.hidden_size * act, "mlp_product": float(product)}
    x_bytes = _adapter_input_bytes(settings, act, cpu)
    for names, key in _GROUPS:
        adapted = [t for t in names if t in ft.targets]
        width = widths[key]
        shared = bool(adapted) and x_bytes == act and not ft.dropout
        if key == "mlp_product":
            if not shared and "mlp" in out:
                out["mlp"] -= width
        elif key == "attn_proj_in":
            if not shared and settings.attention == "eager":
                out.pop(key, None)
        elif not shared:
            out.pop(key, None)
        for t in adapted:
            out.update(_adapter_input_terms(t, width / act, settings, act, x_bytes, cpu))
    rank_bytes = 4 if settings.precision == "fp32" else 2
    for t in ft.targets:
        out[f"lora_{t}_a_out"] = ft.rank / (tp if t != "o" and t != "down" else 1) * rank_bytes
    return out


def _adapter_input_bytes(settings: RunSettings, act: int, cpu: bool) -> int:
    """Bytes per element of the input an adapter's dropout and ``lora_A`` see: PEFT's ``Linear`` casts it to the
    adapter dtype (``_cast_input_dtype``); ``lora.bnb.Linear4bit`` only when ``torch.is_autocast_enabled()`` —
    which, called without a device type, reads CUDA's autocast state, so it casts under CPU autocast."""
    adapter = _adapter_dtype_bytes(settings)
    if settings.finetune.method == "qlora" and _autocast(settings) and not cpu:
        return act
    return adapter


def _adapter_input_terms(target: str, elements: float, settings: RunSettings, act: int, x_bytes: int,
                         cpu: bool) -> dict[str, float]:
    """What one adapted linear saves of its input besides the shared tensor: its own cast and/or dropout.

    Dropout on a GPU saves a 1-byte mask (ATen's fused ``native_dropout``); on a CPU the unfused path saves its
    noise tensor in the input's dtype (``aten/src/ATen/native/Dropout.cpp`` ``_dropout_impl``). ``lora_A`` saves
    its input: under autocast its own bf16 cast of it (unless it already is bf16), else the tensor itself."""
    ft = settings.finetune
    saved_input = 2 if (_autocast(settings) and x_bytes != 2) else x_bytes
    terms: dict[str, float] = {}
    if ft.dropout:
        terms[f"lora_{target}_dropout_mask"] = elements * (x_bytes if cpu else 1.0)
        terms[f"lora_{target}_input"] = elements * saved_input
    elif x_bytes != act:
        terms[f"lora_{target}_input"] = elements * saved_input
    return terms


def adjust_logits_terms(terms: dict[str, float], settings: RunSettings) -> dict[str, float]:
    """The final norm under a frozen norm weight and head saves neither its normalised tensor nor its output."""
    if not settings.finetune.adapters:
        return terms
    return {k: v for k, v in terms.items() if not k.endswith(("_normalized", "norm_out", "norm_out_casts"))}


__all__ = ["ADAMW_8BIT_STATE_BYTES", "LINEARS", "adapter_params", "adjust_layer_terms", "adjust_logits_terms",
           "dequant_buffer_bytes", "linear_shapes", "model_states", "nf4_bytes_per_param",
           "trainable_params"]
