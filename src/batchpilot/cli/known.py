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
from batchpilot.cli._options import JsonOpt
from batchpilot.errors import UnknownNameError
from batchpilot.plan.registry import RegistryEntry, exact, names, search
from batchpilot.rl.recipes import recipe_for
from batchpilot.units import format_count


def _batch(e: RegistryEntry) -> str:
    if not e.published:
        return "not published"
    tokens = "" if e.global_batch_tokens is None else f" = {format_count(e.global_batch_tokens)} tok"
    unit = "responses" if e.stage == "rl" else "seqs"
    return f"{e.global_batch_sequences:,} {unit} × {e.seq_len}{tokens}"


def _source_label(url: str) -> str:
    """A short name for the table (``arXiv:2407.21783``, else the host); the whole URL is printed below it."""
    bare = url.removeprefix("https://").removeprefix("http://").removeprefix("www.")
    if bare.startswith("arxiv.org/abs/"):
        return "arXiv:" + bare.removeprefix("arxiv.org/abs/")
    return bare.split("/", 1)[0]


def _link(url: str) -> Text:
    """The whole URL as one terminal link: printed with ``soft_wrap`` it is never cut or folded mid-word."""
    return Text(url, style=f"link {url}")


@handle_errors
def known(
    query: str = typer.Argument("", help="Words to match in the model name, aliases, hardware or paper title."),
    json_output: JsonOpt = False,
) -> None:
    """List the published global batch sizes of known models, with their sources.

    One match shows the whole entry (source section, quote, hardware, how it was checked)."""
    found = search(query)
    if not found:
        raise UnknownNameError(f"no registry entry matches {query!r}; known: {', '.join(names())}")
    if json_output:
        print_json({"query": query, "entries": [e.to_dict() for e in found],
                    "rl": {e.name: r.to_dict() for e in found if (r := recipe_for(e)) is not None}})
        return
    named = exact(query)
    if len(found) == 1 or named is not None:
        _show_entry(named or found[0])
        return
    table = Table(Column("name", no_wrap=True), Column("final global batch", min_width=16), "schedule",
                  Column("source", no_wrap=True),
                  title="published training batch sizes (final batch of a ramp or staged schedule)",
                  caption="one name (batchpilot known NAME) shows the source section and quote; --json has all")
    for e in found:
        schedule = "—" if e.schedule is None else e.schedule.describe()
        table.add_row(e.name, _batch(e), schedule, Text(_source_label(e.source.url), style=f"link {e.source.url}"))
    console.print(table)
    for url in dict.fromkeys(e.source.url for e in found):
        console.print(Text.assemble(f"{_source_label(url)}: ", _link(url)), soft_wrap=True)


def _show_entry(e: RegistryEntry) -> None:
    """Every field of one entry, as label: value lines (values are data: printed without markup); the URL on a
    line of its own, whole."""
    before = [
        ("model", e.model + (f" ({', '.join(e.aliases)})" if e.aliases else "")),
        ("stage", e.stage),
        ("final global batch", _batch(e)),
        ("as published", e.tokens_as_published),
        ("schedule", "—" if e.schedule is None else e.schedule.describe()),
        ("hardware", e.hardware or "—"),
        ("training tokens", format_count(e.total_training_tokens) if e.total_training_tokens else "—"),
        ("source", f"{e.source.title}, {e.source.section}"),
    ]
    rl = recipe_for(e)
    if rl is not None:  # an RL recipe: its whole batch hierarchy (batchpilot.rl.recipes)
        before.insert(3, ("RL batch", rl.describe()))
    after = [("quote", e.source.quote), ("checked", e.verification), ("notes", e.notes or "—")]
    width = max(len(label) for label, _ in before + after)
    console.print(Text(e.name, style="bold"))
    console.print(_grid(before, width))
    console.print(Text.assemble((f"{'url':<{width}}  ", "bold"), _link(e.source.url)), soft_wrap=True)
    console.print(_grid(after, width))


def _grid(rows: list[tuple[str, str]], label_width: int) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True, min_width=label_width)
    grid.add_column(overflow="fold")
    for label, value in rows:
        grid.add_row(label, Text(value))
    return grid
