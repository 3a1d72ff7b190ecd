"""``tune`` on a real model: what cannot fit on this machine is refused before any stage starts, advice names
``tune``'s own flags, the cluster plan is printed and in the report with its warnings, and its exports keep
``--data`` (each case a failure a user met: a 149 GiB probe trial on a 24 GiB machine, advice to pass
``--trial-timeout``, a cluster plan only in export files, a launch script without the data)."""

from __future__ import annotations

import dataclasses
import re
import types
from pathlib import Path

import pytest
import record_samples

from batchpilot.cli import app
from batchpilot.errors import BatchpilotError, InfeasibleError
from batchpilot.records.plan import PlanRecord
from batchpilot.tune import stages
from batchpilot.tune.config import TuneConfig

GIB = 2**30


@pytest.fixture
def machine_of(monkeypatch: pytest.MonkeyPatch):
    """This machine with ``n`` GiB available (MemAvailable), whatever the test machine has."""
    import batchpilot.measure.device as device

    def set_memory(gib: float) -> None:
        monkeypatch.setattr(device, "device_memory_bytes", lambda _device: int(gib * GIB))

    return set_memory


def test_a_model_that_cannot_train_here_is_refused_before_any_stage(machine_of, cli_runner, tmp_path: Path) -> None:
    """Qwen2.5-7B at seq 4096 in fp32 AdamW needs about 137 GiB for micro-batch 1 (the analytic model): on a 24 GiB
    machine tune stops in one line, naming its own flags, before the run directory exists."""
    machine_of(24)
    out = tmp_path / "run"
    result = cli_runner.invoke(app, ["tune", "--model", "qwen2.5-7b", "--seq-len", "4096", "--device", "cpu",
                                     "--out", str(out)])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    text = result.stderr
    assert "needs 137" in text and "24.00 GiB of available RAM" in text and "probe, noise, verify" in text
    assert "--seq-len" in text and "--model" in text and "--trial-timeout" not in text
    assert not out.exists()


