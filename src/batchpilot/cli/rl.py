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
from typing import Annotated, Any

import typer
from rich.table import Table

from batchpilot.cli._common import PlainHelpCommand, PlainHelpGroup, console, handle_errors, print_json
from batchpilot.cli._options import GpusPerNodeOpt, JsonOpt, choice, count, number, option, whole
from batchpilot.errors import SpecError
from batchpilot.plan.planner import Pins
from batchpilot.rl.batch import RLBatch
from batchpilot.rl.exports import EXPORT_FORMATS, export_text
from batchpilot.rl.plan import RLPlan, RLPlanRequest, plan_rl
from batchpilot.rl.recipes import RLRecipe, recipe
from batchpilot.rl.rules import FRAMEWORKS
from batchpilot.specs.hardware import load_accelerator
from batchpilot.specs.model import load_model
from batchpilot.units import GIB

app = typer.Typer(help="RL post-training batches (GRPO/PPO): plan, fit and export.", no_args_is_help=True,
                  cls=PlainHelpGroup)

_RECIPE = "the --like recipe's"
_SEARCHED = "searched"


def _pick(given: Any, from_recipe: Any, flag: str) -> Any:
    value = given if given is not None else from_recipe
    if value is None:
        raise SpecError(f"{flag} is required (or --like NAME for a published recipe; see `batchpilot known`)")
    return value


