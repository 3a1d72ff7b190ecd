"""No code runs from input: checkpoints are loaded with ``weights_only=True``, model/tokenizer directories
without remote code, and the opt-in to remote code is off by default.

Two kinds of test: a scan of the source (every ``torch.load`` and ``from_pretrained`` call, so a new one
cannot slip in), and real hostile inputs — a checkpoint whose pickle would run a command, a model
directory whose ``auto_map`` points at a modelling file that would run one — checked by a marker file
that must never appear.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import shlex
from pathlib import Path

import pytest
import torch

from batchpilot.errors import BatchpilotError

SRC = Path(__file__).resolve().parents[2] / "src" / "batchpilot"


def _calls(name: str) -> list[tuple[Path, ast.Call]]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called == name:
                    found.append((path, node))
    return found


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_every_torch_load_uses_weights_only() -> None:
    calls = _calls("load")
    torch_loads = [(p, c) for p, c in calls if isinstance(c.func, ast.Attribute)
                   and isinstance(c.func.value, ast.Name) and c.func.value.id == "torch"]
    assert torch_loads, "expected the checkpoint loader's torch.load calls"
    for path, call in torch_loads:
        value = _keyword(call, "weights_only")
        assert isinstance(value, ast.Constant) and value.value is True, f"{path}:{call.lineno}"


def test_no_pickle_or_eval_of_input() -> None:
    for name in ("loads", "eval", "exec"):
        for path, call in _calls(name):
            func = call.func
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            assert owner not in ("pickle", "marshal", "dill") and not (owner == "" and name in ("eval", "exec")), \
                f"{path}:{call.lineno}"


def test_every_from_pretrained_passes_trust_remote_code_and_never_true() -> None:
    calls = _calls("from_pretrained")
    assert calls
    for path, call in calls:
        value = _keyword(call, "trust_remote_code")
        assert value is not None, f"{path}:{call.lineno} must pass trust_remote_code explicitly"
        assert not (isinstance(value, ast.Constant) and value.value is True), f"{path}:{call.lineno}"
        local = _keyword(call, "local_files_only")
        assert isinstance(local, ast.Constant) and local.value is True, f"{path}:{call.lineno} must stay offline"


def test_remote_code_is_off_by_default() -> None:
    from batchpilot.cli.train import train
    from batchpilot.train.config import ModelConfig

    assert ModelConfig().trust_remote_code is False
    option = inspect.signature(train).parameters["trust_remote_code"].default
    assert getattr(option, "default", option) is False


class _RunsCode:
    """Unpickling this runs a shell command (here: touching a marker file), as a hostile checkpoint would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_hostile_pickle_in_a_checkpoint_is_refused_unrun(tmp_path: Path) -> None:
    from batchpilot.train.checkpoint import load_checkpoint
    from batchpilot.train.distributed import DistEnv

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "step-00000001"
    ckpt.mkdir()
    torch.save({"model": {}, "evil": _RunsCode(marker)}, ckpt / "train.pt")
    assert not marker.exists()
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    # Refused by weights_only=True, as the one-line error a truncated file gets (not a bare UnpicklingError).
    with pytest.raises(BatchpilotError, match=r"^checkpoint '.*' cannot be read: [^\n]*$"):
        load_checkpoint(ckpt, model=model, optimizer=optimizer, scaler=torch.amp.GradScaler("cpu", enabled=False),
                        env=env)
    assert not marker.exists()


MODELING = '''
from pathlib import Path
Path({marker!r}).touch()
from transformers import LlamaForCausalLM
class EvilForCausalLM(LlamaForCausalLM):
    pass
'''


@pytest.mark.parametrize("model_type", ["llama", "evil"])
def test_model_directory_with_remote_code_does_not_run_it(tmp_path: Path, model_type: str) -> None:
    """A pretrained directory whose config names its own modelling code (``auto_map``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from batchpilot.specs.model import load_model
    from batchpilot.train.config import ModelConfig
    from batchpilot.train.model import build_model

    marker = tmp_path / "pwned"
    folder = tmp_path / "model"
    spec = load_model("tiny-llama-1m")
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**dict(spec.hf_config))).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
                                                   "AutoConfig": "modeling_evil.EvilConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text(MODELING.format(marker=str(marker)))
    try:
        built = build_model(ModelConfig(model=str(folder)), seed=0)
    except BatchpilotError as exc:  # an unknown model_type without remote code: refused, one line
        assert "\n" not in str(exc)
    else:
        assert built.source == "pretrained" and type(built.module).__name__ == "LlamaForCausalLM"
    assert not marker.exists()
