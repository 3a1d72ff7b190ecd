"""``plan`` on published runs: given a run's model, GPUs and global batch, does batchpilot rank the published layout
among its top five — and where not, why does it predict its own pick to be faster, part by part?

Example (CPU, a minute or two)::

    .venv/bin/python -m benchmarks.published_plans

Rows: every row of ``benchmarks/data/published_runs.json`` whose memory is compared by
``benchmarks/published_runs.py`` (a published peak, all settings expressible). The plan is pinned to nothing but
what the run could not change: the model, the GPU and cluster, the sequence length, the global batch, the engine
and the settings that are not a layout (precision and fp8 recipe, compile, loss path, FSDP2 reshard policy,
parameter dtype). It searches micro-batch, accumulation, dp/tp/pp(/cp)/ep, ZeRO stage and recomputation.

Outcome per row: ``top5`` (the published layout — micro-batch, data/tensor/pipeline parallel sizes, ZeRO stage,
recomputation — is ranked 1 to 5), or ``explained`` (batchpilot's winner and the published layout evaluated by the
same step-time model, term by term: compute, pipeline bubble, TP/CP/EP/PP/DP communication, optimizer; plus whether
the published layout fits the plan's memory budget), or ``not planned`` (the plan refused, with its reason).
Results: ``benchmarks/results/published_runs_plans.json`` and ``.md``.
"""

from __future__ import annotations

import json
from typing import Any

from batchpilot.errors import BatchpilotError
from batchpilot.estimate.steptime import StepTime, StepTimeModel
from batchpilot.plan.options import PlanOptions, prepare_plan
from batchpilot.plan.planner import plan
from batchpilot.plan.request import Plan
from batchpilot.specs.batch import BatchTriad
from batchpilot.specs.settings import RunSettings
from benchmarks.published_runs import RESULTS, Inputs, evaluate, load_data, row_to_inputs

TOP = 5
#: Step-time terms compared part by part (:class:`batchpilot.estimate.steptime.StepTime`).
PARTS = ("compute_s", "bubble_s", "tp_comm_s", "cp_comm_s", "ep_comm_s", "pp_comm_s", "dp_exposed_s", "optimizer_s")


def layout(triad: BatchTriad, settings: RunSettings) -> dict[str, Any]:
    """The layout a published run chose (what a plan row is matched on)."""
    return {"micro_batch": triad.micro_batch_sequences, "dp": triad.data_parallel_ranks, "tp": settings.tp,
            "pp": settings.pp, "cp": settings.cp, "zero_stage": settings.zero_stage, "recompute": settings.recompute}


def _plan_layout(p: Plan) -> dict[str, Any]:
    return layout(p.triad, p.settings)


#: Frameworks -> the engine of batchpilot's table a user of that framework plans with, where it is not the engine
#: whose memory bookkeeping the comparison follows (``published_runs.ENGINES``): torchtune has no engine of its own
#: and torchtitan runs the same PyTorch-native setups (FSDP2, per-op checkpointing, compile, pure-bf16 parameters;
#: batchpilot's own runner has no pure-bf16 parameters); ms-swift's DeepSpeed runs go through the transformers
#: Trainer, whose gradient checkpointing recomputes without a pipeline (a bare DeepSpeed config cannot).
PLAN_ENGINES = (("torchtune", "torchtitan"), ("deepspeed (transformers trainer", "hf"))


def plan_engine(row: dict[str, Any], engine: str) -> str:
    """The engine ``plan`` is asked for on ``row`` (see :data:`PLAN_ENGINES`)."""
    framework = str(row.get("framework") or "").lower()
    return next((plan for prefix, plan in PLAN_ENGINES if framework.startswith(prefix)), engine)


def options_for(row: dict[str, Any], inputs: Inputs) -> PlanOptions:
    """The plan a user of the published run would ask for (see the module docstring)."""
    assert inputs.model and inputs.settings and inputs.triad and inputs.accelerator
    s, t = inputs.settings, inputs.triad
    cluster = inputs.cluster
    bandwidth = cluster.inter_node_bandwidth_bytes_per_s if cluster and cluster.inter_node_bandwidth_bytes_per_s else None
    kwargs: dict[str, Any] = {} if bandwidth is None else {"inter_node_bandwidth_bytes_per_s": int(bandwidth)}
    return PlanOptions(
        model=inputs.model, gpu=inputs.accelerator, seq_len=t.seq_len_tokens, gpus=row["num_gpus"],
        gpus_per_node=min(row["gpus_per_node"], row["num_gpus"]), global_batch=t.global_batch_sequences,
        precision=s.precision, optimizer=s.optimizer, engine=plan_engine(row, s.engine), sp=s.sp, attention=s.attention,
        offload=s.offload, recompute_every=s.recompute_every, compile=s.compile, fp8_recipe=s.fp8_recipe,
        fp8_all_gather=s.fp8_all_gather, reshard_after_forward=s.reshard_after_forward, loss=s.loss,
        loss_chunks=s.loss_chunks, param_dtype=s.param_dtype, top=TOP, **kwargs)


