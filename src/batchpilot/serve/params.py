"""The page's fields: one per ``batchpilot plan`` flag, named as the flag without its dashes, parsed by the
parsers the CLI uses (so a bad value reads the same: ``--gpus 'abc' is not a whole number``).

The URL carries them (``?model=llama-3-8b&gpu=h100-sxm&gpus=64&seq-len=8192&global-batch-tokens=4Mi``), so a
plan can be shared. Unlike the CLI, the server loads only what it ships: model presets, the accelerator
catalog and ``config.json`` files uploaded as data; it never opens a path a request names.

    >>> options = plan_options({"model": "tiny-llama-1m", "gpu": "rtx-4090", "seq-len": "256", "global-batch": "32"})
    >>> options.seq_len, options.global_batch, options.gpus
    (256, 32, 1)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from batchpilot.errors import BatchpilotError
from batchpilot.names import resolve
from batchpilot.plan.engines import DEFAULT_ENGINE, ENGINE_NAMES, LEGACY_ENGINES
from batchpilot.plan.exports import FORMATS
from batchpilot.plan.options import DEFAULT_GPUS_PER_NODE, DEFAULT_INTER_NODE_BANDWIDTH, PlanOptions
from batchpilot.plan.request import DEFAULT_HEADROOM, Pins
from batchpilot.specs.hardware import accelerator_aliases, accelerator_names
from batchpilot.specs.model import ModelSpec, preset_aliases, preset_names
from batchpilot.specs.network import network_aliases, network_names
from batchpilot.specs.settings import (
    ATTENTIONS,
    FP8_RECIPES,
    LOSSES,
    OPTIMIZERS,
    PARAM_DTYPES,
    PRECISIONS,
    RECOMPUTES,
    RESHARDS,
    RunSettings,
)
from batchpilot.units import parse_bytes, parse_choice, parse_count, parse_fraction, parse_whole

MAX_VALUE_CHARS = 100
"""Longest field value accepted (names, counts and fractions are short; longer text is a mistake or hostile)."""

MAX_TOP = 20
"""Most plans a page request may ask for: each further plan weakens the search's pruning (``--top 1000`` on
DeepSeek-V3 × 2048 H800 took 22 s on a 2-core machine); the CLI has no such limit."""

_BOOLEANS = ("true", "false", "1", "0")
_DEFAULTS = RunSettings()


@dataclass(frozen=True, kw_only=True, slots=True)
class Field:
    """One field of the page: the flag it stands for and how its text is read."""

    name: str
    """The query key: the flag without its leading dashes (``seq-len``)."""
    parse: Callable[[str, str], Any]
    """``parse(text, flag)`` → value; raises a one-line :class:`BatchpilotError`."""
    group: str
    """Where the page shows it: model, cluster, target, pins, settings, search."""

    @property
    def flag(self) -> str:
        """The CLI flag of the field (``--seq-len``)."""
        return f"--{self.name}"


def _choice(choices: tuple[str, ...]) -> Callable[[str, str], str]:
    return lambda text, flag: parse_choice(text, flag, choices)


def _boolean(text: str, flag: str) -> bool:
    return parse_choice(text, flag, _BOOLEANS) in ("true", "1")


def _top(text: str, flag: str) -> int:
    top = parse_whole(text, flag)
    if top > MAX_TOP:
        raise BatchpilotError(f"{flag} {top} is above the page's limit of {MAX_TOP} plans; use the CLI for more")
    return top


def _text(text: str, flag: str) -> str:
    return text.strip()


def _preset(text: str, flag: str) -> str:
    return resolve("model preset", text, preset_names(), preset_aliases())


def _accelerator(text: str, flag: str) -> str:
    return resolve("accelerator", text, accelerator_names(), accelerator_aliases())


def _network(text: str, flag: str) -> str:
    return resolve("network", text, network_names(), network_aliases())


FIELDS: dict[str, Field] = {f.name: f for f in (
    Field(name="model", parse=_preset, group="model"),
    Field(name="gpu", parse=_accelerator, group="cluster"),
    Field(name="gpus", parse=parse_whole, group="cluster"),
    Field(name="gpus-per-node", parse=parse_whole, group="cluster"),
    Field(name="inter-node-bandwidth", parse=parse_bytes, group="cluster"),
    Field(name="network", parse=_network, group="cluster"),
    Field(name="seq-len", parse=parse_count, group="target"),
    Field(name="global-batch", parse=parse_count, group="target"),
    Field(name="global-batch-tokens", parse=parse_count, group="target"),
    Field(name="like", parse=_text, group="target"),
    Field(name="train-tokens", parse=parse_count, group="target"),
    Field(name="max-deviation", parse=parse_fraction, group="target"),
    *(Field(name=n, parse=parse_count if n == "micro-batch" else parse_whole, group="pins")
      for n in ("micro-batch", "grad-accum", "tp", "pp", "vpp", "ep", "cp", "zero")),
    Field(name="recompute", parse=_choice(RECOMPUTES), group="pins"),
    Field(name="precision", parse=_choice(PRECISIONS), group="settings"),
    Field(name="optimizer", parse=_choice(OPTIMIZERS), group="settings"),
    Field(name="engine", parse=_choice((*ENGINE_NAMES, *LEGACY_ENGINES)), group="settings"),
    Field(name="attention", parse=_choice(ATTENTIONS), group="settings"),
    Field(name="hybrid-shard", parse=_boolean, group="settings"),
    Field(name="sp", parse=_boolean, group="settings"),
    Field(name="offload", parse=_boolean, group="settings"),
    Field(name="recompute-every", parse=parse_whole, group="settings"),
    Field(name="compile", parse=_boolean, group="settings"),
    Field(name="fp8-recipe", parse=_choice(FP8_RECIPES), group="settings"),
    Field(name="fp8-all-gather", parse=_boolean, group="settings"),
    Field(name="reshard-after-forward", parse=_choice(RESHARDS), group="settings"),
    Field(name="loss", parse=_choice(LOSSES), group="settings"),
    Field(name="loss-chunks", parse=parse_whole, group="settings"),
    Field(name="param-dtype", parse=_choice(PARAM_DTYPES), group="settings"),
    Field(name="headroom", parse=parse_fraction, group="search"),
    Field(name="top", parse=_top, group="search"),
)}
"""Every field the page and the API take, in the order the page shows them."""

DEFAULTS: dict[str, str] = {
    "gpus": "1", "gpus-per-node": str(DEFAULT_GPUS_PER_NODE), "inter-node-bandwidth": DEFAULT_INTER_NODE_BANDWIDTH,
    "precision": _DEFAULTS.precision, "optimizer": _DEFAULTS.optimizer, "engine": DEFAULT_ENGINE,
    "attention": _DEFAULTS.attention, "headroom": f"{DEFAULT_HEADROOM:.0%}", "top": "5",
    "recompute-every": str(_DEFAULTS.recompute_every), "reshard-after-forward": _DEFAULTS.reshard_after_forward,
    "loss": _DEFAULTS.loss, "loss-chunks": str(_DEFAULTS.loss_chunks), "param-dtype": _DEFAULTS.param_dtype,
}
"""The CLI's defaults, as the page shows them."""

