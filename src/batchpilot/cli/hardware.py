"""``batchpilot hardware list|show`` — the accelerator catalog and user accelerator files.

Examples::

    batchpilot hardware list
    batchpilot hardware show h100-sxm
    batchpilot hardware show ./my-gpu.json --json
"""

from __future__ import annotations

import typer
from rich.table import Column, Table

from batchpilot.cli._common import console, handle_errors, print_json
from batchpilot.specs.hardware import DTYPES, AcceleratorSpec, accelerator_names, load_accelerator
from batchpilot.units import format_bytes

app = typer.Typer(help="Accelerator catalog: memory, dense peak FLOP/s, bandwidths, with sources.",
                  no_args_is_help=True)


def _tflops(spec: AcceleratorSpec, dtype: str) -> str:
    value = spec.peak_flops.get(dtype)
    return "—" if value is None else f"{value / 1e12:,.1f}"


@app.command("list")
@handle_errors
def list_hardware(json_output: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """List the shipped accelerators (dense TFLOP/s; GB/s one direction)."""
    specs = [load_accelerator(name) for name in accelerator_names()]
    if json_output:
        print_json({"accelerators": [s.to_dict() for s in specs]})
        return
    table = Table(Column("name", no_wrap=True), Column("memory", no_wrap=True), *(f"{d} TFLOP/s" for d in DTYPES),
                  "DRAM GB/s", "intra-node GB/s",
                  title="dense peak figures; memory in GiB (binary); bandwidths in GB/s (10^9 B/s)")
    for s in specs:
        table.add_row(s.name, format_bytes(s.memory_bytes), *(_tflops(s, d) for d in DTYPES),
                      f"{s.memory_bandwidth_bytes_per_s / 1e9:,.0f}",
                      f"{s.intra_node_bandwidth_bytes_per_s / 1e9:,.0f}")
    console.print(table)


@app.command("show")
@handle_errors
def show_hardware(
    accelerator: str = typer.Argument(..., help="Catalog name (see `hardware list`) or path to a JSON file."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Show one accelerator's figures and the source of each."""
    spec = load_accelerator(accelerator)
    if json_output:
        print_json(spec.to_dict())
        return
    table = Table(Column("figure", no_wrap=True), "value", Column("source", overflow="fold"), title=f"{spec.display_name} ({spec.name})", show_lines=True)
    values = {
        "memory_bytes": f"{spec.memory_bytes:,} B ({format_bytes(spec.memory_bytes)})",
        "memory_bandwidth_bytes_per_s": f"{spec.memory_bandwidth_bytes_per_s / 1e9:,.0f} GB/s",
        "intra_node_bandwidth_bytes_per_s":
            f"{spec.intra_node_bandwidth_bytes_per_s / 1e9:,.0f} GB/s one direction ({spec.intra_node_link})",
    }
    values.update({f"peak_flops.{d}": f"{_tflops(spec, d)} TFLOP/s dense" for d in spec.supported_dtypes})
    for key in spec.figure_names():
        source = spec.sources.get(key)
        shown = "(no source given)" if source is None else f"{source.says}\n{source.url}"
        table.add_row(key, values[key], shown)
    console.print(table)
    if spec.notes:
        console.print(spec.notes)
