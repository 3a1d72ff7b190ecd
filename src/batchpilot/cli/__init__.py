"""The ``batchpilot`` command line. Thin: each command parses, calls one library function, renders.

Register a command group here with ``app.add_typer`` or a command with ``app.command``; each lives in
its own module under ``batchpilot.cli``. The root group is a :class:`~batchpilot.cli._common.PlainHelpGroup`
(every help text below it prints as written, brackets included); commands share their flags through
``batchpilot.cli._options`` and ``_settings`` (``tests/cli/test_cli_contract.py`` holds every command to them).
``--help`` lists the commands in the order a user meets them: ``tune`` first.
"""

from __future__ import annotations

import sys

try:  # Ctrl-C while the commands import (torch, transformers: ~0.2 s): one line and 130, not a traceback
    import typer

    from batchpilot import __version__
    from batchpilot.cli import hardware, known, model, report, serve
    from batchpilot.cli import memory as memory_cli
    from batchpilot.cli import noise as noise_cli
    from batchpilot.cli import plan as plan_cli
    from batchpilot.cli import probe as probe_cli
    from batchpilot.cli import rl as rl_cli
    from batchpilot.cli import train as train_cli
    from batchpilot.cli import tune as tune_cli
    from batchpilot.cli._common import PlainHelpCommand, PlainHelpGroup, run_app
except KeyboardInterrupt:
    sys.stderr.write("interrupted\n")
    raise SystemExit(130) from None

app = typer.Typer(
    name="batchpilot",
    help="Pick, prove and run the batch size for LLM training: memory, speed and convergence.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=PlainHelpGroup,
)
for _name, _command in (
    ("tune", tune_cli.tune), ("plan", plan_cli.plan_command), ("memory", memory_cli.memory),
    ("probe", probe_cli.probe), ("noise", noise_cli.noise), ("train", train_cli.train_command),
    ("tokenize", train_cli.tokenize_command), ("report", report.report), ("known", known.known), ("serve", serve.serve),
):
    app.command(_name, cls=PlainHelpCommand)(_command)
app.add_typer(model.app, name="model")  # groups are listed after the commands
app.add_typer(hardware.app, name="hardware")
app.add_typer(rl_cli.app, name="rl")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"batchpilot {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """batchpilot: which batch size to use on your hardware, and the proof."""


def main() -> None:
    """Console-script entry point (usage errors as one line, exit 2: see ``_common.run_app``)."""
    raise SystemExit(run_app(app))
