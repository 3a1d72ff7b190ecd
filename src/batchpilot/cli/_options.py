"""The flags the commands share — one definition each: name, value syntax, default, help, validation.

Every value is parsed by batchpilot's own parsers (:mod:`batchpilot.units` for counts, sizes and
durations), so a bad value is the library's one line ``error: --flag 'value' …`` and exit code 2 in
every command, before any work starts — never a typer message. Use the ``Annotated`` aliases as
parameter types; the default goes in the signature (where commands differ, the help of the command
says why)::

    @handle_errors
    def probe(model: ModelOpt = DEMO_MODEL, seq_len: SeqLenOpt = DEMO_SEQ_LEN, gpu: GpuOpt = None,
              device: DeviceOpt = "auto", json_output: JsonOpt = False) -> None: ...

Counts of tokens and sequences take units everywhere (``4Ki`` = 4,096, ``4M`` = 4,000,000); byte sizes
``6GiB``/``80GB``; durations ``90s``/``10m``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer

from batchpilot.cli._common import fail
from batchpilot.errors import BatchpilotError
from batchpilot.units import (
    parse_bytes,
    parse_choice,
    parse_count,
    parse_fraction,
    parse_seconds,
    parse_whole,
)

DEMO_MODEL = "tiny-llama-1m"
"""The model of the commands that run steps here (probe, noise, train, tune) when none is given."""
DEMO_SEQ_LEN = 256
"""Their sequence length when none is given (``train`` uses 128: see its ``--seq-len``)."""
DEVICES = ("auto", "cpu", "cuda")


# ------------------------------------------------------------------------------------------ parsers
def _parser(flag: str, parse: Callable[[Any, str], Any], metavar: str) -> Callable[[Any], Any]:
    """A typer ``parser=``: ``parse(value, flag)``, a library error → one line on stderr and exit 2."""

    def parser(value: Any) -> Any:
        try:
            return parse(value, flag)
        except BatchpilotError as exc:
            fail(str(exc))

    parser.__name__ = metavar  # what typer would show as the value's type
    return parser


def _number(value: Any, flag: str) -> float:
    try:
        return float(str(value).strip())
    except ValueError:
        raise BatchpilotError(f"{flag} {value!r} is not a number") from None


def count(flag: str) -> Callable[[Any], int]:
    """A positive count with an optional unit: ``4096``, ``4Ki``, ``4M`` (:func:`~batchpilot.units.parse_count`)."""
    return _parser(flag, parse_count, "COUNT")


def size(flag: str) -> Callable[[Any], int]:
    """A byte size: ``6GiB``, ``80GB`` (:func:`~batchpilot.units.parse_bytes`)."""
    return _parser(flag, parse_bytes, "SIZE")


def duration(flag: str) -> Callable[[Any], float]:
    """Seconds: ``90``, ``90s``, ``10m``, ``1.5h`` (:func:`~batchpilot.units.parse_seconds`)."""
    return _parser(flag, parse_seconds, "DURATION")


def whole(flag: str) -> Callable[[Any], int]:
    """A whole number (its range is the library's to check: the rule and the fix are known there)."""
    return _parser(flag, parse_whole, "INT")


def number(flag: str) -> Callable[[Any], float]:
    """A real number (nan/inf pass through to the library, which refuses them with the rule)."""
    return _parser(flag, _number, "FLOAT")


def fraction(flag: str) -> Callable[[Any], float]:
    """A fraction in [0, 1): ``0.1`` or ``10%``."""
    return _parser(flag, parse_fraction, "FRACTION")


def choice(flag: str, choices: tuple[str, ...]) -> Callable[[Any], str]:
    """One of ``choices`` (case-insensitive), in the library's words when it is not."""

    def parse(value: Any, flag: str) -> str:
        return parse_choice(value, flag, choices)

    listed = "|".join(choices)
    parser = _parser(flag, parse, listed if len(listed) <= _MAX_METAVAR else "NAME")
    parser.choices = choices  # type: ignore[attr-defined]  # for option(): listed in the help when too long
    return parser


_MAX_METAVAR = 24
"""Longer choice lists are named in the help text instead of the value column (which would squeeze it)."""


def option(flag: str, parse: Callable[[Any], Any] | None = None, **kwargs: Any) -> Any:
    """``typer.Option(flag, …)`` with a batchpilot parser and its metavar (``COUNT``, ``SIZE``, ``a|b|c``)."""
    if parse is None:
        return typer.Option(flag, **kwargs)
    choices = getattr(parse, "choices", None)
    if choices and parse.__name__ == "NAME":
        kwargs["help"] = f"{kwargs.get('help', '').rstrip('.')}: {', '.join(choices)}."
    return typer.Option(flag, parser=parse, metavar=parse.__name__, **kwargs)


# ------------------------------------------------------------------------------------- shared flags
_MODEL_HELP = "Preset name (see `batchpilot model list`) or a Hugging Face config.json (or its folder)."
ModelOpt = Annotated[str, option("--model", help=_MODEL_HELP)]
TrainModelOpt = Annotated[str, option("--model", help=(
    f"{_MODEL_HELP[:-1]}, a local pretrained folder, or a `batchpilot train` run folder (its newest good "
    "checkpoint's weights only: a new run, not --resume)."))]
GpuOpt = Annotated[str, option("--gpu", metavar="NAME|FILE", help=(
    "Accelerator: a catalog name (see `batchpilot hardware list`) or a JSON file in the same format "
    "(`batchpilot hardware show NAME --json` writes one)."))]
GpusOpt = Annotated[int, option("--gpus", whole("--gpus"), help="GPUs in the job.")]
GpusPerNodeOpt = Annotated[int, option("--gpus-per-node", whole("--gpus-per-node"),
                                       help="GPUs per node (a smaller job uses part of one node).")]
SeqLenOpt = Annotated[int, option("--seq-len", count("--seq-len"), help="Tokens per sequence.")]
GlobalBatchOpt = Annotated[int | None, option("--global-batch", count("--global-batch"),
                                               help="Global batch in sequences (per optimizer step).")]
GlobalBatchTokensOpt = Annotated[int | None, option(
    "--global-batch-tokens", count("--global-batch-tokens"),
    help="Global batch in tokens (4Mi = 4,194,304; 4M = 4,000,000).")]
TrainTokensOpt = Annotated[int | None, option("--train-tokens", count("--train-tokens"), help=(
    "Planned training tokens D (e.g. 2T): the DeepSeek LLM scaling-law prior B_opt(C)."))]
MemoryBudgetOpt = Annotated[int | None, option("--memory-budget", size("--memory-budget"), help=(
    "Memory the probe may use (e.g. 6GiB)."))]
DeviceOpt = Annotated[str, option("--device", choice("--device", DEVICES), help=(
    "Where the steps run: auto picks cuda when torch sees a GPU, else cpu."))]
DataOpt = Annotated[str, option("--data", help=(
    "stdlib (the Python standard library's source), a text/JSONL/Parquet file or folder, or hf:NAME[:SPLIT]."))]
TokenizerOpt = Annotated[str, option("--tokenizer", help=(
    "bytes, bpe:VOCAB (trained on the corpus, cached) or a local tokenizer folder."))]
SeedOpt = Annotated[int, option("--seed", whole("--seed"), help="Model init and data order.")]
ThreadsOpt = Annotated[int | None, option("--threads", whole("--threads"), show_default="torch's default",
                                          help="CPU threads per process.")]
JsonOpt = Annotated[bool, option("--json", help="Print one JSON object on stdout (stable keys).")]
