"""When nothing fits, every fix offered is true: re-planned with exactly its flags it fits, with the memory and speed
shown; none repeats a pinned choice; none is one that cannot help (more GPUs, ZeRO-3 or tensor parallelism on one
GPU while something on it fits); all are flags, never a Python dict."""

from __future__ import annotations

import dataclasses
import re

import pytest

from batchpilot.cli import app
from batchpilot.errors import BatchpilotError, InfeasibleError, SpecError
from batchpilot.plan.explain import fixes
from batchpilot.plan.planner import Pins, Plan, PlanRequest, plan
from batchpilot.specs.hardware import ClusterSpec, load_accelerator
from batchpilot.specs.model import load_model
from batchpilot.units import GIB

ONE_H100 = ClusterSpec(accelerator=load_accelerator("h100-sxm"), devices_per_node=1, num_nodes=1)


def qwen_7b(engine: str | None = "hf", **pins) -> PlanRequest:
    """Qwen2.5-7B on one 80 GB GPU, seq 4096, 8 sequences per step, full recomputation pinned."""
    return PlanRequest(model=load_model("qwen2.5-7b"), cluster=ONE_H100, seq_len=4096, global_batch_sequences=8,
                       engine=engine, pins=Pins(recompute="full", **pins))


def _replan(req: PlanRequest) -> Plan | None:
    try:
        return plan(dataclasses.replace(req, top=1)).plans[0]
    except BatchpilotError:
        return None


def _apply(req: PlanRequest, flags: str) -> PlanRequest:
    """The request with a fix's flags applied (the flags fixes() writes)."""
    words = flags.split()
    if words[0] == "without":
        return dataclasses.replace(req, pins=Pins())
    settings, changes = req.settings, {}
    for flag, value in zip(words[::2], words[1::2], strict=False):
        if flag == "--engine":
            changes["engine"] = value
        elif flag == "--offload":
            settings = dataclasses.replace(settings, offload=True, zero_stage=max(1, settings.zero_stage))
        elif flag == "--optimizer":
            settings = dataclasses.replace(settings, optimizer=value)  # type: ignore[arg-type]
        elif flag == "--headroom":
            changes["headroom"] = int(value.rstrip("%")) / 100
    if "--offload" in words and words[-1] == "--offload":
        settings = dataclasses.replace(settings, offload=True, zero_stage=max(1, settings.zero_stage))
    return dataclasses.replace(req, settings=settings, **changes)


def test_one_gpu_nothing_fits_offers_what_fits_on_it():
    req = qwen_7b()
    with pytest.raises(InfeasibleError) as info:
        plan(req)
    text = str(info.value)
    assert "\n" not in text and "{" not in text
    offered = text.split("fits with: ", 1)[1]
    assert offered.startswith("--offload (")
    for useless in ("--gpus", "--tp", "ZeRO-3 (", "--recompute full", "--engine deepspeed (", "more GPUs"):
        assert useless not in offered, useless
    found = fixes(req, _replan, need_bytes=0)
    assert found[0].flags == "--offload"
    for fix in found:  # each one, planned again with exactly its flags, fits with the memory and speed shown
        again = _replan(_apply(req, fix.flags))
        assert again is not None and again.memory.total_bytes <= req.budget_bytes
        assert f"{again.memory.total_bytes / GIB:.1f} GiB per GPU" in fix.describe()
        assert again.step.tokens_per_s == fix.plan.step.tokens_per_s


def test_eight_bit_adamw_is_offered_exactly_when_it_fits():
    """Offered iff the 8-bit plan fits in the budget (the memory model decides; at seq 4096 with a 10% headroom the
    8-bit state alone does not bring Qwen2.5-7B under 72 GiB, at seq 1024 it does)."""
    offered = []
    for seq_len in (4096, 1024, 512):
        req = dataclasses.replace(qwen_7b(), seq_len=seq_len, pins=Pins(recompute="full", zero_stage=0))
        found = {f.flags: f for f in fixes(req, _replan, need_bytes=0)}
        direct = _replan(dataclasses.replace(req, settings=dataclasses.replace(req.settings, optimizer="adamw-8bit")))
        assert ("--optimizer adamw-8bit" in found) == (direct is not None)
        if direct is not None:
            assert found["--optimizer adamw-8bit"].plan.memory.total_bytes == direct.memory.total_bytes
            offered.append(seq_len)
    assert offered, "8-bit AdamW fits none of these: the case no longer exercises the fix"


