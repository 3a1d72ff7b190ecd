"""What every exporter shares: the refusal type, the engine check (the plan must be one the engine runs from its
own configuration: :func:`batchpilot.plan.engines.plan_problems`), the launch shape, the export options, the
model's block class, and JSON/YAML/shell rendering."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from typing import Any

from batchpilot.errors import BatchpilotError
from batchpilot.plan.engines import Capabilities, get_engine, plan_problems
from batchpilot.plan.request import Plan, PlanRequest
from batchpilot.specs.model import ModelSpec


class ExportError(BatchpilotError):
    """The plan cannot be expressed in the requested format."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ExportOptions:
    """What an export carries besides the plan."""

    data: str | None = None
    """The training data the launched run reads (a path or the runner's ``stdlib``); None: left to the user
    (a placeholder where the engine needs one)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Exported:
    """An export: the text to save, and what the user must do that no setting of the format expresses."""

    text: str
    notes: tuple[str, ...] = ()


def require_engine(plan: Plan, request: PlanRequest, engine: str, fmt: str) -> Capabilities:
    """The engine's capabilities, or a one-line :class:`ExportError` with the first thing it cannot run."""
    caps = get_engine(engine)
    problems = plan_problems(caps, plan.settings, dp=plan.triad.data_parallel_ranks, accum=plan.triad.grad_accum_steps,
                             seq_len=request.seq_len)
    if problems:
        raise ExportError(f"--export {fmt}: {problems[0]}")
    return caps


def world_size(plan: Plan) -> int:
    """GPUs of the plan: dp × tp × pp × cp."""
    s = plan.settings
    return plan.triad.data_parallel_ranks * s.tp * s.pp * s.cp


def launch_shape(plan: Plan, request: PlanRequest) -> tuple[int, int]:
    """(nodes, processes per node) of the plan's world on the request's nodes."""
    world = world_size(plan)
    per_node = min(world, request.cluster.devices_per_node)
    return world // per_node, per_node


def decoder_layer_class(model: ModelSpec) -> str:
    """The import path of the model's transformer block in ``transformers`` (what FSDP wraps and checkpoints):
    the first of the causal-LM class's ``_no_split_modules``, in that class's module
    (``transformers.models.llama.modeling_llama.LlamaDecoderLayer``)."""
    try:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - transformers is a dependency
        raise ExportError("the block class comes from transformers, which is not importable") from None
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model.model_type)
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    blocks = getattr(cls, "_no_split_modules", None) or []
    if not blocks:
        raise ExportError(f"transformers has no causal-LM class with a block class for model_type "
                          f"{model.model_type!r} ({model.name}); name the block class in the FSDP wrap policy by hand")
    return f"{cls.__module__}.{blocks[0]}"


def render_json(value: Any) -> str:
    return json.dumps(value, indent=2) + "\n"


def render_shell(argv: list[str]) -> str:
    return " ".join(a if a.startswith("$") else shlex.quote(a) for a in argv) + "\n"


def render_yaml(value: dict[str, Any], *, header: list[str] | None = None) -> str:
    """A YAML mapping of scalars and one level of nested mappings (what accelerate's config file holds), with
    ``#`` comment lines on top. Strings are JSON-quoted (valid YAML); numbers and booleans plain."""
    lines = [f"# {h}" if h else "#" for h in header or []]
    for key, item in value.items():
        if isinstance(item, dict):
            lines.append(f"{key}:")
            lines += [f"  {k}: {_yaml_scalar(v)}" for k, v in item.items()]
        else:
            lines.append(f"{key}: {_yaml_scalar(item)}")
    return "\n".join(lines) + "\n"


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    raise TypeError(f"no YAML scalar for {value!r}")
