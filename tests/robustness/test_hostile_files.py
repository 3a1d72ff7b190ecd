"""Hostile and malformed model configs and hardware files, through the real CLI: one line, exit 2.

Every case is a file a user could hand to ``batchpilot model show`` / ``hardware show`` (a truncated
download, a wrong type, a unit slip, NaN, a binary blob, a device node, a FIFO, a 20 MB file, a name the
OS rejects). Each must end as ``error: ...`` on one stderr line, exit code 2, nothing on stdout, within a
few seconds (a FIFO or ``/dev/zero`` that is read would hang or exhaust memory).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from batchpilot.errors import SpecError
from batchpilot.io import MAX_JSON_BYTES
from batchpilot.specs.hardware import load_accelerator
from batchpilot.specs.model import load_model

from ._checks import assert_one_line_error, run_cli, run_in_process

# A valid tiny Llama config (the tiny-llama-1m preset's shape); each case below breaks one thing.
LLAMA = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
         "num_hidden_layers": 2, "intermediate_size": 172, "vocab_size": 256, "max_position_embeddings": 512}
MIXTRAL = {**LLAMA, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2}


def _with(base: dict[str, object], **changes: object) -> str:
    return json.dumps({**base, **changes})


# (case id, file text, fragment the one-line message must contain)
MODEL_CASES: list[tuple[str, str, str]] = [
    ("truncated", _with(LLAMA)[:40], "is not valid JSON"),
    ("empty", "", "is not valid JSON"),
    ("whitespace", "  \n\t ", "is not valid JSON"),
    ("top-level array", "[1, 2]", "must hold a JSON object"),
    ("top-level string", '"llama"', "must hold a JSON object"),
    ("NaN literal", _with(LLAMA).replace("64", "NaN", 1), "NaN is not a valid JSON number"),
    ("Infinity literal", _with(LLAMA).replace("256", "Infinity", 1), "Infinity is not a valid JSON number"),
    ("-Infinity literal", _with(LLAMA).replace("512", "-Infinity", 1), "-Infinity is not a valid JSON number"),
    ("1e400 overflows to inf", _with(LLAMA).replace("256", "1e400", 1), "must be an integer"),
    ("5000-digit integer", _with(LLAMA).replace("256", "9" * 5000, 1), "number literal too long"),
    ("string number", _with(LLAMA, hidden_size="64"), "'hidden_size' must be an integer"),
    ("bool number", _with(LLAMA, num_hidden_layers=True), "'num_hidden_layers' must be an integer"),
    ("fractional", _with(LLAMA, vocab_size=256.5), "'vocab_size' must be an integer"),
    ("list number", _with(LLAMA, intermediate_size=[172]), "'intermediate_size' must be an integer"),
    ("object number", _with(LLAMA, intermediate_size={"v": 1}), "'intermediate_size' must be an integer"),
    ("negative", _with(LLAMA, num_hidden_layers=-2), "'num_hidden_layers' = -2 is out of range"),
    ("zero", _with(LLAMA, num_attention_heads=0), "'num_attention_heads' = 0 is out of range"),
    ("2^64", _with(LLAMA, vocab_size=2**64), "'vocab_size' = 18446744073709551616 is out of range"),
    ("missing field", json.dumps({k: v for k, v in LLAMA.items() if k != "vocab_size"}),
     "required field 'vocab_size' is missing"),
    ("unknown model_type", _with(LLAMA, model_type="bert"), "unsupported model_type 'bert'"),
    ("model_type not a string", _with(LLAMA, model_type=7), "'model_type' is missing or not a string"),
    ("no model_type", json.dumps({k: v for k, v in LLAMA.items() if k != "model_type"}), "'model_type'"),
    ("heads do not divide hidden", _with(LLAMA, num_attention_heads=5, num_key_value_heads=5),
     "not divisible by num_attention_heads 5"),
    ("kv heads do not divide heads", _with(LLAMA, num_key_value_heads=3), "not a multiple of num_key_value_heads 3"),
    ("top-k > experts", _with(MIXTRAL, num_experts_per_tok=9), "num_experts_per_tok 9 must be in [1, 4]"),
    ("bool as string", _with(LLAMA, tie_word_embeddings="yes"), "must be true or false"),
    ("deep nesting", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("control characters in model_type", _with(LLAMA, model_type="\x1b[2J\x00"), "unsupported model_type"),
]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.json"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(("text", "fragment"), [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_hostile_model_config_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 text: str, fragment: str) -> None:
    path = _write(tmp_path, text)
    code, out, err = run_in_process(["model", "show", str(path), "--json"], capsys)
    assert (code, out) == (2, "")
    assert_one_line_error(err, fragment)


BINARY_CASES: list[tuple[str, bytes, str]] = [
    ("binary", bytes(range(256)) * 4, "not UTF-8"),
    ("latin-1", json.dumps({**LLAMA, "model_type": "llamä"}, ensure_ascii=False).encode("latin-1"), "not UTF-8"),
    ("utf-16", _with(LLAMA).encode("utf-16"), "not UTF-8"),
    ("NUL bytes", b"\x00" * 64, "is not valid JSON"),
]


@pytest.mark.parametrize(("raw", "fragment"), [c[1:] for c in BINARY_CASES], ids=[c[0] for c in BINARY_CASES])
def test_binary_model_config_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                raw: bytes, fragment: str) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(raw)
    code, out, err = run_in_process(["model", "show", str(path)], capsys)
    assert (code, out) == (2, "")
    assert_one_line_error(err, fragment)


def test_oversized_config_is_refused_unread(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.json"
    with path.open("wb") as handle:  # sparse: 20 MiB long, nothing written, instant
        handle.truncate(MAX_JSON_BYTES + 4 * 2**20)
    code, _, err = run_in_process(["model", "show", str(path)], capsys)
    assert code == 2
    assert_one_line_error(err, f"the limit is {MAX_JSON_BYTES:,}")


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom", "/dev/null"])
def test_device_nodes_are_refused_unread(capsys: pytest.CaptureFixture[str], device: str) -> None:
    if not Path(device).exists():
        pytest.skip(f"{device} absent")
    code, _, err = run_in_process(["model", "show", device], capsys)
    assert code == 2
    assert_one_line_error(err, "is not a regular file")


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    proc = run_cli(["model", "show", str(fifo)], timeout_s=30)  # reading it would block forever
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "is not a regular file")


PATH_CASES: list[tuple[str, str, str]] = [
    ("missing file", "{tmp}/nope/config.json", "does not exist"),
    ("directory without config.json", "{tmp}", "does not exist"),
    ("name too long", "x" * 5000, "unknown model preset"),
    ("path too long", "x/" * 3000 + "config.json", "cannot be opened"),
    ("unknown preset", "llama-9-8b", "Did you mean"),
]


@pytest.mark.parametrize(("arg", "fragment"), [c[1:] for c in PATH_CASES], ids=[c[0] for c in PATH_CASES])
def test_bad_model_paths_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             arg: str, fragment: str) -> None:
    code, out, err = run_in_process(["model", "show", arg.format(tmp=tmp_path)], capsys)
    assert (code, out) == (2, "")
    assert_one_line_error(err, fragment)


def test_nul_byte_in_path_is_a_spec_error() -> None:
    """argv cannot carry NUL, the library API can: a SpecError, not a bare ValueError from ``os.stat``."""
    with pytest.raises(SpecError, match="cannot be opened"):
        load_model("bad\x00name.json")
    with pytest.raises(SpecError, match="cannot be opened"):
        load_accelerator("bad\x00name.json")


# ---------------------------------------------------------------------- hardware files
H100 = {"display_name": "test GPU", "vendor": "test", "memory_bytes": 85899345920,
        "peak_flops_per_s": {"bf16": 9.895e14, "fp32": 6.7e13}, "memory_bandwidth_bytes_per_s": 3.35e12,
        "intra_node_bandwidth_bytes_per_s": 4.5e11, "intra_node_link": "NVLink"}

HARDWARE_CASES: list[tuple[str, str, str]] = [
    ("truncated", json.dumps(H100)[:30], "is not valid JSON"),
    ("NaN memory", json.dumps(H100).replace("85899345920", "NaN"), "NaN is not a valid JSON number"),
    ("1e400 bandwidth", json.dumps(H100).replace("3350000000000.0", "1e400"), "must be finite"),
    ("negative memory", _with(H100, memory_bytes=-1), "outside the plausible range"),
    ("memory in GB not bytes", _with(H100, memory_bytes=80), "outside the plausible range"),
    ("fractional bytes", _with(H100, memory_bytes=85899345920.5), "whole number of bytes"),
    ("string memory", _with(H100, memory_bytes="80GB"), "memory_bytes must be a number"),
    ("TFLOP/s given as FLOP/s", _with(H100, peak_flops_per_s={"bf16": 989.5}), "outside the plausible range"),
    ("unknown dtype", _with(H100, peak_flops_per_s={"int4": 1e15}), "unknown dtype 'int4'"),
    ("empty flops", _with(H100, peak_flops_per_s={}), "peak_flops_per_s must be an object"),
    ("flops not an object", _with(H100, peak_flops_per_s=[1e15]), "peak_flops_per_s must be an object"),
    ("sparse figure", _with(H100, peak_flops_per_s={"bf16": {"value": 1.979e15, "source": "x", "dense": False}}),
     "must be the dense figure"),
    ("unknown field", _with(H100, memory_gb=80), "unknown field(s) memory_gb"),
    ("missing bandwidth", json.dumps({k: v for k, v in H100.items() if k != "memory_bandwidth_bytes_per_s"}),
     "required field 'memory_bandwidth_bytes_per_s' is missing"),
    ("huge notes", _with(H100, notes="x" * 20_000), "longer than 10000 characters"),
    ("bool as number", _with(H100, memory_bytes=True), "memory_bytes must be a number"),
]


@pytest.mark.parametrize(("text", "fragment"), [c[1:] for c in HARDWARE_CASES], ids=[c[0] for c in HARDWARE_CASES])
def test_hostile_hardware_file_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  text: str, fragment: str) -> None:
    path = tmp_path / "gpu.json"
    path.write_text(text, encoding="utf-8")
    code, out, err = run_in_process(["hardware", "show", str(path), "--json"], capsys)
    assert (code, out) == (2, "")
    assert_one_line_error(err, fragment)


def test_valid_base_files_load(tmp_path: Path) -> None:
    """The cases above break a file that is otherwise valid: the base files themselves load."""
    assert load_model(Path(_write(tmp_path, json.dumps(LLAMA)))).num_layers == 2
    gpu = tmp_path / "gpu.json"
    gpu.write_text(json.dumps(H100))
    assert load_accelerator(gpu).memory_bytes == 80 * 2**30


# ---------------------------------------------------------------------- real processes
@pytest.mark.parametrize(("args", "fragment"), [
    (["hardware", "show", "{tmp}/config.json"], "is not valid JSON"),
    (["model", "show", "/dev/zero"], "is not a regular file"),
    (["memory", "--model", "{tmp}/config.json", "--gpu", "h100-sxm", "--seq-len", "8", "--micro-batch", "1"],
     "is not valid JSON"),
], ids=["hardware", "dev-zero", "memory"])  # the rest run in-process above; a process costs ~1-3 s here
def test_installed_cli_prints_one_line_and_exits_2(tmp_path: Path, args: list[str], fragment: str) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 6')
    proc = run_cli([a.format(tmp=tmp_path) for a in args])
    assert (proc.returncode, proc.stdout) == (2, "")
    assert_one_line_error(proc.stderr, fragment)