def _parts(step: StepTime) -> dict[str, float]:
    return {part: getattr(step, part) for part in PARTS if getattr(step, part, 0.0)} | {"step_time_s": step.step_time_s}


def check_row(row: dict[str, Any]) -> dict[str, Any] | None:
    """The plan outcome of one published run (None: its memory is not compared)."""
    memory = evaluate(row)["memory"]
    if not memory or "predicted_bytes" not in memory:
        return None
    inputs = row_to_inputs(row)
    assert inputs.model and inputs.settings and inputs.triad
    published = layout(inputs.triad, inputs.settings)
    out: dict[str, Any] = {"id": row["id"], "source": row["source"], "split": row["split"], "published": published}
    if inputs.accelerator is None:
        return {**out, "outcome": "not planned", "reason": f"accelerator {row['gpu']} not in the catalog"}
    try:
        prepared = prepare_plan(options_for(row, inputs))
        result = plan(prepared.request)
    except BatchpilotError as exc:
        return {**out, "outcome": "not planned", "reason": str(exc)}
    ranked = [_plan_layout(p) for p in result.plans[:TOP]]
    if published in ranked:
        return {**out, "outcome": "top5", "rank": ranked.index(published) + 1, "plans": len(result.plans)}
    if not result.plans:
        return {**out, "outcome": "not planned", "reason": result.rationale or "no plan fits"}
    winner = result.plans[0]
    cluster = prepared.request.cluster
    steps = StepTimeModel(inputs.model, cluster, seq_len=inputs.triad.seq_len_tokens)
    explained: dict[str, Any] = {**out, "outcome": "explained", "winner": _plan_layout(winner),
                                 "winner_parts": _parts(steps.estimate(winner.settings, winner.triad))}
    try:
        explained["published_parts"] = _parts(steps.estimate(inputs.settings, inputs.triad))
    except BatchpilotError as exc:
        explained["published_parts_refused"] = str(exc)
    explained["published_fits_budget"] = memory["predicted_total_bytes"] <= prepared.request.budget_bytes
    return explained


def run() -> dict[str, Any]:
    data = load_data()
    rows = [r for r in (check_row(row) for row in data["rows"]) if r is not None]
    counts = {outcome: sum(r["outcome"] == outcome for r in rows) for outcome in ("top5", "explained", "not planned")}
    return {"rows": rows, "counts": counts}


def _fmt(lay: dict[str, Any]) -> str:
    return (f"{lay['micro_batch']}×dp{lay['dp']} tp{lay['tp']} pp{lay['pp']} cp{lay['cp']} ZeRO-{lay['zero_stage']} "
            f"{lay['recompute']}")


def markdown(result: dict[str, Any]) -> str:
    c = result["counts"]
    lines = ["# plan on published runs", "", "Generated by `python -m benchmarks.published_plans` (method: its module "
             "docstring). For each published run whose memory batchpilot compares, `plan` is given the run's model, "
             "GPUs, sequence length, global batch, engine and non-layout settings, and searches the layout.", "",
             f"Published layout in the top {TOP}: **{c['top5']}** of {len(result['rows'])}; explained (batchpilot's "
             f"pick predicted faster, part by part below): {c['explained']}; not planned: {c['not planned']}.", "",
             "| id | split | published layout | outcome |", "|---|---|---|---|"]
    for r in result["rows"]:
        if r["outcome"] == "top5":
            what = f"rank {r['rank']}"
        elif r["outcome"] == "explained":
            w, p = r["winner_parts"], r.get("published_parts", {})
            diffs = ", ".join(f"{k.removesuffix('_s')} {w.get(k, 0):.2f} vs {p.get(k, 0):.2f} s" for k in (*PARTS, "step_time_s")
                              if abs(w.get(k, 0) - p.get(k, 0)) > 0.01 * max(p.get("step_time_s", 1), 1e-9))
            fits = "" if r["published_fits_budget"] else "; the published layout does not fit the plan's budget"
            what = f"winner {_fmt(r['winner'])}: {diffs or 'same parts'}{fits}"
        else:
            what = f"not planned: {r['reason']}"
        lines.append(f"| {r['id']} | {r['split']} | {_fmt(r['published'])} | {what} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    result = run()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "published_runs_plans.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (RESULTS / "published_runs_plans.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