@pytest.mark.parametrize("precision", ["fp8", "fp16"])
def test_a_precision_the_probe_cannot_run_here_is_refused_before_any_stage(cli_runner, tmp_path: Path,
                                                                          precision: str) -> None:
    """fp8 (and fp16 on a CPU): the probe stage cannot run it; tune said so only after the noise stage had
    trained, in a line of four failed stages."""
    out = tmp_path / "run"
    result = cli_runner.invoke(app, ["tune", "--precision", precision, "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert f"tune: probe cannot run --precision {precision} on cpu" in result.stderr
    assert "tune with another --precision" in result.stderr
    assert not out.exists()


def test_a_shorter_sequence_that_fits_is_named(machine_of) -> None:
    machine_of(0.03)  # 31 MiB: tiny-llama-1m needs ~65 MiB at seq 1024, ~25 MiB at 256 (fp32 AdamW, analytic)
    with pytest.raises(BatchpilotError, match=r"--seq-len (\d+) fits") as info:
        stages.new_state(TuneConfig(model="tiny-llama-1m", seq_len=1024, device="cpu", out=Path("/nonexistent")))
    found = re.search(r"--seq-len (\d+) fits", str(info.value))
    assert found is not None
    shorter = int(found.group(1))
    stages.new_state(TuneConfig(model="tiny-llama-1m", seq_len=shorter, device="cpu", out=Path("/nonexistent")))


def test_a_probe_budget_without_room_for_one_sequence_is_refused(machine_of) -> None:
    machine_of(64)
    cfg = TuneConfig(model="tiny-llama-15m", seq_len=1024, device="cpu", memory_budget_bytes=2**20, out=Path("/x"))
    with pytest.raises(BatchpilotError, match=r"^--memory-budget 1.00 MiB holds no micro-batch .* give --memory-budget"):
        stages.new_state(cfg)
    stages.new_state(TuneConfig(model="tiny-llama-15m", seq_len=1024, device="cpu", memory_budget_bytes=2**20,
                                out=Path("/x"), skip=("probe",)))  # no probe: its budget does not matter


def test_probe_advice_names_tunes_flags(monkeypatch: pytest.MonkeyPatch, machine_of) -> None:
    import batchpilot.measure.probe as probe

    machine_of(64)

    def timed_out(*_args, **_kwargs):
        raise InfeasibleError("not even micro-batch 1 of tiny-llama-1m at --seq-len 256 finished on cpu (trial ran "
                              "past --trial-timeout); raise --trial-timeout or lower --seq-len")

    monkeypatch.setattr(probe, "run_probe", timed_out)
    cfg = TuneConfig(model="tiny-llama-1m", device="cpu", time_budget_s=300.0, out=Path("/x"))
    with pytest.raises(InfeasibleError) as info:
        stages.probe_stage(cfg, stages.new_state(cfg))
    assert "raise --time-budget (tune gives each trial 120 s, 40% of it, at least 60 s)" in str(info.value)
    assert "raise --trial-timeout" not in str(info.value)


def _cluster_plan(tmp_path: Path, machine_of, *, engine: str = "batchpilot") -> tuple[PlanRecord, Path]:
    """tune's plan stage for tiny-llama-1m with a 64 × H100 target, from a state without probe or noise records (the
    local device's measured peak stood in)."""
    machine_of(64)
    cfg = TuneConfig(model="tiny-llama-1m", seq_len=256, device="cpu", gpu="h100-sxm", gpus=64, data="corpus.jsonl",
                     out=tmp_path, engine=engine)
    state = stages.new_state(cfg)
    state.peak_flops_per_s = 1e11
    record = stages.plan_stage(cfg, state, tmp_path)
    assert record.cluster_plan is not None
    return record.cluster_plan, tmp_path / "exports"


def test_the_cluster_plan_is_whole_warned_and_exported_with_the_data(tmp_path: Path, machine_of) -> None:
    cluster, exports = _cluster_plan(tmp_path, machine_of)
    best = cluster.best
    assert best is not None and (best.tp, best.pp) == (1, 1)  # batchpilot's runner: DDP or FSDP2
    assert best.global_batch_sequences % 64 == 0  # not a prime such as 37: it splits over every GPU
    assert any("too small to keep them busy" in w for w in cluster.warnings or ())
    launch = (exports / "cluster-torchrun.sh").read_text()
    assert "-m batchpilot.cli train" in launch and "--data corpus.jsonl" in launch and "--expect-world-size 64" in launch
    assert "--data corpus.jsonl" in (exports / "local-torchrun.sh").read_text()
    assert (exports / "cluster-deepspeed.json").read_text().startswith("# not exportable: --export deepspeed")


def test_the_cluster_target_names_b_simple_and_the_knee_it_was_rounded_to() -> None:
    """B_simple 0.81 sequences and knee 18: the local batch is 18, below one per GPU on 64; the target's source says
    what the 18 is (it read 'the measured batch (18 sequences …)', while the measurement was 0.81)."""
    from batchpilot.specs.model import load_model

    cfg = TuneConfig(model="tiny-llama-1m", seq_len=256, device="cpu", gpu="h100-sxm", gpus=64)
    state = stages.TuneState(model=load_model("tiny-llama-1m"), probe=record_samples.probe(knee_micro_batch=18),
                             noise=record_samples.noise(b_simple_sequences=0.809))
    tokens, source = stages._cluster_target_tokens(cfg, state)
    assert tokens == 64 * 256
    assert ("one sequence per GPU (64): the local plan's batch (18 sequences: B_simple 0.809 from the first steps of "
            "a fresh model, in whole micro-batches of the knee 18) is below it") in source
    _, source = stages._cluster_target_tokens(cfg, dataclasses.replace(state, noise=None))
    assert "the local plan's batch (18 sequences: the probe's knee; no noise measurement)" in source


def test_a_pipeline_with_a_large_bubble_is_warned() -> None:
    """A 1M-parameter model on 64 H100 with 4 pipeline stages and one micro-batch per step: the bubble is
    (p − 1)/(m + p − 1) of the step, far above 20%, and MFU is under 10%: both are warned."""
    from batchpilot.plan.planner import Pins, PlanRequest, plan
    from batchpilot.specs.hardware import ClusterSpec, load_accelerator
    from batchpilot.specs.model import load_model

    cluster = ClusterSpec(accelerator=load_accelerator("h100-sxm"), devices_per_node=8, num_nodes=8,
                          inter_node_bandwidth_bytes_per_s=50e9)
    result = plan(PlanRequest(model=load_model("tiny-llama-1m"), cluster=cluster, seq_len=256,
                              global_batch_sequences=512, engine="megatron", pins=Pins(pp=4)))
    best = result.plans[0]
    assert best.step.bubble_s / best.step.step_time_s > 0.2
    assert any(w.startswith("the winner's pipeline bubble is") for w in result.warnings)
    assert any("too small to keep them busy" in w for w in result.warnings)


def test_the_cluster_plan_is_printed_and_reported(tmp_path: Path, machine_of) -> None:
    from batchpilot.cli._common import console
    from batchpilot.cli.tune import _render_cluster
    from batchpilot.report.html import _plan_section

    cluster, _ = _cluster_plan(tmp_path, machine_of)
    with console.capture() as captured:
        _render_cluster(cluster)
    printed = captured.get()
    assert printed.startswith("cluster plan (64 × h100-sxm): micro-batch") and "warning: MFU" in printed
    local = dataclasses.replace(cluster, cluster_plan=cluster)  # stands in for the local plan that carries it
    page = _plan_section(types.SimpleNamespace(plan=local))
    assert "id='cluster-plan'" in page and "too small to keep them busy" in page


@pytest.mark.parametrize(("planned", "every", "runs"), [("full", 2, ("full", 2)), ("op", 3, ("op", 3)),
                                                         ("selective", 2, ("none", 1)), ("none", 1, ("none", 1))])
def test_the_verification_run_trains_with_the_plans_recomputation(tmp_path: Path, planned: str, every: int,
                                                                   runs: tuple[str, int]) -> None:
    """The verification run applies the local plan's policy (it used to train without recomputation whatever the
    probe measured and the plan predicted); selective, the attention core, is what none keeps under SDPA."""
    from batchpilot.specs.settings import RunSettings

    settings = RunSettings(precision="fp32", recompute=planned, recompute_every=every)  # type: ignore[arg-type]
    cfg = TuneConfig(model="tiny-llama-1m", seq_len=64, settings=settings)
    config = stages.verify_config(cfg, record_samples.plan_row(recompute=planned), steps=5, out=tmp_path, device="cpu")
    assert (config.parallel.recompute, config.parallel.recompute_every) == runs
    assert config.batch.micro_batch_sequences == 24 and config.run.steps == 5


@pytest.mark.parametrize("command", ["probe", "tune"])
def test_recompute_every_without_recomputation_is_one_line(cli_runner, tmp_path: Path, command: str) -> None:
    result = cli_runner.invoke(app, [command, "--device", "cpu", "--recompute-every", "2", *(
        ["--out", str(tmp_path / "run")] if command == "tune" else [])])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: --recompute-every 2 checkpoints 1 layer in 2 and needs --recompute op, "
                                     "selective or full")
    assert not (tmp_path / "run").exists()