_PINS = {"micro-batch": "micro_batch", "grad-accum": "grad_accum", "tp": "tp", "pp": "pp", "vpp": "vpp", "ep": "ep",
         "cp": "cp", "zero": "zero_stage", "recompute": "recompute"}
_OPTION_NAMES = {"global-batch": "global_batch", "global-batch-tokens": "global_batch_tokens",
                 "train-tokens": "train_tokens", "max-deviation": "max_deviation", "seq-len": "seq_len",
                 "gpus-per-node": "gpus_per_node", "inter-node-bandwidth": "inter_node_bandwidth_bytes_per_s",
                 "hybrid-shard": "hybrid_shard", "recompute-every": "recompute_every", "fp8-recipe": "fp8_recipe",
                 "fp8-all-gather": "fp8_all_gather", "reshard-after-forward": "reshard_after_forward",
                 "loss-chunks": "loss_chunks", "param-dtype": "param_dtype"}


def parse_fields(query: Mapping[str, str], *, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """The parsed value of every non-empty field of ``query``; ``extra`` keys are the caller's (kept as text)."""
    values: dict[str, Any] = {}
    for key, text in query.items():
        if key in extra:
            values[key] = text
            continue
        field = FIELDS.get(key)
        if field is None:
            raise BatchpilotError(f"unknown field {key[:MAX_VALUE_CHARS]!r}; the fields are {', '.join(FIELDS)}")
        if len(text) > MAX_VALUE_CHARS:
            raise BatchpilotError(f"{field.flag} is {len(text):,} characters long; the limit is {MAX_VALUE_CHARS}")
        if text.strip():
            values[key] = field.parse(text, field.flag)
    return values


def plan_options(query: Mapping[str, str], *, uploaded: ModelSpec | None = None) -> PlanOptions:
    """The :class:`PlanOptions` of the page's fields; ``uploaded`` replaces the ``model`` preset."""
    values = parse_fields(query)
    model = uploaded if uploaded is not None else values.pop("model", None)
    values.pop("model", None)
    if model is None:
        raise BatchpilotError("--model is missing: pick a preset or upload a config.json")
    if "gpu" not in values:
        raise BatchpilotError("--gpu is missing: pick an accelerator (see `batchpilot hardware list`)")
    if "seq-len" not in values:
        raise BatchpilotError("--seq-len is missing: give the tokens per sequence, e.g. 8192 or 8Ki")
    pins = Pins(**{_PINS[k]: values.pop(k) for k in list(values) if k in _PINS})
    kwargs = {_OPTION_NAMES.get(k, k): v for k, v in values.items()}
    return PlanOptions(model=model, pins=pins, **kwargs)


def export_format(text: str | None) -> str:
    """The ``--export`` format named by ``text`` (one of :data:`~batchpilot.plan.exports.FORMATS`)."""
    if text is None or not text.strip():
        raise BatchpilotError(f"--export is missing; use one of {', '.join(FORMATS)}")
    return parse_choice(text[:MAX_VALUE_CHARS], "--export", tuple(FORMATS))