@app.command("plan", cls=PlainHelpCommand)
@handle_errors
def plan_command(
    like: Annotated[str | None, option("--like", help=(
        "A published RL recipe (`batchpilot known`): deepseek-r1-zero, dapo, …"))] = None,
    model: Annotated[str | None, option("--model", show_default=_RECIPE, help=(
        "Preset name (see `batchpilot model list`) or a Hugging Face config.json (or its folder)."))] = None,
    gpu: Annotated[str | None, option("--gpu", metavar="NAME|FILE", show_default=_RECIPE, help=(
        "Accelerator: a catalog name (see `batchpilot hardware list`) or a JSON file in the same format."))] = None,
    gpus: Annotated[int | None, option("--gpus", whole("--gpus"), show_default=_RECIPE,
                                       help="GPUs in the job.")] = None,
    gpus_per_node: GpusPerNodeOpt = 8,
    prompts_per_rollout: Annotated[int | None, option(
        "--prompts-per-rollout", count("--prompts-per-rollout"), show_default=_RECIPE,
        help="Unique prompts per rollout.")] = None,
    group_size: Annotated[int | None, option("--group-size", count("--group-size"), show_default=_RECIPE,
                                             help="Responses sampled per prompt (GRPO's G).")] = None,
    updates_per_rollout: Annotated[int | None, option(
        "--updates-per-rollout", count("--updates-per-rollout"), show_default=_RECIPE,
        help="Optimizer updates per rollout (all epochs).")] = None,
    epochs: Annotated[int | None, option("--epochs", count("--epochs"), show_default=f"{_RECIPE}, else 1",
                                         help="Passes over each rollout (verl ppo_epochs).")] = None,
    max_prompt_len: Annotated[int | None, option("--max-prompt-len", count("--max-prompt-len"),
                                                 show_default=_RECIPE, help="Longest prompt, tokens.")] = None,
    max_response_len: Annotated[int | None, option("--max-response-len", count("--max-response-len"),
                                                   show_default=_RECIPE, help="Longest response, tokens.")] = None,
    mean_response_len: Annotated[int | None, option(
        "--mean-response-len", count("--mean-response-len"), show_default="all at the maximum, the worst case",
        help="Expected mean response, tokens.")] = None,
    algorithm: Annotated[str | None, option("--algorithm", choice("--algorithm", ("grpo", "ppo")),
                                            show_default=f"{_RECIPE}, else grpo",
                                            help="grpo (no critic) or ppo (critic).")] = None,
    framework: Annotated[str, option("--framework", choice("--framework", FRAMEWORKS),
                                     help="Whose batch rules apply.")] = "verl",
    engine: Annotated[str | None, option("--engine", choice("--engine", ("fsdp", "megatron")),
                                         show_default="megatron for MoE, else fsdp", help="Update backend.")] = None,
    placement: Annotated[str, option("--placement", choice("--placement", ("colocated", "separate")),
                                     help="Rollout on the training GPUs or on GPUs of its own.")] = "colocated",
    rollout_gpus: Annotated[int | None, option("--rollout-gpus", whole("--rollout-gpus"),
                                               help="With --placement separate.")] = None,
    rollout_tp: Annotated[int | None, option("--rollout-tp", whole("--rollout-tp"), show_default=_SEARCHED,
                                             help="Pin the rollout tensor-parallel size.")] = None,
    gpu_memory_utilization: Annotated[float | None, option(
        "--gpu-memory-utilization", number("--gpu-memory-utilization"), show_default=_SEARCHED,
        help="Pin vLLM's utilisation.")] = None,
    max_num_batched_tokens: Annotated[int, option("--max-num-batched-tokens", count("--max-num-batched-tokens"),
                                                  help="vLLM tokens per engine step.")] = 8192,
    max_num_seqs: Annotated[int | None, option("--max-num-seqs", count("--max-num-seqs"), show_default="1024",
                                               help="Pin vLLM's running-sequence cap.")] = None,
    reference: Annotated[bool | None, option("--reference/--no-reference", show_default=f"{_RECIPE}, else on",
                                             help="A reference model (KL) each step.")] = None,
    offload: Annotated[bool, option("--offload/--no-offload", help=(
        "Colocated: states to host between phases."))] = True,
    train_tp: Annotated[int | None, option("--train-tp", whole("--train-tp"), show_default=_SEARCHED, help=(
        "Pin the update's tensor (Megatron) or Ulysses sequence (FSDP) parallel size."))] = None,
    export: Annotated[str | None, option("--export", choice("--export", EXPORT_FORMATS), help=(
        "Write the plan for this framework (needs --out)."))] = None,
    out: Annotated[Path | None, option("--out", help="File for --export.")] = None,
    json_output: JsonOpt = False,
) -> None:
    """Plan an RL step: samples per rollout and update, policy lag, memory and time per phase, the rollout engine."""
    if (export is None) != (out is None):
        raise SpecError("--export and --out go together: --export verl|trl|openrlhf --out FILE")
    r: RLRecipe | None = recipe(like) if like else None
    prompts = _pick(prompts_per_rollout, r and r.prompts_per_rollout, "--prompts-per-rollout")
    group = _pick(group_size, r and r.group_size, "--group-size")
    ep = epochs if epochs is not None else r.epochs if r is not None else 1
    updates = updates_per_rollout
    if updates is None and r is not None:
        updates = r.batch().updates_per_rollout
    batch = RLBatch.from_updates(prompts_per_rollout=prompts, group_size=group,
                                 updates_per_rollout=_pick(updates, None, "--updates-per-rollout"), epochs=ep,
                                 reference_refresh_updates=r.reference_refresh_updates if r else None)
    req = RLPlanRequest(
        model=load_model(_pick(model, r and r.model_preset, "--model")),
        gpu=load_accelerator(_pick(gpu, r and r.accelerator, "--gpu")),
        gpus=_pick(gpus, r and r.gpus, "--gpus"), batch=batch,
        max_prompt_tokens=_pick(max_prompt_len, r and r.max_prompt_tokens, "--max-prompt-len"),
        max_response_tokens=_pick(max_response_len, r and r.max_response_tokens, "--max-response-len"),
        mean_response_tokens=mean_response_len,
        algorithm=algorithm or (r.algorithm if r else "grpo"),  # type: ignore[arg-type]  # checked by choice()
        framework=framework, engine=engine,  # type: ignore[arg-type]
        placement=placement,  # type: ignore[arg-type]
        rollout_gpus=rollout_gpus, reference=(r.reference if r else True) if reference is None else reference,
        offload=offload, rollout_tp=rollout_tp,
        gpu_memory_utilization=gpu_memory_utilization,
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs or 1024, max_num_seqs_pinned=max_num_seqs is not None,
        gpus_per_node=gpus_per_node, train_pins=Pins(tp=train_tp),
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
