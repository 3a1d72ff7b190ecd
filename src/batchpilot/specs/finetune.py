"""Fine-tuning settings: which parameters train and how the frozen ones are stored.

    >>> ft = parse_finetune("lora,r=64,alpha=16,targets=all-linear,dropout=0.05")
    >>> ft.method, ft.rank, ft.alpha, ft.targets
    ('lora', 64, 16.0, ('q', 'k', 'v', 'o', 'gate', 'up', 'down'))
    >>> parse_finetune("qlora").base_bits, parse_finetune("full,frozen-layers=8").frozen_layers
    (4, 8)
    >>> format_finetune(parse_finetune("lora,r=8,targets=q+v"))
    'lora,r=8,alpha=16,targets=qv'

One frozen value, :attr:`batchpilot.specs.settings.RunSettings.finetune`, shared by ``memory``, ``plan``,
``probe``, ``tune`` and ``train`` (the flag ``--finetune SPEC``). Methods:

- ``full`` — every parameter trains (the default). With ``frozen-layers=N`` the input embedding and the first N
  decoder layers are frozen (no gradients, no optimizer states, and — since nothing below them needs a
  gradient — no saved activations).
- ``lora`` — LoRA (Hu et al. 2021, arXiv:2106.09685) through PEFT's ``LoraConfig``: the base model is frozen
  and stored in the compute dtype (bf16, or fp32 for ``--precision fp32``); each targeted linear ``W`` gets
  ``A`` (r × in) and ``B`` (out × r), output ``W x + (alpha/r)·B A dropout(x)``. The adapters are fp32
  (PEFT's ``autocast_adapter_dtype=True``) unless ``--param-dtype bf16``, and only they have gradients and
  optimizer states.
- ``qlora`` — QLoRA (Dettmers et al. 2023, arXiv:2305.14314): LoRA over a base whose decoder-layer linears are
  stored in 4-bit NormalFloat (NF4, blocks of 64) with double quantization (the fp32 block scales quantized
  to 8 bits in blocks of 256), bitsandbytes ``Linear4bit``; the embedding, norms and output head stay 16-bit.
  ``paged`` puts the optimizer states in paged (unified) memory (bitsandbytes ``PagedAdamW``).

``bf16-update`` applies to pure bf16 training (``--param-dtype bf16``): ``round`` (plain round-to-nearest,
torchtune/torchtitan), ``kahan`` (a bf16 compensation buffer per parameter: Kahan summation of the update,
e.g. ``torchoptimizer``/``optimi``'s ``kahan_sum``, Zamirai et al. 2020 arXiv:2010.06192) or ``stochastic``
(stochastic rounding of the update, torchao's ``_AdamW(bf16_stochastic_round=True)``: no extra memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from batchpilot.errors import SpecError

Method = Literal["full", "lora", "qlora"]
BF16Update = Literal["round", "kahan", "stochastic"]

METHODS: tuple[str, ...] = get_args(Method)
BF16_UPDATES: tuple[str, ...] = get_args(BF16Update)

#: batchpilot's names of a Llama-style block's linears, in forward order, and the Hugging Face module names
#: PEFT's ``target_modules`` matches (``transformers`` ``models/llama/modeling_llama.py``).
LINEARS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
HF_MODULE_NAMES: dict[str, str] = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
                                   "up": "up_proj", "down": "down_proj"}
#: Named target sets: PEFT's ``"all-linear"`` (every linear but the output head; QLoRA's choice, §4 "LoRA on all
#: layers is critical"), attention only, and the LoRA paper's W_q, W_v (Hu et al. 2021 §7.1).
TARGET_SETS: dict[str, tuple[str, ...]] = {"all-linear": LINEARS, "attention": ("q", "k", "v", "o"), "qv": ("q", "v")}

DEFAULT_RANK = 16
DEFAULT_ALPHA = 16.0
#: NF4 block size (bitsandbytes ``Linear4bit`` default ``blocksize=64``; QLoRA §3) and the double-quantization
#: block of the block scales (256; QLoRA §3 "Double Quantization").
NF4_BLOCK = 64
DOUBLE_QUANT_BLOCK = 256


@dataclass(frozen=True, kw_only=True, slots=True)
class FineTune:
    """What trains and how the frozen base is stored (module docstring)."""

    method: Method = "full"
    """``full``, ``lora`` or ``qlora``."""
    rank: int = DEFAULT_RANK
    """LoRA rank r (PEFT ``r``)."""
    alpha: float = DEFAULT_ALPHA
    """LoRA ``lora_alpha``: the update is scaled by alpha/r (no effect on memory or time)."""
    targets: tuple[str, ...] = LINEARS
    """The linears of every trainable layer that get adapters (:data:`LINEARS` names)."""
    dropout: float = 0.0
    """LoRA dropout on the adapter input (PEFT ``lora_dropout``; QLoRA used 0.1 up to 13B, 0.05 above): a
    dropout mask and output per targeted linear are saved."""
    frozen_layers: int = 0
    """The input embedding and the first N decoder layers are frozen (LoRA: no adapters on them, PEFT
    ``layers_to_transform``)."""
    bf16_update: BF16Update = "round"
    """How pure bf16 training (``--param-dtype bf16``) applies the update: ``round``, ``kahan``, ``stochastic``."""
    paged: bool = False
    """Optimizer states in paged unified memory (bitsandbytes paged optimizers; QLoRA §3 "Paged Optimizers")."""
    double_quant: bool = True
    """QLoRA's double quantization of the NF4 block scales."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SpecError(f"--finetune method {self.method!r} is not one of: {', '.join(METHODS)}")
        if self.bf16_update not in BF16_UPDATES:
            raise SpecError(f"--finetune bf16-update={self.bf16_update!r} is not one of: {', '.join(BF16_UPDATES)}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 1 <= self.rank <= 65536:
            raise SpecError(f"--finetune r={self.rank!r} must be a whole number from 1 to 65536 (LoRA rank)")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < 1e6:
            raise SpecError(f"--finetune alpha={self.alpha!r} must be a positive number (LoRA scaling alpha/r)")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise SpecError(f"--finetune dropout={self.dropout!r} must be a probability in [0, 1)")
        if isinstance(self.frozen_layers, bool) or not isinstance(self.frozen_layers, int) or self.frozen_layers < 0:
            raise SpecError(f"--finetune frozen-layers={self.frozen_layers!r} must be a whole number ≥ 0")
        unknown = [t for t in self.targets if t not in LINEARS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise SpecError(f"--finetune targets={'+'.join(self.targets)!r}: use distinct names from "
                            f"{'+'.join(LINEARS)} or one of {', '.join(TARGET_SETS)}")
        for name in ("paged", "double_quant"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(f"--finetune {name.replace('_', '-')} must be true or false")

    @property
    def adapters(self) -> bool:
        """LoRA or QLoRA: a frozen base with trainable adapters."""
        return self.method in ("lora", "qlora")

    @property
    def base_bits(self) -> int:
        """Bits per stored weight of the frozen base's decoder-layer linears: 4 (QLoRA NF4) or 16."""
        return 4 if self.method == "qlora" else 16

    def check_settings(self, *, precision: str, param_dtype: str, optimizer: str) -> None:
        """The combinations that mean nothing (called by ``RunSettings``)."""
        if self.bf16_update != "round" and param_dtype != "bf16":
            raise SpecError(f"--finetune bf16-update={self.bf16_update} applies to pure bf16 training; add "
                            f"--param-dtype bf16 --precision bf16 or drop it")
        if self.adapters and precision not in ("fp32", "bf16"):
            raise SpecError(f"--finetune {self.method} runs a bf16 (or fp32) base, not --precision {precision}; "
                            f"use --precision bf16")
        if self.method == "qlora" and precision != "bf16":
            raise SpecError("--finetune qlora computes in bf16 (bitsandbytes Linear4bit compute_dtype); "
                            "use --precision bf16")
        if self.paged and optimizer not in ("adamw", "adamw-8bit"):
            raise SpecError(f"--finetune paged: bitsandbytes pages AdamW states (PagedAdamW, PagedAdamW8bit), not "
                            f"--optimizer {optimizer}; use adamw or adamw-8bit")


FULL = FineTune()
"""Full training (the default)."""

_KEYS = {"r": "rank", "rank": "rank", "alpha": "alpha", "targets": "targets", "dropout": "dropout",
         "frozen-layers": "frozen_layers", "bf16-update": "bf16_update", "paged": "paged",
         "double-quant": "double_quant"}
_FLAGS = {"paged": ("paged", True), "kahan": ("bf16_update", "kahan"), "stochastic": ("bf16_update", "stochastic"),
          "no-double-quant": ("double_quant", False)}


def parse_finetune(text: str) -> FineTune:
    """``METHOD[,key=value|flag]…`` → :class:`FineTune` (keys: r, alpha, targets, dropout, frozen-layers,
    bf16-update, paged, double-quant; flags: paged, kahan, stochastic, no-double-quant; targets: names joined by
    ``+`` or a set of :data:`TARGET_SETS`)."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts or parts[0].lower() not in METHODS:
        raise SpecError(f"--finetune {text!r} must start with one of: {', '.join(METHODS)} "
                        f"(e.g. lora,r=16,alpha=32,targets=all-linear)")
    values: dict[str, object] = {"method": parts[0].lower()}
    for part in parts[1:]:
        key, sep, raw = part.partition("=")
        key = key.strip().lower()
        if not sep and key in _FLAGS:
            name, flag_value = _FLAGS[key]
            values[name] = flag_value
            continue
        if key not in _KEYS or not sep:
            raise SpecError(f"--finetune {text!r}: {part!r} is not key=value with a key of "
                            f"{', '.join(_KEYS)} (or a flag: {', '.join(_FLAGS)})")
        values[_KEYS[key]] = _value(_KEYS[key], raw.strip(), text)
    return FineTune(**values)  # type: ignore[arg-type]


def _value(name: str, raw: str, text: str) -> object:
    try:
        if name in ("rank", "frozen_layers"):
            return int(raw)
        if name in ("alpha", "dropout"):
            return float(raw)
    except ValueError:
        raise SpecError(f"--finetune {text!r}: {name.replace('_', '-')}={raw!r} is not a number") from None
    if name == "targets":
        return TARGET_SETS.get(raw.lower()) or tuple(t.strip().lower() for t in raw.split("+") if t.strip())
    if name in ("paged", "double_quant"):
        if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise SpecError(f"--finetune {text!r}: {name.replace('_', '-')}={raw!r} must be true or false")
        return raw.lower() in ("true", "1", "yes")
    return raw.lower()


def format_finetune(ft: FineTune) -> str:
    """The ``--finetune`` text of ``ft`` (defaults left out; :func:`parse_finetune` reads it back)."""
    parts: list[str] = [ft.method]
    if ft.adapters:
        named = next((k for k, v in TARGET_SETS.items() if v == ft.targets), "+".join(ft.targets))
        parts += [f"r={ft.rank}", f"alpha={ft.alpha:g}", f"targets={named}"]
        if ft.dropout:
            parts.append(f"dropout={ft.dropout:g}")
    if ft.frozen_layers:
        parts.append(f"frozen-layers={ft.frozen_layers}")
    if ft.bf16_update != "round":
        parts.append(ft.bf16_update)
    if ft.paged:
        parts.append("paged")
    if ft.method == "qlora" and not ft.double_quant:
        parts.append("no-double-quant")
    return ",".join(parts)


__all__ = ["BF16_UPDATES", "FULL", "HF_MODULE_NAMES", "LINEARS", "METHODS", "TARGET_SETS", "FineTune",
           "format_finetune", "parse_finetune"]
