"""Shared CLI plumbing: one-line errors with exit code 2, JSON output, the rich console.

Every command is thin: parse, call one library function, render. Library errors
(:class:`~batchpilot.errors.BatchpilotError`) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from batchpilot.errors import BatchpilotError

try:  # typer >= 0.22 vendors click as typer._click; older releases use click itself
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions  # type: ignore[no-redef]

MIN_CONSOLE_WIDTH = 80
"""Narrower than this (``COLUMNS=20``, ``COLUMNS=0``), rich cuts table cells to "…" (a plan's ``1×256×4`` became
``1×25…``) or prints nothing at all; below it the console renders at this width and the terminal wraps."""


def _console(*, stderr: bool = False) -> Console:
    made = Console(stderr=stderr)
    return made if made.width >= MIN_CONSOLE_WIDTH else Console(stderr=stderr, width=MIN_CONSOLE_WIDTH)


console = _console()
err_console = _console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

EXIT_USAGE = 2


def fail(message: str) -> NoReturn:
    """Print ``error: message`` as one line on stderr and exit with code 2."""
    first_line = " ".join(str(message).split())
    # Values from user files reach messages: show control characters (terminal escapes) as escapes.
    first_line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in first_line)
    typer.echo(f"error: {first_line}", err=True)
    raise typer.Exit(EXIT_USAGE)


def _plain(text: str | None) -> str | None:
    return None if text is None else escape(text)


def plain_help(command: Any) -> None:
    """Make the help texts of ``command`` (and of every command below a group) plain text, once.

    Typer's default ``rich_markup_mode="rich"`` (whenever rich is installed) parses every help string with
    ``rich.text.Text.from_markup``, so text in square brackets that looks like a markup tag (``[default 16]``)
    was silently dropped from ``--help``. Escaping the texts here prints them as written; defaults come from
    typer's own ``[default: …]`` (the option's default, or its ``show_default`` text).
    """
    if getattr(command, "_plain_help", False):
        return
    command._plain_help = True
    command.help = _plain(command.help)
    command.short_help = _plain(command.short_help)
    for param in command.params:
        if isinstance(getattr(param, "help", None), str):
            param.help = escape(param.help)
    for sub in getattr(command, "commands", {}).values():
        plain_help(sub)


class PlainHelpCommand(TyperCommand):
    """A command whose help texts print as written (see :func:`plain_help`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        plain_help(self)


class PlainHelpGroup(TyperGroup):
    """A command group whose help texts, and those of every command below it, print as written: the root
    ``batchpilot`` group is one, so a command registered without ``cls=PlainHelpCommand`` is covered too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        plain_help(self)


def deprecated_alias(old_flag: str, old_value: Any, new_flag: str, new_value: Any) -> Any:
    """The value of ``new_flag``, or of its hidden old name ``old_flag`` with a one-line note on stderr."""
    if old_value is None:
        return new_value
    if new_value is not None and new_value != old_value:
        raise BatchpilotError(f"{old_flag} is the old name of {new_flag}; give {new_flag} only")
    typer.echo(f"note: {old_flag} is deprecated; use {new_flag} (same meaning)", err=True)
    return old_value


def handle_errors(command: F) -> F:
    """Decorator: turn library errors (and bad files) into one line on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except BatchpilotError as exc:
            fail(str(exc))
        except OSError as exc:  # missing, unwritable, name too long, disk full, read-only file system ...
            where = f": {exc.filename}" if exc.filename else ""
            fail(f"{exc.strerror or exc}{where}")
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def run_app(app: typer.Typer, args: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; a usage error (bad flag value, unknown option) is one line.

    Click's standalone mode prints usage errors as a multi-line panel; here they become
    ``error: Invalid value for '--seq-len': ...`` on stderr and exit code 2, like library errors.
    """
    command = typer.main.get_command(app)
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:  # PYTHONIOENCODING=ascii: "×" or "ü" shown as \xd7 instead of a traceback
        reconfigure(errors="backslashreplace")
    try:
        result = command.main(args=args, prog_name="batchpilot", standalone_mode=False)
    except click_exceptions.NoArgsIsHelpError as exc:  # the help text is already printed
        return exc.exit_code
    except click_exceptions.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        typer.echo(f"error: {' '.join(exc.format_message().split())}{hint}", err=True)
        return exc.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 1
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def print_json(record: Any) -> None:
    """Print one JSON object (stable keys; non-finite floats become null) on stdout."""
    sys.stdout.write(json.dumps(_json_safe(record), indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()
