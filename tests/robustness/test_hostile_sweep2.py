"""Second hostile-input sweep: inputs no earlier test listed, each found to fail badly before its fix.

Every refusal is one line ``error: …`` on stderr naming the fix, exit code 2, nothing on stdout and no
output directory. Also: environment oddities (``COLUMNS=0``, ``PYTHONIOENCODING=ascii``) and Ctrl-C while
the CLI imports, which must end in one line and exit code 130.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ._checks import BATCHPILOT, PYTHON, assert_one_line_error, run_cli, run_in_process

TINY = json.loads((Path(__file__).resolve().parents[2] / "src/batchpilot/data/models/tiny-llama-1m.json").read_text())


def _config(tmp: Path, name: str, **changes: object) -> str:
    """tiny-llama-1m's config with ``changes`` (a value of ``None`` drops the key), written under ``tmp``."""
    config = {k: v for k, v in TINY.items() if not k.startswith("_")}
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(config))
    return str(path)


def _wrapper(tmp: Path, name: str, outer: str, inner: str) -> str:
    """A multimodal config (LLaVA, Llama 4): the language model's config nested in ``text_config``."""
    text = {**{k: v for k, v in TINY.items() if not k.startswith("_")}, "model_type": inner}
    path = tmp / f"{name}.json"
    path.write_text(json.dumps({"model_type": outer, "text_config": text, "vision_config": {"hidden_size": 8}}))
    return str(path)


def _bad_tokenizer(tmp: Path) -> str:
    folder = tmp / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")  # valid JSON, not a tokenizer: tokenizers raises bare Exception
    return str(folder)


TRAIN = ["train", "--seq-len", "32", "--steps", "2", "--device", "cpu", "--json"]
TUNE = ["tune", "--json"]

# (id, argv with {tmp} and builders, fragments of the one line)
CASES: list[tuple[str, list[str], tuple[str, ...]]] = [
    ("architectures without model_type", ["model", "show", "{arch_only}"],
     ("required field 'model_type' is missing", "architectures names 'LlamaForCausalLM'", 'add "model_type": "llama"')),
    ("LLaVA wrapper around a supported llama", ["model", "show", "{llava}"],
     ("unsupported model_type 'llava'", "'text_config' is a supported 'llama'",
      "save 'text_config' as a config.json of its own")),
    ("Llama 4 wrapper", ["memory", "--model", "{llama4}", "--gpu", "h100-sxm", "--seq-len", "64", "--micro-batch", "1"],
     ("unsupported model_type 'llama4'", "'llama4_text', not supported either", "supported: deepseek_v2")),
    ("model_type transformers knows (phi3)", ["model", "show", "{phi3}"],
     ("unsupported model_type 'phi3'", "supported: deepseek_v2, deepseek_v3, gpt2, llama, mistral, mixtral, qwen2")),
    ("train: tokenizer.json that is not a tokenizer", [*TRAIN, "--model", "tiny-llama-1m", "--tokenizer", "{tok}"],
     ("cannot be loaded: Model missing", "a folder with a valid tokenizer.json, or use bytes or bpe:VOCAB")),
    ("train: rope_scaling of an unknown type", [*TRAIN, "--model", "{rope}"],
     ("transformers cannot build this config (KeyError: 'weird')", "fix the field holding that value")),
    ("train: odd head_dim under RoPE", [*TRAIN, "--model", "{odd_head}"],
     ("transformers cannot build this config", "RoPE requires an even rotary dimension")),
    ("train --nproc 0", [*TRAIN, "--model", "tiny-llama-1m", "--nproc", "0"], ("--nproc must be positive",)),
    ("train --device gpu", [*TRAIN, "--model", "tiny-llama-1m", "--device", "gpu"],
     ("--device 'gpu' is not one of: auto, cpu, cuda",)),
    ("train --expect-world-size 0", [*TRAIN, "--model", "tiny-llama-1m", "--expect-world-size", "0"],
     ("--expect-world-size 0 must be positive",)),
    ("tune --gpus-per-node 0", [*TUNE, "--gpu", "h100-sxm", "--gpus", "8", "--gpus-per-node", "0"],
     ("--gpus-per-node 0 must be positive",)),
    ("tune --gpus 12 on 8-GPU nodes", [*TUNE, "--gpu", "h100-sxm", "--gpus", "12", "--gpus-per-node", "8"],
     ("--gpus 12 is not a multiple of --gpus-per-node 8",)),
    ("tune --gpu unknown (before any stage runs)", [*TUNE, "--gpu", "h900", "--gpus", "8"],
     ("unknown accelerator 'h900'",)),
    ("tune --seq-len beyond the positions (before any stage runs)", [*TUNE, "--seq-len", "100000"],
     ("--seq-len 100000 exceeds tiny-llama-1m's max_position_embeddings 1024", "use --seq-len ≤ 1024")),
    ("report on a file", ["report", "{file}", "--json"], ("is a file, not a directory", "tune.json")),
    ("memory --method traced: odd head_dim", ["memory", "--model", "{odd_head}", "--gpu", "h100-sxm", "--seq-len", "8",
                                             "--micro-batch", "1", "--method", "traced", "--json"],
     ("transformers cannot build this config", "even rotary dimension")),
]


