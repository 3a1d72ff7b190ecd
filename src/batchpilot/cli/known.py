"""``batchpilot known [QUERY]`` — published training batch sizes of known models, with sources.

Examples::

    batchpilot known
    batchpilot known deepseek
    batchpilot known "llama 3" --json
"""

from __future__ import annotations

import typer
from rich.table import Column, Table

from batchpilot.cli._common import console, handle_errors, print_json
from batchpilot.errors import UnknownNameError
from batchpilot.plan.registry import RegistryEntry, names, search


def _batch(e: RegistryEntry) -> str:
    if not e.published:
        return "not published"
    tokens = "" if e.global_batch_tokens is None else f" = {e.global_batch_tokens:,} tokens"
    unit = "responses" if e.stage == "rl" else "seqs"
    return f"{e.global_batch_sequences:,} {unit} × {e.seq_len}{tokens}"


@handle_errors
def known(
    query: str = typer.Argument("", help="Words to match in the model name, aliases, hardware or paper title."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """List the published global batch sizes of known models (final batch; schedule; source)."""
    found = search(query)
    if not found:
        raise UnknownNameError(f"no registry entry matches {query!r}; known: {', '.join(names())}")
    if json_output:
        print_json({"query": query, "entries": [e.to_dict() for e in found]})
        return
    table = Table(Column("name", no_wrap=True), "final global batch", "as published", "schedule",
                  Column("source", overflow="fold"), show_lines=True,
                  title="published training batch sizes (final batch of a ramp or staged schedule)")
    for e in found:
        schedule = "—" if e.schedule is None else e.schedule.describe()
        table.add_row(e.name, _batch(e), e.tokens_as_published, schedule, f"{e.source.title}, {e.source.section}")
    console.print(table)
