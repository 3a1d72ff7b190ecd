"""What every exporter shares: the refusal type, the model-parallel refusal, JSON and shell rendering."""

from __future__ import annotations

import json
import shlex
from typing import Any

from batchpilot.errors import BatchpilotError
from batchpilot.plan.request import Plan


class ExportError(BatchpilotError):
    """The plan cannot be expressed in the requested format."""


def refuse_model_parallel(plan: Plan, fmt: str) -> None:
    s = plan.settings
    if s.tp > 1 or s.pp > 1 or s.ep > 1:
        raise ExportError(
            f"--export {fmt}: the plan uses tp {s.tp}, pp {s.pp}, ep {s.ep}, which {fmt} cannot express "
            f"(data parallelism and ZeRO/FSDP only); pin --tp 1 --pp 1 --ep 1 or use --export megatron"
        )


def render_json(value: Any) -> str:
    return json.dumps(value, indent=2) + "\n"


def render_shell(argv: list[str]) -> str:
    return " ".join(a if a.startswith("$") else shlex.quote(a) for a in argv) + "\n"
