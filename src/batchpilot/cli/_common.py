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

from batchpilot.errors import BatchpilotError

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

EXIT_USAGE = 2


def fail(message: str) -> NoReturn:
    """Print ``error: message`` as one line on stderr and exit with code 2."""
    first_line = " ".join(str(message).split())
    typer.echo(f"error: {first_line}", err=True)
    raise typer.Exit(EXIT_USAGE)


def handle_errors(command: F) -> F:
    """Decorator: turn library errors (and bad files) into one line on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except BatchpilotError as exc:
            fail(str(exc))
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
            fail(f"{exc.strerror or 'cannot access'}: {exc.filename}")
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


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