def _fill(argv: list[str], tmp: Path) -> list[str]:
    made = {
        "arch_only": lambda: _config(tmp, "arch_only", model_type=None),
        "llava": lambda: _wrapper(tmp, "llava", "llava", "llama"),
        "llama4": lambda: _wrapper(tmp, "llama4", "llama4", "llama4_text"),
        "phi3": lambda: _config(tmp, "phi3", model_type="phi3"),
        "tok": lambda: _bad_tokenizer(tmp),
        "rope": lambda: _config(tmp, "rope", rope_scaling={"type": "weird", "factor": 8.0}),
        "odd_head": lambda: _config(tmp, "odd_head", hidden_size=132),  # 4 heads of 33
        "file": lambda: str((tmp / "a-file.txt").write_text("x") and tmp / "a-file.txt"),
    }
    return [made[a[1:-1]]() if a.startswith("{") and a[1:-1] in made else a for a in argv]


@pytest.mark.parametrize(("argv", "fragments"), [pytest.param(a, f, id=i) for i, a, f in CASES])
def test_hostile_input_is_one_line(argv: list[str], fragments: tuple[str, ...], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "out"
    args = _fill(argv, tmp_path)
    if args[0] in ("train", "tune"):
        args += ["--out", str(out_dir)]
    code, out, err = run_in_process(args, capsys)
    assert code == 2, (code, out, err)
    assert out == ""
    assert_one_line_error(err, *fragments)
    assert not out_dir.exists()


def test_world_size_that_is_not_a_number(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "abc")
    code, out, err = run_in_process([*TRAIN, "--model", "tiny-llama-1m", "--out", str(tmp_path / "out")], capsys)
    assert (code, out) == (2, "")
    assert_one_line_error(err, "environment variable WORLD_SIZE='abc' is not an integer")


def test_moe_trace_without_a_fake_kernel_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """transformers 5's MoE ``grouped_mm`` has a meta kernel for bf16 only (the fp32 trace hit it), and its
    eager experts loop uses ``nonzero`` (a data-dependent shape fake tensors cannot run): refused up front."""
    moe = _config(tmp_path, "moe", model_type="mixtral", num_local_experts=2, num_experts_per_tok=1)
    code, out, err = run_in_process(["memory", "--model", moe, "--gpu", "h100-sxm", "--seq-len", "8",
                                     "--micro-batch", "1", "--method", "traced", "--json"], capsys)
    assert (code, out) == (2, "")
    assert_one_line_error(err, "is a mixture of experts, which a fake-tensor trace cannot run", "use --method analytic")


def test_hf_dataset_offline_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code, out, err = run_in_process([*TRAIN, "--model", "tiny-llama-1m", "--data", "hf:no-such-user/no-such-set",
                                     "--out", str(tmp_path / "out")], capsys)
    assert (code, out) == (2, "")
    assert_one_line_error(err, "dataset 'no-such-user/no-such-set' is not reachable")


@pytest.mark.slow
def test_hf_dataset_unreachable_hub_is_one_line(tmp_path: Path) -> None:
    """Online (or with no network): huggingface_hub's "Retrying in 8s" warnings must not reach stderr."""
    proc = run_cli([*TRAIN, "--model", "tiny-llama-1m", "--data", "hf:no-such-user/no-such-set",
                    "--out", str(tmp_path / "out")], timeout_s=180)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert_one_line_error(proc.stderr, "dataset 'no-such-user/no-such-set' is not reachable")


# ------------------------------------------------------------------------------ environment and Ctrl-C
MEMORY = ["memory", "--model", "llama-3-8b", "--gpu", "h100-sxm", "--seq-len", "4096", "--micro-batch", "1"]


@pytest.mark.parametrize("columns", ["0", "20"])
def test_a_narrow_columns_does_not_cut_the_tables(columns: str) -> None:
    """COLUMNS=0 printed nothing and COLUMNS=20 cut numbers to "29…"; both now render at 80 columns."""
    wide = run_cli(MEMORY, env={"COLUMNS": "80"})
    narrow = run_cli(MEMORY, env={"COLUMNS": columns})
    assert (narrow.returncode, narrow.stderr) == (0, "")
    assert narrow.stdout == wide.stdout and "…" not in narrow.stdout


def test_an_ascii_stdout_is_not_a_traceback(tmp_path: Path) -> None:
    """PYTHONIOENCODING=ascii (a C locale without UTF-8 coercion): "×" in the tables was a UnicodeEncodeError."""
    config = Path(_config(tmp_path, "cönfig"))
    proc = run_cli(["model", "show", str(config)], env={"PYTHONIOENCODING": "ascii", "LC_ALL": "C"})
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "\\xf6" in proc.stdout  # the path's "ö", escaped


def test_ctrl_c_while_the_cli_imports_is_one_line() -> None:
    """Ctrl-C in the first ~0.2 s (importing torch and the commands) was a KeyboardInterrupt traceback."""
    code = ("import sys\n"
            "class Interrupt:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'batchpilot.cli.memory': raise KeyboardInterrupt\n"
            "sys.meta_path.insert(0, Interrupt())\n"
            "from batchpilot.cli import main\n")
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (130, "", "interrupted\n")


@pytest.mark.slow
@pytest.mark.parametrize("delay_s", [1.0, 4.0])
def test_ctrl_c_during_a_big_trace_exits_130(delay_s: float) -> None:
    if not BATCHPILOT.exists():
        pytest.skip("the console script is not installed")
    proc = subprocess.Popen([str(BATCHPILOT), "memory", "--model", "llama-3.1-405b", "--gpu", "h100-sxm",
                             "--seq-len", "4096", "--micro-batch", "1", "--method", "traced"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay_s)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err.strip()) == (130, "", "interrupted")
