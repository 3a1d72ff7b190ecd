"""One CLI vocabulary: every command's flags checked against the same rules, parametrised over the commands.

- the shared flags have one name, one value syntax (the parser behind them), one default — or a default
  that differs for a reason listed here and said in the command's help;
- every value a command parses is checked by batchpilot's parsers: a bad one is the library's one line
  ``error: --flag 'value' …`` and exit code 2, never a typer message, before any work starts;
- ``--help`` prints every help text whole (typer's rich markup mode ate ``[default 16]``) and shows the
  default of every option that has one; every command has ``--json``; ``tune`` is listed first;
- no command offers a flag it cannot honour (``probe`` runs one device: no layout flags).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.core import TyperGroup, TyperOption

from batchpilot.cli import app
from batchpilot.cli._common import PlainHelpCommand, PlainHelpGroup, deprecated_alias, run_app
from batchpilot.cli._options import choice
from batchpilot.cli._settings import CPU_PRECISION, DEFAULTS, step_precision
from batchpilot.errors import BatchpilotError
from batchpilot.specs.settings import ATTENTIONS, ENGINES, OPTIMIZERS, PRECISIONS, RECOMPUTES


def _leaves(group: Any, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    found: dict[tuple[str, ...], Any] = {}
    for name, command in group.commands.items():
        if isinstance(command, TyperGroup):
            found.update(_leaves(command, (*path, name)))
        else:
            found[(*path, name)] = command
    return found


ROOT = typer.main.get_command(app)
COMMANDS = _leaves(ROOT)
IDS = [" ".join(path) for path in COMMANDS]


def _options(command: Any) -> dict[str, TyperOption]:
    return {p.opts[0]: p for p in command.params
            if isinstance(p, TyperOption) and not p.hidden and p.opts[0] != "--help"}


def _parser(option: TyperOption) -> Any:
    """The ``parser=`` behind the option: batchpilot's (``batchpilot.cli._options``), or None (typer's)."""
    return option.type_descriptor.parameter_info.parser


def _parsed(option: TyperOption) -> bool:
    return _parser(option) is not None


# The shared flags: the value syntax each one has in every command that offers it (a choice shows its values,
# or NAME when they are too many for the value column).
SHARED_SYNTAX = {
    "--model": "TEXT", "--gpu": "NAME|FILE", "--gpus": "INT", "--gpus-per-node": "INT", "--seq-len": "COUNT",
    "--micro-batch": "COUNT", "--global-batch": "COUNT", "--global-batch-tokens": "COUNT",
    "--train-tokens": "COUNT", "--tokens": "COUNT", "--memory-budget": "SIZE", "--device": "auto|cpu|cuda",
    "--precision": choice("--precision", PRECISIONS).__name__, "--optimizer": choice("--optimizer", OPTIMIZERS).__name__,
    "--recompute": choice("--recompute", RECOMPUTES).__name__, "--attention": choice("--attention", ATTENTIONS).__name__,
    "--engine": choice("--engine", ENGINES).__name__, "--zero": "INT", "--tp": "INT", "--pp": "INT", "--vpp": "INT",
    "--ep": "INT", "--data": "TEXT", "--tokenizer": "TEXT", "--seed": "INT", "--steps": "INT", "--threads": "INT",
    "--lr": "FLOAT", "--warmup-steps": "INT", "--json": "BOOL",
}

# A flag name with another value set, and why.
SYNTAX_EXCEPTIONS = {
    ("--engine", "rl plan"): "fsdp|megatron: the RL update backend (verl's actor strategy), not plan's bookkeeping",
    ("--engine", "plan"): "the engine that runs the plan (batchpilot, deepspeed, hf, …); memory's names the bookkeeping",
    ("--engine", "tune"): "the engine of the cluster plan, as plan's",
}

# Defaults that differ between commands, and why (each reason is also in the command's --help).
DEFAULT_EXCEPTIONS = {
    ("--engine", "plan"): "the Hugging Face Trainer (--export hf, accelerate, hf-deepspeed)",
    ("--engine", "tune"): "batchpilot: the runner tune measures and verifies with",
    ("--data", "plan"): "the exported run's data: the user's unless given",
    ("--model", "rl plan"): "the --like recipe's", ("--gpu", "rl plan"): "the --like recipe's",
    ("--gpus", "rl plan"): "the --like recipe's", ("--engine", "rl plan"): "megatron for MoE, else fsdp",
    ("--seq-len", "train"): "128 keeps the no-argument train demo at about two CPU minutes",
    ("--seq-len", "model show"): "FLOPs per token of a GPU-scale model, at the common 2048",
    ("--micro-batch", "plan"): "a pin: searched unless given",
    ("--micro-batch", "train"): "the global batch / --nproc",
    ("--micro-batch", "noise"): "B_small of the noise measurement",
    ("--global-batch", "plan"): "one of five exclusive targets",
    ("--global-batch", "train"): "16, shown; None tells it from --global-batch-tokens",
    ("--gpus", "tune"): "1 with --gpu; no cluster plan without --gpu",
    ("--memory-budget", "tune"): "1 GiB on a CPU so the probe fits in --time-budget",
    ("--steps", "noise"): "K = 20 steps for the band (train: the 30-step demo)",
    ("--warmup-steps", "probe"): "untimed probe steps, not a learning-rate warmup",
    ("--lr", "noise"): "the noise run's constant rate",
    ("--gpu", "probe"): "the GPU the probe runs on: optional (CPU probes need none)",
    ("--gpu", "tune"): "an optional target cluster",
    ("--model", "memory"): "a GPU-scale question: the model is the user's",
    ("--model", "plan"): "a GPU-scale question: the model is the user's",
    ("--seq-len", "memory"): "a GPU-scale question: the sequence length is the user's",
    ("--seq-len", "plan"): "a GPU-scale question: the sequence length is the user's",
    ("--precision", "probe"): "steps run here: fp32 on a CPU",
    ("--precision", "train"): "steps run here: fp32 on a CPU",
    ("--precision", "tune"): "steps run here: fp32 on a CPU",
    ("--recompute", "plan"): "a pin: searched unless given",
    ("--zero", "plan"): "a pin", ("--tp", "plan"): "a pin", ("--pp", "plan"): "a pin", ("--vpp", "plan"): "a pin",
    ("--ep", "plan"): "a pin",
}


def _syntax(option: TyperOption) -> str:
    if option.is_flag:
        return "BOOL"
    return str(option.metavar) if _parsed(option) or option.metavar else "TEXT"


def _default(option: TyperOption) -> Any:
    return option.show_default if isinstance(option.show_default, str) else option.default


@pytest.mark.parametrize("flag", sorted(SHARED_SYNTAX))
def test_a_shared_flag_has_one_syntax_and_one_default(flag: str) -> None:
    offered = {" ".join(path): _options(c)[flag] for path, c in COMMANDS.items() if flag in _options(c)}
    assert offered, f"{flag} is offered by no command"
    syntax = {name: _syntax(o) for name, o in offered.items() if (flag, name) not in SYNTAX_EXCEPTIONS}
    assert syntax == dict.fromkeys(syntax, SHARED_SYNTAX[flag])
    usual = {name: _default(o) for name, o in offered.items() if (flag, name) not in DEFAULT_EXCEPTIONS}
    assert len({repr(v) for v in usual.values()}) <= 1, f"{flag} defaults differ: {usual}"


# Commands without --json, and why.
NO_JSON = {("serve",): "a long-running web server: its JSON is the page's API (the same records as plan --json)"}


@pytest.mark.parametrize("path", list(COMMANDS), ids=IDS)
def test_every_command_has_json_and_plain_help(path: tuple[str, ...]) -> None:
    command = COMMANDS[path]
    assert getattr(command, "_plain_help", False), f"{' '.join(path)}: help texts not escaped (batchpilot.cli._common)"
    if path in NO_JSON:
        return
    json_flag = _options(command).get("--json")
    assert json_flag is not None and json_flag.is_flag and json_flag.default is False
    assert json_flag.help == "Print one JSON object on stdout (stable keys)."


def test_groups_print_plain_help_too() -> None:
    assert isinstance(ROOT, PlainHelpGroup)
    assert all(getattr(ROOT.commands[g], "_plain_help", False) for g in ("model", "hardware"))


def test_plain_help_escapes_once_and_covers_commands_below_a_group() -> None:
    """A command registered without ``cls=PlainHelpCommand`` under the root group is escaped by the group; a
    command escaped by its class is not escaped twice (``\\[`` would print a backslash)."""
    bare = typer.Typer(cls=PlainHelpGroup)

    @bare.command("a")
    def a(x: int = typer.Option(1, "--x", help="Global batch [default 16].")) -> None: ...

    @bare.command("b", cls=PlainHelpCommand)
    def b(x: int = typer.Option(1, "--x", help="Global batch [default 16].")) -> None: ...

    group = typer.main.get_command(bare)
    helps = {name: command.params[0].help for name, command in group.commands.items()}
    assert helps == {"a": "Global batch \\[default 16].", "b": "Global batch \\[default 16]."}


@pytest.mark.parametrize("path", list(COMMANDS), ids=IDS)
def test_no_value_is_checked_by_typer(path: tuple[str, ...]) -> None:
    """Numbers and choices go through batchpilot's parsers; only free text (names, paths) and flags do not."""
    for flag, option in _options(COMMANDS[path]).items():
        if not option.is_flag:
            annotation = option.type_descriptor.annotation
            assert _parsed(option) or annotation in (str, Path), f"{flag} is parsed by typer ({annotation!r})"


def _bad_value_cases() -> list[tuple[tuple[str, ...], str]]:
    return [(path, flag) for path, c in COMMANDS.items() for flag, o in _options(c).items() if _parsed(o)]


@pytest.mark.parametrize(("path", "flag"), _bad_value_cases(),
                         ids=[f"{' '.join(p)} {f}" for p, f in _bad_value_cases()])
def test_a_bad_value_is_the_library_one_line(path: tuple[str, ...], flag: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """``--flag abc`` on any command: ``error: --flag 'abc' …`` and exit 2, before anything runs (the bad
    option is processed first: click handles the options given in the order given, required ones after)."""
    capsys.readouterr()
    code = run_app(app, [*path, flag, "abc"])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag} 'abc' "), err


def _row(help_text: str, flag: str) -> str:
    """The help text of ``flag`` from a rendered ``--help`` (its table row and the wrapped lines below it)."""
    rows: list[str] = []
    for line in help_text.splitlines():
        cells = line.strip("│ ").lstrip("* ")
        if rows and (cells.startswith("-") or line.startswith("╰")):
            break
        if rows or cells.split(" ", 1)[0] == flag:
            rows.append(line.strip("│ "))
    return " ".join(" ".join(rows).split())


def _help(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert run_app(app, [*path, "--help"]) == 0
    return capsys.readouterr().out


@pytest.fixture()
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    """A terminal wide enough that no help row wraps mid-word into the next column."""
    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.setenv("TERMINAL_WIDTH", "400")


@pytest.mark.parametrize("path", list(COMMANDS), ids=IDS)
def test_help_prints_every_text_whole_and_every_default(path: tuple[str, ...], wide: None,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Each option's row holds its whole help text (square brackets included: rich markup once ate
    ``[default 16]``) and ``[default: …]`` when it has a default. A plain flag that is off by default
    (``--json``) has none to show, by click's convention."""
    text = _help(path, capsys)
    for flag, option in _options(COMMANDS[path]).items():
        row = _row(text, flag)
        assert row, f"{flag} is not in `{' '.join(path)} --help`"
        assert " ".join(str(option.help).replace("\\[", "[").split()) in row, (flag, row)
        assert "[default " not in str(option.help) and "default:" not in str(option.help), (
            f"{flag}: say the default with the option's default or show_default, not in the help text")
        shown = _default(option)
        if shown is None or (option.is_flag and not option.secondary_opts and shown is False):
            continue
        expected = f"({shown})" if isinstance(option.show_default, str) else None
        match = re.search(r"\[default: (.+?)\]", row)
        assert match, f"{flag} has the default {shown!r} but `--help` does not show it: {row}"
        if expected is not None:
            assert match.group(1) == expected, (flag, row)


def test_train_help_shows_the_defaults_that_markup_ate(wide: None, capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(("train",), capsys)
    assert "Global batch in sequences (per optimizer step). [default: (16)]" in _row(text, "--global-batch")
    assert "[default: (the global batch / --nproc)]" in _row(text, "--micro-batch")
    assert "[default: (4)]" in _row(text, "--noise-every")
    assert "hf:NAME[:SPLIT]" in _row(text, "--data")


def test_tune_is_listed_first(capsys: pytest.CaptureFixture[str]) -> None:
    assert next(iter(ROOT.commands)) == "tune"
    text = _help((), capsys)
    listed = [m.group(1) for m in re.finditer(r"^│ (\w+) ", text, flags=re.MULTILINE)]
    assert listed[:1] == ["tune"] and set(listed) >= {"plan", "probe", "train", "model", "hardware"}, listed


def test_probe_offers_no_flag_it_cannot_honour() -> None:
    """The probe runs real steps on one device: no parallel layout, no engine bookkeeping."""
    flags = set(_options(COMMANDS[("probe",)]))
    assert not flags & {"--tp", "--pp", "--vpp", "--ep", "--zero", "--offload", "--engine", "--sp", "--hybrid-shard"}
    assert {"--precision", "--optimizer", "--recompute", "--attention", "--gpu"} <= flags


def test_precision_has_one_set_of_values_and_one_default_rule(capsys: pytest.CaptureFixture[str]) -> None:
    for path, command in COMMANDS.items():
        option = _options(command).get("--precision")
        if option is None:
            continue
        assert option.metavar == "|".join(PRECISIONS), path
        runs_steps = path[0] in ("probe", "train", "tune")
        assert _default(option) == (f"bf16; {CPU_PRECISION} on a CPU" if runs_steps else DEFAULTS.precision), path
    assert DEFAULTS.precision == "bf16"
    assert step_precision(None, "cpu") == CPU_PRECISION == "fp32"
    assert step_precision(None, "cuda") == "bf16"
    assert step_precision("bf16", "cpu") == "bf16"


@pytest.mark.parametrize(("argv", "flag"), [
    (["train", "--precision", "fp7"], "--precision"),
    (["memory", "--precision", "FP7"], "--precision"),
    (["noise", "--global-batch", "4x"], "--global-batch"),
    (["train", "--global-batch", "-3"], "--global-batch"),
    (["noise", "--steps", "2.5"], "--steps"),
    (["probe", "--device", "tpu"], "--device"),
])
def test_values_fail_the_same_way_in_every_command(argv: list[str], flag: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert run_app(app, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {flag} '{argv[2]}'")
    assert "Invalid value" not in err  # typer's wording


def test_counts_take_units_in_every_command() -> None:
    """``--global-batch`` and ``--seq-len`` read ``2Ki`` the same way wherever they are offered."""
    for path, command in COMMANDS.items():
        for flag in ("--global-batch", "--seq-len", "--micro-batch"):
            option = _options(command).get(flag)
            if option is not None:
                assert _parser(option)("2Ki") == 2048, (path, flag)


def test_the_old_flag_name_still_works_with_a_note(capsys: pytest.CaptureFixture[str]) -> None:
    """``probe --accelerator`` is ``--gpu`` (hidden): it reaches the same check, with a one-line note."""
    capsys.readouterr()
    code = run_app(app, ["probe", "--device", "cpu", "--accelerator", "h100-sxm", "--calibration-out", "c.json"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[0] == "note: --accelerator is deprecated; use --gpu (same meaning)"
    assert err[1].startswith("error: --gpu h100-sxm with --device cpu: a CPU probe cannot calibrate a GPU; drop --gpu")
    assert len(err) == 2
    assert "--accelerator" not in _help(("probe",), capsys)


def test_deprecated_alias_refuses_two_different_values() -> None:
    assert deprecated_alias("--accelerator", None, "--gpu", "a100-80gb") == "a100-80gb"
    with pytest.raises(BatchpilotError, match="give --gpu only"):
        deprecated_alias("--accelerator", "h100-sxm", "--gpu", "a100-80gb")
