"""``batchpilot rl plan`` — RL post-training batches (GRPO/PPO): the batch hierarchy, memory and time per
phase, the rollout engine, and exports to verl / TRL / OpenRLHF.

Examples::

    batchpilot rl plan --like deepseek-r1-zero --gpu h800 --gpus 512
    batchpilot rl plan --like dapo --gpu h20 --gpus 128 --export verl --out dapo_verl.sh
    batchpilot rl plan --model qwen2.5-7b --gpu h100-sxm --gpus 8 --prompts-per-rollout 64 --group-size 8 \\
        --updates-per-rollout 4 --max-prompt-len 1024 --max-response-len 4096 --json
    batchpilot rl plan --model tiny-llama-1m --gpu h100-sxm --gpus 1 --prompts-per-rollout 4 --group-size 4 \\
        --updates-per-rollout 2 --max-prompt-len 64 --max-response-len 64 --framework trl --export trl --out grpo.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from batchpilot.cli._common import console, handle_errors, print_json
from batchpilot.errors import SpecError
from batchpilot.plan.planner import Pins
from batchpilot.rl.batch import RLBatch
from batchpilot.rl.exports import EXPORT_FORMATS, export_text
from batchpilot.rl.plan import RLPlan, RLPlanRequest, plan_rl
from batchpilot.rl.recipes import RLRecipe, recipe
from batchpilot.specs.hardware import load_accelerator
from batchpilot.specs.model import load_model
from batchpilot.units import GIB, parse_count

app = typer.Typer(help="RL post-training batches (GRPO/PPO): plan, fit and export.", no_args_is_help=True)

_COUNT = "COUNT"


def _count(value: str | None, flag: str) -> int | None:
    return None if value is None else parse_count(value, flag)


def _pick(given: Any, from_recipe: Any, flag: str) -> Any:
    value = given if given is not None else from_recipe
    if value is None:
        raise SpecError(f"{flag} is required (or --like NAME for a published recipe; see `batchpilot known`)")
    return value


@app.command("plan")
@handle_errors
def plan_command(
    like: str = typer.Option(None, "--like", help="A published RL recipe (`batchpilot known`): deepseek-r1-zero, dapo, …"),
    model: str = typer.Option(None, "--model", help="Preset name or a Hugging Face config.json (default: the recipe's)."),
    gpu: str = typer.Option(None, "--gpu", metavar="NAME|FILE", help="Accelerator (`batchpilot hardware list`)."),
    gpus: str = typer.Option(None, "--gpus", metavar=_COUNT, help="GPUs in the job."),
    gpus_per_node: str = typer.Option("8", "--gpus-per-node", metavar=_COUNT, help="GPUs per node."),
    prompts_per_rollout: str = typer.Option(None, "--prompts-per-rollout", metavar=_COUNT, help="Unique prompts per rollout."),
    group_size: str = typer.Option(None, "--group-size", metavar=_COUNT, help="Responses sampled per prompt (GRPO's G)."),
    updates_per_rollout: str = typer.Option(None, "--updates-per-rollout", metavar=_COUNT,
                                            help="Optimizer updates per rollout (all epochs)."),
    epochs: str = typer.Option("1", "--epochs", metavar=_COUNT, help="Passes over each rollout (verl ppo_epochs)."),
    max_prompt_len: str = typer.Option(None, "--max-prompt-len", metavar=_COUNT, help="Longest prompt, tokens."),
    max_response_len: str = typer.Option(None, "--max-response-len", metavar=_COUNT, help="Longest response, tokens."),
    mean_response_len: str = typer.Option(None, "--mean-response-len", metavar=_COUNT,
                                          help="Expected mean response (default: all at the maximum, the worst case)."),
    algorithm: str = typer.Option(None, "--algorithm", help="grpo (no critic) or ppo (critic)."),
    framework: str = typer.Option("verl", "--framework", help="Whose batch rules apply: verl, trl, openrlhf."),
    engine: str = typer.Option(None, "--engine", help="Update backend: fsdp or megatron (default: megatron for MoE)."),
    placement: str = typer.Option("colocated", "--placement", help="colocated or separate rollout GPUs."),
    rollout_gpus: str = typer.Option(None, "--rollout-gpus", metavar=_COUNT, help="With --placement separate."),
    rollout_tp: str = typer.Option(None, "--rollout-tp", metavar=_COUNT, help="Pin the rollout tensor-parallel size."),
    gpu_memory_utilization: float = typer.Option(None, "--gpu-memory-utilization", help="Pin vLLM's utilisation."),
    max_num_batched_tokens: str = typer.Option("8192", "--max-num-batched-tokens", metavar=_COUNT,
                                               help="vLLM tokens per engine step."),
    max_num_seqs: str = typer.Option(None, "--max-num-seqs", metavar=_COUNT, help="Pin vLLM's running-sequence cap."),
    reference: bool = typer.Option(None, "--reference/--no-reference", help="A reference model (KL) each step."),
    offload: bool = typer.Option(True, "--offload/--no-offload", help="Colocated: states to host between phases."),
    train_tp: str = typer.Option(None, "--train-tp", metavar=_COUNT,
                                 help="Pin the update's tensor (Megatron) or Ulysses sequence (FSDP) parallel size."),
    export: str = typer.Option(None, "--export", help=f"Write the plan for {'|'.join(EXPORT_FORMATS)} (needs --out)."),
    out: Path = typer.Option(None, "--out", help="File for --export."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object on stdout (stable keys)."),
) -> None:
    """Plan an RL step: samples per rollout and update, policy lag, memory and time per phase, the rollout engine."""
    if (export is None) != (out is None):
        raise SpecError("--export and --out go together: --export verl|trl|openrlhf --out FILE")
    r: RLRecipe | None = recipe(like) if like else None
    prompts = _pick(_count(prompts_per_rollout, "--prompts-per-rollout"), r and r.prompts_per_rollout, "--prompts-per-rollout")
    group = _pick(_count(group_size, "--group-size"), r and r.group_size, "--group-size")
    ep = parse_count(epochs, "--epochs") if r is None or epochs != "1" else r.epochs
    updates = _count(updates_per_rollout, "--updates-per-rollout")
    if updates is None and r is not None:
        updates = r.batch().updates_per_rollout
    batch = RLBatch.from_updates(prompts_per_rollout=prompts, group_size=group,
                                 updates_per_rollout=_pick(updates, None, "--updates-per-rollout"), epochs=ep,
                                 reference_refresh_updates=r.reference_refresh_updates if r else None)
    req = RLPlanRequest(
        model=load_model(_pick(model, r and r.model_preset, "--model")),
        gpu=load_accelerator(_pick(gpu, r and r.accelerator, "--gpu")),
        gpus=_pick(_count(gpus, "--gpus"), r and r.gpus, "--gpus"), batch=batch,
        max_prompt_tokens=_pick(_count(max_prompt_len, "--max-prompt-len"), r and r.max_prompt_tokens, "--max-prompt-len"),
        max_response_tokens=_pick(_count(max_response_len, "--max-response-len"), r and r.max_response_tokens,
                                  "--max-response-len"),
        mean_response_tokens=_count(mean_response_len, "--mean-response-len"),
        algorithm=(algorithm or (r.algorithm if r else "grpo")).lower(),  # type: ignore[arg-type]
        framework=framework.lower(), engine=engine.lower() if engine else None,  # type: ignore[arg-type]
        placement=placement.lower(),  # type: ignore[arg-type]
        rollout_gpus=_count(rollout_gpus, "--rollout-gpus"), reference=(r.reference if r else True) if reference is None else reference,
        offload=offload, rollout_tp=_count(rollout_tp, "--rollout-tp"),
        gpu_memory_utilization=gpu_memory_utilization,
        max_num_batched_tokens=parse_count(max_num_batched_tokens, "--max-num-batched-tokens"),
        max_num_seqs=_count(max_num_seqs, "--max-num-seqs") or 1024, max_num_seqs_pinned=max_num_seqs is not None,
        gpus_per_node=parse_count(gpus_per_node, "--gpus-per-node"), train_pins=Pins(tp=_count(train_tp, "--train-tp")),
    )
    result = plan_rl(req)
    if export is not None and out is not None:
        out.write_text(export_text(result, export))
    if json_output:
        record = result.to_dict()
        record["like"] = r.name if r else None
        record["export"] = {"format": export, "out": str(out)} if export else None
        print_json(record)
        return
    _render(result, r, export, out)


def _render(p: RLPlan, r: RLRecipe | None, export: str | None, out: Path | None) -> None:
    b, req = p.batch, p.request
    source = f" (like {r.name})" if r else ""
    console.print(f"{req.model.name} on {req.gpus} × {req.gpu.name}, {req.algorithm.upper()}, {req.placement}{source}")
    console.print(f"batch: {b.prompts_per_rollout} prompts × {b.group_size} = {b.samples_per_rollout:,} samples per rollout; "
                  f"{b.samples_per_update:,} per update; {b.updates_per_rollout} updates per rollout; "
                  f"max policy lag {p.max_policy_lag} (mean {p.mean_policy_lag:g})")
    d = p.to_dict()
    t, ro = d["train"], d["rollout"]
    console.print(f"update: {t['engine']} dp {t['dp']} · tp {t['tp']} · sp {t['sequence_parallel']} · pp {t['pp']} · "
                  f"ep {t['ep']}, recompute {t['recompute']}, {t['token_budget_per_gpu']:,} tokens per GPU per micro-batch")
    console.print(f"rollout: {ro['engines']} vLLM engines × TP {ro['tp']}, gpu_memory_utilization "
                  f"{ro['gpu_memory_utilization']:.2f}, max_num_seqs {ro['max_num_seqs']}, KV {ro['kv']['kv_capacity_tokens']:,} "
                  f"tokens per engine, {ro['waves']:.1f} waves, {ro['preemptions']:,} preemptions")
    table = Table("phase", "GiB per GPU", "fits", "seconds")
    for name, seconds in p.step_time_s.items():
        mem = p.memory.get(name)
        table.add_row(name, f"{mem['total_bytes'] / GIB:.1f}" if mem else "—", ("yes" if mem["fits"] else "NO") if mem else "",
                      f"{seconds:,.1f}")
    console.print(table)
    console.print(f"fits: {'yes' if p.fits else 'no'}; step {p.step_time_s['step']:,.0f} s")
    if export:
        console.print(f"wrote {export} config: {out}")
