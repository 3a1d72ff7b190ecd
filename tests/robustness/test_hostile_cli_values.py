"""Hostile flag values and data files through every command: one line on stderr, exit 2, nothing written.

Flag values are the ones users mistype (``--memory-budget abc``, ``--seq-len 0``, ``1e400``, negative
numbers, NaN), each refused in the library's words, plus typer's own usage errors (an unknown option, a
flag without its value), which ``run_app`` turns from a boxed panel into one line. Every case is also one that must fail *before* any
work starts: the output directory stays absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from batchpilot.train.data import load_documents, tokenize
from batchpilot.train.tokenizer import load_tokenizer

from ._checks import assert_one_line_error, run_cli, run_in_process

MEMORY = ["memory", "--model", "tiny-llama-1m", "--gpu", "h100-sxm"]
PLAN = ["plan", "--model", "tiny-llama-1m", "--gpu", "h100-sxm", "--gpus", "8"]
PROBE = ["probe", "--model", "tiny-llama-1m", "--device", "cpu"]
TRAIN = ["train", "--model", "tiny-llama-1m", "--steps", "1", "--device", "cpu"]
NOISE = ["noise", "--model", "tiny-llama-1m"]

# (id, argv, fragment of the one-line message)
CASES: list[tuple[str, list[str], str]] = [
    # units-parsed values
    ("model --seq-len abc", ["model", "show", "gpt2", "--seq-len", "abc"], "--seq-len 'abc' is not a number"),
    ("model --seq-len 0", ["model", "show", "gpt2", "--seq-len", "0"], "must be a positive whole number"),
    ("model --seq-len 1e400", ["model", "show", "gpt2", "--seq-len", "1e400"], "is not finite"),
    ("model --seq-len 2^70", ["model", "show", "gpt2", "--seq-len", "1180591620717411303424"], "too large"),
    ("model --seq-len 4Zi", ["model", "show", "gpt2", "--seq-len", "4Zi"], "unknown suffix 'zi'"),
    ("plan --global-batch-tokens 1e400", [*PLAN, "--seq-len", "512", "--global-batch-tokens", "1e400"], "is not finite"),
    ("plan --global-batch-tokens abc", [*PLAN, "--seq-len", "512", "--global-batch-tokens", "abc"], "is not a number"),
    ("plan --global-batch-tokens 0", [*PLAN, "--seq-len", "512", "--global-batch-tokens", "0"], "positive whole number"),
    ("plan --global-batch-tokens -5", [*PLAN, "--seq-len", "512", "--global-batch-tokens", "-5"], "is not a number"),
    ("plan --headroom nan", [*PLAN, "--seq-len", "512", "--global-batch-tokens", "4Mi", "--headroom", "nan"],
     "--headroom 'nan' must be in [0, 1)"),
    ("plan --headroom 2", [*PLAN, "--seq-len", "512", "--global-batch-tokens", "4Mi", "--headroom", "2"],
     "--headroom '2' must be in [0, 1)"),
    ("plan --max-deviation inf", [*PLAN, "--seq-len", "512", "--global-batch-tokens", "4Mi", "--max-deviation", "inf"],
     "--max-deviation 'inf'"),
    ("plan --top 0", [*PLAN, "--seq-len", "512", "--global-batch-tokens", "4Mi", "--top", "0"], "--top 0"),
    ("plan --gpus 0", [*PLAN[:-1], "0", "--seq-len", "512", "--global-batch-tokens", "4Mi"], "--gpus 0"),
    ("plan --inter-node-bandwidth -1 on one node", [*PLAN, "--seq-len", "512", "--global-batch", "8",
                                                   "--inter-node-bandwidth", "-1"], "--inter-node-bandwidth '-1'"),
    ("plan --inter-node-bandwidth 0 on one node", [*PLAN, "--seq-len", "512", "--global-batch", "8",
                                                  "--inter-node-bandwidth", "0"], "--inter-node-bandwidth '0' must be positive"),
    ("plan --seq-len 0", [*PLAN, "--seq-len", "0", "--global-batch-tokens", "4Mi"], "--seq-len '0'"),
    ("plan two targets", [*PLAN, "--seq-len", "512", "--global-batch-tokens", "4Mi", "--global-batch", "8"],
     "give exactly one target"),
    ("plan --like unknown", [*PLAN, "--seq-len", "512", "--like", "gpt-99"], "unknown registry entry 'gpt-99'"),
    ("plan --calibration not JSON", [*PLAN, "--seq-len", "512", "--global-batch-tokens", "4Mi", "--calibration",
                                     "{tmp}/bad.json"], "not valid JSON"),
    ("probe --memory-budget abc", [*PROBE, "--seq-len", "64", "--memory-budget", "abc"], "--memory-budget 'abc'"),
    ("probe --memory-budget -1", [*PROBE, "--seq-len", "64", "--memory-budget", "-1"], "--memory-budget '-1'"),
    ("probe --memory-budget 1e400", [*PROBE, "--seq-len", "64", "--memory-budget", "1e400"], "is not finite"),
    ("probe --trial-timeout 0", [*PROBE, "--seq-len", "64", "--trial-timeout", "0"], "positive finite duration"),
    ("probe --gpu on cpu", [*PROBE, "--seq-len", "64", "--gpu", "h100-sxm", "--calibration-out", "c.json"],
     "a CPU probe cannot calibrate a GPU"),
    ("probe --seq-len 0", [*PROBE, "--seq-len", "0"], "--seq-len '0' must be a positive whole number"),
    ("probe --seq-len > positions", [*PROBE, "--seq-len", "1000000"], "exceeds tiny-llama-1m's max_position_embeddings"),
    ("memory --seq-len 0", [*MEMORY, "--seq-len", "0", "--micro-batch", "1"], "--seq-len '0'"),
    ("memory --micro-batch -1", [*MEMORY, "--seq-len", "64", "--micro-batch", "-1"], "--micro-batch '-1'"),
    ("memory --tp 0", [*MEMORY, "--seq-len", "64", "--micro-batch", "1", "--tp", "0"], "--tp 0"),
    ("memory --precision fp7", [*MEMORY, "--seq-len", "64", "--micro-batch", "1", "--precision", "fp7"], "fp7"),
    ("memory --gpu unknown", [*MEMORY[:-1], "h900", "--seq-len", "64", "--micro-batch", "1"], "unknown accelerator"),
    ("train --lr nan", [*TRAIN, "--lr", "nan"], "--lr nan must be positive"),
    ("train --lr -1", [*TRAIN, "--lr", "-1"], "must be positive"),
    ("train --lr inf", [*TRAIN, "--lr", "inf"], "--lr inf must be positive and finite"),
    ("train --weight-decay -5", [*TRAIN, "--weight-decay", "-5"], "--weight-decay -5.0 must be a finite number ≥ 0"),
    ("train --weight-decay nan", [*TRAIN, "--weight-decay", "nan"], "--weight-decay nan"),
    ("train --micro-batch 0", [*TRAIN, "--micro-batch", "0"], "--micro-batch '0' must be a positive whole number"),
    ("train --threads 0", [*TRAIN, "--threads", "0"], "--threads 0 must be positive"),
    ("train --max-bad-steps 0", [*TRAIN, "--max-bad-steps", "0"], "--max-bad-steps 0 must be positive"),
    ("train --max-restarts -1", [*TRAIN, "--max-restarts", "-1"], "--max-restarts -1 must be in 0..100"),
    ("train --max-restarts 10^6", [*TRAIN, "--max-restarts", "1000000"], "--max-restarts 1000000 must be in 0..100"),
    ("train --seq-len 0", [*TRAIN, "--seq-len", "0"], "--seq-len '0'"),
    ("train --steps -1", [*TRAIN, "--steps", "-1"], "--steps must be positive"),
    ("train --global-batch 0", [*TRAIN, "--global-batch", "0"], "--global-batch '0' must be a positive whole number"),
    ("noise --global-batch 0", [*NOISE, "--global-batch", "0"], "--global-batch '0' must be a positive whole number"),
    ("noise --steps 0", [*NOISE, "--steps", "0"], "--steps 0: the band needs at least 2 steps"),
    ("noise --micro-batch 4.5", [*NOISE, "--micro-batch", "4.5"], "--micro-batch '4.5' must be a positive whole number"),
    ("noise --lr -1", [*NOISE, "--lr", "-1"], "--lr -1.0 must be positive"),
    ("tune --seq-len 0", ["tune", "--seq-len", "0"], "--seq-len '0' must be a positive whole number"),
    ("tune --precision fp7", ["tune", "--precision", "fp7"], "--precision 'fp7' is not one of: fp32, bf16, fp16, fp8"),
    ("train --global-batch-tokens 1e400", [*TRAIN, "--global-batch-tokens", "1e400"], "is not finite"),
    ("train --grad-clip nan", [*TRAIN, "--grad-clip", "nan"], "--grad-clip"),
    ("train --batch-schedule garbage", [*TRAIN, "--batch-schedule", "steps:0=abc"], "'abc' is not a number"),
    ("train --model /dev/zero", [*TRAIN, "--model", "/dev/zero"], "is not a regular file"),
    ("train --tp with adaptive", [*TRAIN, "--nproc", "2", "--zero", "3", "--tp", "2", "--batch-schedule", "adaptive"],
     "which tensor parallelism splits over --tp 2 ranks"),
    ("train --zero 1", [*TRAIN, "--zero", "1"], "--zero 1: the runner runs 0 (DDP), 2 or 3 (FSDP2)"),
    ("train --recompute selective", [*TRAIN, "--recompute", "selective"], "--recompute 'selective': the runner applies"),
    ("train --data /dev/zero", [*TRAIN, "--data", "/dev/zero"], "is not a regular file or a folder"),
    ("train --data missing", [*TRAIN, "--data", "{tmp}/missing.txt"], "does not exist"),
    ("train --data binary", [*TRAIN, "--data", "{tmp}/binary.txt"], "is not UTF-8 text"),
    ("train --data latin-1", [*TRAIN, "--data", "{tmp}/latin1.txt"], "is not UTF-8 text"),
    ("train --data empty", [*TRAIN, "--data", "{tmp}/empty.txt"], "holds no non-empty documents"),
    ("noise --data binary", [*NOISE, "--data", "{tmp}/binary.txt"], "is not UTF-8 text"),
    ("a count given a word", [*MEMORY, "--seq-len", "abc", "--micro-batch", "1"], "--seq-len 'abc' is not a number"),
    ("an integer given a word", [*PLAN, "--seq-len", "512", "--global-batch", "8", "--top", "five"],
     "--top 'five' is not a whole number"),
    # typer usage errors, one line through run_app
    ("flag without its value", [*MEMORY, "--micro-batch", "1", "--seq-len"], "Option '--seq-len' requires an argument"),
    ("unknown option", ["model", "show", "gpt2", "--bogus"], "No such option: --bogus"),
    ("unknown command", ["plna"], "No such command 'plna'"),
    ("missing option", ["memory", "--model", "gpt2"], "Missing option"),
]


@pytest.fixture()
def bad_files(tmp_path: Path) -> Path:
    (tmp_path / "bad.json").write_text('{"efficiency": [1, 2')
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 64)
    (tmp_path / "latin1.txt").write_bytes("café au lait, crème brûlée\n".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    return tmp_path


@pytest.mark.parametrize(("argv", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_value_is_one_line_and_exit_2_with_nothing_written(
        bad_files: Path, capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str) -> None:
    out = bad_files / "out"
    args = [a.format(tmp=bad_files) for a in argv]
    if args[0] in ("train", "noise"):
        args += ["--out", str(out), "--json"]  # no progress bar (it starts before late checks; see the doc)
    code, stdout, stderr = run_in_process(args, capsys)
    assert code == 2, (stdout, stderr)
    assert stdout == ""
    assert_one_line_error(stderr, fragment)
    assert not out.exists()  # failed before anything was written


@pytest.mark.parametrize(("argv", "fragment"), [
    ([*TRAIN, "--batch-schedule", "steps:0=abc"], "'abc' is not a number"),
    ([*TRAIN, "--batch-schedule", "steps:0=3"], "not a multiple of micro × dp"),
], ids=["schedule-syntax", "schedule-multiple"])
def test_train_with_the_progress_bar_fails_before_it_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            argv: list[str], fragment: str) -> None:
    """Without --json the rich progress bar runs; a bad schedule is refused before it prints anything."""
    out = tmp_path / "out"
    code, stdout, stderr = run_in_process([*argv, "--out", str(out)], capsys)
    assert (code, stdout) == (2, "")
    assert_one_line_error(stderr, fragment)
    assert not out.exists()


@pytest.mark.parametrize(("argv", "fragment"), [
    ([*MEMORY, "--seq-len", "abc", "--micro-batch", "1"], "--seq-len 'abc' is not a number"),
    (["plan", "--model", "tiny-llama-1m", "--gpu", "h100-sxm", "--gpus", "8", "--seq-len", "512",
      "--global-batch-tokens", "1e400"], "is not finite"),
    (["train", "--lr", "nan"], "--lr nan must be positive"),
], ids=["count-word", "plan-1e400", "train-lr"])
def test_installed_script_usage_errors_are_one_line(tmp_path: Path, argv: list[str], fragment: str) -> None:
    proc = run_cli(argv, cwd=tmp_path)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert_one_line_error(proc.stderr, fragment)
    assert list(tmp_path.iterdir()) == []  # no runs/ directory, no partial file


def test_unwritable_output_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--out`` under a regular file (or /proc) cannot be created: one line, exit 2, no traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_in_process([*PLAN, "--seq-len", "512", "--global-batch-tokens", "4Mi", "--export",
                                   "deepspeed", "--out", str(blocker / "sub")], capsys)
    assert code == 2
    assert_one_line_error(err)
    assert blocker.read_text() == "x"


def test_one_enormous_line_is_one_document(tmp_path: Path) -> None:
    """A 4.5 MB file without a newline loads and tokenizes in linear time (bytes tokenizer: one token a byte)."""
    path = tmp_path / "one-line.txt"
    path.write_text("ab " * 1_500_000)
    docs = load_documents(str(path))
    assert len(docs) == 1
    assert tokenize(docs, load_tokenizer("bytes")).num_tokens >= 4_500_000
