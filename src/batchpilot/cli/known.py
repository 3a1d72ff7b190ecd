"""``batchpilot known [QUERY]`` — published training batch sizes of known models, with sources.

Examples::

    batchpilot known
    batchpilot known deepseek
    batchpilot known "llama 3" --json
"""

from __future__ import annotations

import typer
from rich.table import Column, Table
from rich.text import Text

from batchpilot.cli._common import console, handle_errors, print_json
from batchpilot.errors import UnknownNameError
from batchpilot.plan.registry import RegistryEntry, names, search
from batchpilot.units import format_count


def _batch(e: RegistryEntry) -> str:
    if not e.published:
        return "not published"
    tokens = "" if e.global_batch_tokens is None else f" = {format_count(e.global_batch_tokens)} tok"
    unit = "responses" if e.stage == "rl" else "seqs"
    return f"{e.global_batch_sequences:,} {unit} × {e.seq_len}{tokens}"


def _short_url(url: str) -> str:
    return url.removeprefix("https://").removeprefix("http://").removeprefix("www.")


@handle_errors
def known(
    query: str = typer.Argument("", help="Words to match in the model name, aliases, hardware or paper title."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """List the published global batch sizes of known models (final batch; schedule; source); one match
    shows the whole entry (source section, quote, hardware, how it was checked)."""
    found = search(query)
    if not found:
        raise UnknownNameError(f"no registry entry matches {query!r}; known: {', '.join(names())}")
    if json_output:
        print_json({"query": query, "entries": [e.to_dict() for e in found]})
        return
    exact = [e for e in found if query.strip().lower() == e.name]
    if len(found) == 1 or exact:
        _show_entry((exact or found)[0])
        return
    table = Table(Column("name", no_wrap=True), Column("final global batch", min_width=16), "schedule",
                  Column("source", max_width=26, overflow="fold"),
                  title="published training batch sizes (final batch of a ramp or staged schedule)",
                  caption="one name (batchpilot known NAME) shows the source section and quote; --json has all")
    for e in found:
        schedule = "—" if e.schedule is None else e.schedule.describe()
        table.add_row(e.name, _batch(e), schedule, _short_url(e.source.url))
    console.print(table)


def _show_entry(e: RegistryEntry) -> None:
    """Every field of one entry, as label: value lines (values are data: printed without markup)."""
    rows = [
        ("model", e.model + (f" ({', '.join(e.aliases)})" if e.aliases else "")),
        ("stage", e.stage),
        ("final global batch", _batch(e)),
        ("as published", e.tokens_as_published),
        ("schedule", "—" if e.schedule is None else e.schedule.describe()),
        ("hardware", e.hardware or "—"),
        ("training tokens", format_count(e.total_training_tokens) if e.total_training_tokens else "—"),
        ("source", f"{e.source.title}, {e.source.section}"),
        ("url", e.source.url),
        ("quote", e.source.quote),
        ("checked", e.verification),
        ("notes", e.notes or "—"),
    ]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for label, value in rows:
        grid.add_row(label, Text(value))
    console.print(Text(e.name, style="bold"))
    console.print(grid)