def test_an_option_the_engine_lacks_is_offered_on_an_engine_that_has_it():
    """batchpilot's runner runs no Megatron-style selective recomputation and offloads nothing: the refusal names
    the engine that does, and the fix that fits on this GPU."""
    with pytest.raises(SpecError) as info:
        plan(dataclasses.replace(qwen_7b("batchpilot"), pins=Pins(recompute="selective")))
    text = str(info.value)
    assert text.startswith("--engine batchpilot does not switch on --recompute selective")
    assert "engines that run it: megatron" in text
    assert re.search(r"fits with: --engine megatron --offload \(\d+\.\d GiB per GPU", text)


def test_a_smaller_headroom_is_offered_with_the_headroom_it_needs():
    req = PlanRequest(model=load_model("llama-3-8b"), cluster=ClusterSpec(
        accelerator=load_accelerator("h100-sxm"), devices_per_node=8, num_nodes=2, inter_node_bandwidth_bytes_per_s=50e9),
        seq_len=8192, global_batch_tokens=4 * 2**20, engine="batchpilot", pins=Pins(recompute="none", tp=1))
    with pytest.raises(InfeasibleError) as info:
        plan(req)
    match = re.search(r"--headroom (\d+)% \((\d+\.\d) GiB per GPU", str(info.value))
    assert match is not None
    headroom = int(match.group(1)) / 100
    fitted = plan(dataclasses.replace(req, headroom=headroom)).plans[0]
    assert f"{fitted.memory.total_bytes / GIB:.1f}" == match.group(2)
    assert "without --tp 1 --recompute none (" in str(info.value)  # the runner's recomputation fits as it is


def test_cli_prints_the_fixes_as_flags(cli_runner):
    result = cli_runner.invoke(app, ["plan", "--model", "qwen2.5-7b", "--gpu", "h100-sxm", "--seq-len", "4096",
                                     "--global-batch", "8", "--recompute", "full"])
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert line.count("\n") == 0 and "fits with: --offload (" in line and "{" not in line


def test_no_layout_with_the_pins_names_them_as_flags():
    """The pins are named as the flags that set them (this message printed a Python dict of them)."""
    req = PlanRequest(model=load_model("qwen2.5-7b"), cluster=ONE_H100, seq_len=4096, global_batch_sequences=8,
                      engine="deepspeed", pins=Pins(recompute="full", zero_stage=1))
    with pytest.raises(InfeasibleError) as info:
        plan(req)
    text = str(info.value)
    assert text.startswith("no parallel layout of qwen2.5-7b on 1 GPUs runs with --zero 1 --recompute full under "
                           "--engine deepspeed; fits with: ")
    assert "{" not in text and "'" not in text


@pytest.mark.parametrize("case", ["memory", "no layout", "engine"])
def test_the_refusal_carries_the_fixes_its_line_lists(case):
    """The fixes are data on the error (``exc.fixes``, what the web page lists) and the line is rendered from them;
    ``suggest_fixes=False`` plans once and carries none."""
    req = {"memory": qwen_7b(),
           "no layout": PlanRequest(model=load_model("qwen2.5-7b"), cluster=ONE_H100, seq_len=4096,
                                    global_batch_sequences=8, engine="deepspeed",
                                    pins=Pins(recompute="full", zero_stage=1)),
           "engine": dataclasses.replace(qwen_7b("batchpilot"), pins=Pins(recompute="selective"))}[case]
    with pytest.raises(BatchpilotError) as info:
        plan(req)
    text, offered = str(info.value), info.value.fixes
    assert offered and text.endswith("; fits with: " + "; ".join(offered))
    assert offered[0] == fixes(req, _replan, need_bytes=0)[0].describe()
    with pytest.raises(BatchpilotError) as quiet:
        plan(req, suggest_fixes=False)
    assert quiet.value.fixes == () and "fits with" not in str(quiet.value)
