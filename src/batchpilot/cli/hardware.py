"""``batchpilot hardware list|show|networks`` — the accelerator catalog, user accelerator files, cluster networks.

Examples::

    batchpilot hardware list
    batchpilot hardware show h100-sxm
    batchpilot hardware show ./my-gpu.json --json
    batchpilot hardware networks
    batchpilot hardware networks ib-ndr --json
"""

from __future__ import annotations

import typer
from rich.table import Column, Table
from rich.text import Text

from batchpilot.cli._common import PlainHelpCommand, PlainHelpGroup, console, handle_errors, print_json
from batchpilot.cli._options import JsonOpt
from batchpilot.specs.hardware import DTYPES, AcceleratorSpec, accelerator_names, load_accelerator
from batchpilot.specs.network import NetworkSpec, load_network, network_names
from batchpilot.units import format_bytes

app = typer.Typer(help="Accelerator catalog: memory, dense peak FLOP/s, bandwidths, with sources.",
                  no_args_is_help=True, cls=PlainHelpGroup)


def _tflops(spec: AcceleratorSpec, dtype: str) -> str:
    value = spec.peak_flops.get(dtype)
    return "—" if value is None else f"{value / 1e12:,.1f}"


@app.command("list", cls=PlainHelpCommand)
@handle_errors
def list_hardware(json_output: JsonOpt = False) -> None:
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


@app.command("show", cls=PlainHelpCommand)
@handle_errors
def show_hardware(
    accelerator: str = typer.Argument(..., help="Catalog name (see `hardware list`) or path to a JSON file."),
    json_output: JsonOpt = False,
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


# ---------------------------------------------------------------------- networks
def _measured(spec: NetworkSpec) -> str:
    if not spec.measured_all_reduce:
        return "not published"
    first = spec.measured_all_reduce[0]
    return f"{first.bus_bandwidth_bytes_per_s / 1e9:,.0f} ({spec.achieved_fraction:.0%} of peak, {first.algorithm})"


@app.command("networks", cls=PlainHelpCommand)
@handle_errors
def networks(
    name: str = typer.Argument("", help="A network (name or alias, e.g. ib-ndr, p5, nvl72) to show with its "
                                        "sources; none lists them all."),
    json_output: JsonOpt = False,
) -> None:
    """Cluster networks: inter-node fabrics and NVLink domains, link peak per GPU and the published all-reduce
    bus bandwidth (achieved, not link peak)."""
    specs = [load_network(name)] if name else [load_network(n) for n in network_names()]
    if json_output:
        print_json(specs[0].to_dict() if name else {"networks": [s.to_dict() for s in specs]})
        return
    table = Table(Column("name", no_wrap=True), "scope", Column("GPUs / node", justify="right"),
                  Column("ports × Gb/s", no_wrap=True), Column("GB/s per GPU", justify="right"),
                  "measured busbw GB/s",
                  title="link peak one direction; busbw = nccl-tests all-reduce bus bandwidth (scale-out: "
                        "per node, vs its ports' sum)")
    for s in specs:
        table.add_row(s.name, s.scope, str(s.gpus_per_node),
                      f"{s.nics_per_node} × {s.nic_bandwidth_bytes_per_s * 8 / 1e9:,.0f}",
                      f"{s.per_gpu_bandwidth_bytes_per_s / 1e9:,.1f}", _measured(s))
    console.print(table)
    for s in specs if name else []:
        console.print(Text(s.display_name, style="bold"))
        sources = [s.sources["nic_bandwidth_bytes_per_s"], *(m.source for m in s.measured_all_reduce)]
        for source in sources:  # the text wraps; the URL is one whole link
            console.print(Text(f"- {source.says}"))
            console.print(Text.assemble("  ", (source.url, f"link {source.url}")), soft_wrap=True)
        if s.notes:
            console.print(Text(s.notes))
