"""``batchpilot model list|show`` — the model presets and any Hugging Face config.json.

Examples::

    batchpilot model list
    batchpilot model show llama-3-8b --seq-len 8Ki
    batchpilot model show tiny-llama-1m --json
    batchpilot model show ./my-model/config.json --json
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from batchpilot.cli._common import PlainHelpCommand, PlainHelpGroup, console, handle_errors, print_json
from batchpilot.cli._options import JsonOpt, count, option
from batchpilot.specs.model import load_model, preset_names
from batchpilot.units import format_count

app = typer.Typer(help="Model presets and Hugging Face config.json files.", no_args_is_help=True, cls=PlainHelpGroup)


@app.command("list", cls=PlainHelpCommand)
@handle_errors
def list_models(json_output: JsonOpt = False) -> None:
    """List the shipped model presets."""
    specs = [load_model(name) for name in preset_names()]
    if json_output:
        print_json({"models": [s.to_dict() for s in specs]})
        return
    table = Table("name", "family", "layers", "hidden", "params", "active")
    for s in specs:
        table.add_row(s.name, s.family, str(s.num_layers), str(s.hidden_size), format_count(s.params_total),
                      format_count(s.params_active))
    console.print(table)


@app.command("show", cls=PlainHelpCommand)
@handle_errors
def show_model(
    model: str = typer.Argument(..., help="Preset name or path to a config.json (or its folder)."),
    seq_len: Annotated[int, option("--seq-len", count("--seq-len"), help=(
        "Tokens per sequence, for the FLOPs per token (4096, 8Ki)."))] = 2048,
    json_output: JsonOpt = False,
) -> None:
    """Show a model's shape, parameter counts and training FLOPs per token."""
    spec = load_model(model)
    record = spec.to_dict(seq_len=seq_len)
    if json_output:
        print_json(record)
        return
    table = Table("field", "value", title=f"{spec.name} ({spec.model_type})")
    for key, value in record.items():
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
        table.add_row(key, shown)
    console.print(table)
