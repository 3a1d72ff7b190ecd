"""batchpilot's memory and step-time models vs published, measured GPU training runs.

Example (CPU, a few seconds)::

    .venv/bin/python -m benchmarks.published_runs

Data: ``benchmarks/data/published_runs.json`` — runs published by torchtitan, NVIDIA NeMo / Megatron-Bridge,
llm-foundry, Narayanan et al. 2021 (Megatron-LM), MT-NLG, BLOOM, the Llama 3 paper, DeepSeek-V3, ms-swift,
Colossal-AI and torchtune, each row with its document, commit or date, the quoted table cell (``says``), the
layout as published, ``derived`` values (with formula) and ``assumed`` values (with the reason). The file's
header states the frozen fit / held-out split rule.

For every row :func:`row_to_inputs` — the ONE place that maps a row onto batchpilot's value types — builds the
model, the cluster, the run settings and the batch triad, pinned to the published layout, or says which
published setting batchpilot cannot express yet ("not expressible: <setting>"; such rows are reported, never
dropped). Then:

- memory: :func:`batchpilot.estimate.memory.analytic_memory` (default CUDA overhead model) against the
  published peak per GPU, converted to bytes from its stated unit. batchpilot's total is the allocator peak
  plus fragmentation, CUDA context and workspace, i.e. closest to what ``nvidia-smi`` shows; the published
  metric (reserved / allocated / active / unstated) is reported next to each error. Runs whose published
  peak is within 5% of the GPU's capacity (or that ran out of memory) are judged by fits / does not fit only.
- throughput: :class:`batchpilot.estimate.steptime.StepTimeModel` tokens/s per GPU against the published
  (or derived-from-published) tokens/s per GPU; where a source publishes only executed TFLOP/s per GPU
  (Narayanan et al., MT-NLG, BLOOM, Llama 3) against that.

The Megatron-LM check of ``benchmarks/steptime_vs_published.py`` is kept: the default efficiency curve
fitted on the Narayanan et al. 2021 Table 1 rows of this data set (built by :func:`row_to_inputs`) must equal
the shipped constants. Results: ``benchmarks/results/published_runs.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from batchpilot.errors import BatchpilotError
from batchpilot.estimate.calibration import DefaultCurve
from batchpilot.estimate.memory import analytic_memory
from batchpilot.estimate.steptime import StepTimeModel
from batchpilot.specs.batch import BatchTriad
from batchpilot.specs.hardware import AcceleratorSpec, ClusterSpec, load_accelerator
from batchpilot.specs.model import ModelSpec, from_hf_config, load_model, preset_path
from batchpilot.specs.settings import PRECISIONS, RECOMPUTES, RunSettings

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "published_runs.json"
RESULTS = HERE / "results"

#: Bytes per unit of a published memory figure.
UNIT_BYTES = {"GiB": 2**30, "GB": 10**9, "MiB": 2**20}

#: A published peak within this fraction of the GPU's capacity (or an OOM) is judged by fits / does not fit:
#: such runs filled the memory the allocator was allowed to take, so the peak says little about the need.
NEAR_CAPACITY_FRACTION = 0.05

#: Sources summarised on their own need at least this many compared rows.
MIN_ROWS_PER_SOURCE = 5

#: Published ``other_settings`` that block both predictions.
BLOCKERS = {"unpacked-variable-length", "inconsistent-as-published"}
#: Published ``other_settings`` that change memory in ways batchpilot cannot express yet.
MEMORY_BLOCKERS = {"chunked-cross-entropy", "optimizer-in-backward", "activation-offloading"}
#: Published ``other_settings`` that change the step time in ways batchpilot cannot express yet.
THROUGHPUT_BLOCKERS = {"dualpipe", "batch-size-ramp"}
#: Row activation-checkpointing policies -> batchpilot ``recompute`` values (when batchpilot has them).
RECOMPUTE_NAMES = {"none": "none", "full": "full", "selective-attention": "selective", "selective-op": "op",
                   "selective-layer": "every-n"}
#: Row ``framework`` prefixes -> batchpilot engines (whose mixed-precision bookkeeping the run follows).
ENGINES = (("torchtitan", "fsdp2"), ("composer", "fsdp2"), ("torchtune", "torch"), ("deepspeed", "deepspeed"),
           ("colossal-ai", "deepspeed"), ("megatron-deepspeed", "deepspeed"))


# ------------------------------------------------------------------------------------------- loading
def load_data(path: Path = DATA) -> dict[str, Any]:
    """The data file: a header object with ``rows`` (see its ``row_fields`` and ``split_rule``)."""
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def value(row: dict[str, Any], key: str) -> Any:
    """A row's value for ``key`` (``a.b`` reads a nested field): as published, else derived from published
    values, else assumed; None if none of them."""
    head, _, tail = key.partition(".")
    published = row.get(head)
    if tail and published is not None:
        published = published.get(tail)
    if published is not None:
        return published
    for block in ("derived", "assumed"):
        if key in row.get(block, {}):
            return row[block][key]["value"]
    return None


# ------------------------------------------------------------------------------------------- the mapping
@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Inputs:
    """What batchpilot needs for one published row, or why it cannot model it yet."""

    model: ModelSpec | None
    """The model (None: the shape cannot be expressed)."""
    settings: RunSettings | None
    """The run settings pinned to the published layout (None: they cannot be expressed)."""
    triad: BatchTriad | None
    """micro × accumulation × data-parallel ranks at the published sequence length."""
    accelerator: AcceleratorSpec | None
    """The catalog entry of the row's GPU (None: not in the catalog yet)."""
    cluster: ClusterSpec | None
    """Nodes, GPUs per node and inter-node bandwidth (None without an accelerator or a bandwidth)."""
    not_expressible_memory: tuple[str, ...] = ()
    """Published settings that block the memory prediction."""
    not_expressible_throughput: tuple[str, ...] = ()
    """Published settings that block the throughput prediction."""
    approximations: tuple[str, ...] = ()
    """Published settings batchpilot ignores or approximates (the prediction is still made)."""
    assumptions: tuple[str, ...] = ()
    """Row fields with an ``assumed`` value (the row's ``assumed`` block gives each reason)."""


def row_to_inputs(row: dict[str, Any]) -> Inputs:
    """Map one data row onto batchpilot's value types, pinned to its published layout.

    The one function to update when :class:`RunSettings` grows (per-op / every-N recomputation, context
    parallelism, compile, fp8 recipes): settings batchpilot has no field or value for are reported as
    "not expressible" for the quantity they change, or as approximations when they only tune kernels.
    """
    both: list[str] = []
    mem_only: list[str] = []
    time_only: list[str] = []
    approx: list[str] = []
    fields = {f.name for f in dataclasses.fields(RunSettings)}
    model = _model(row, both, approx)
    kwargs: dict[str, Any] = {"precision": row["precision"], "engine": _engine(row),
                              "tp": row["tp"], "pp": row["pp"], "ep": row["ep"], "sp": bool(value(row, "sp"))}
    if row["precision"] not in PRECISIONS:
        both.append(f"precision {row['precision']}")
    if row["fp8_recipe"] and row["precision"] == "fp8":
        approx.append(f"fp8 recipe '{row['fp8_recipe']}' modelled as generic fp8")
    if row["param_dtype"] == "bf16":
        mem_only.append("bf16 parameters and optimizer states (pure bf16 training)")
    kwargs["zero_stage"] = (value(row, "sharding") or {}).get("zero_stage") or 0
    policy = value(row, "activation_checkpointing.policy")
    recompute = RECOMPUTE_NAMES.get(policy) if policy else None
    if policy is None:
        both.append("activation checkpointing not stated")
    elif recompute in RECOMPUTES:
        kwargs["recompute"] = recompute
    else:
        both.append(f"activation checkpointing {policy} ({row['activation_checkpointing']['as_published']})")
    cp = row["cp"]
    if cp > 1 and "cp" not in fields:
        both.append(f"context parallelism (cp {cp})")
    elif cp > 1:
        kwargs["cp"] = cp
    vpp = value(row, "vpp")
    if row["pp"] > 1 and vpp is None:
        both.append(f"pipeline schedule '{row['pp_schedule']}' with unpublished virtual stages")
    kwargs["vpp"] = vpp or 1
    if row["compile"]:
        if "compile" in fields:
            kwargs["compile"] = True
        else:
            approx.append("torch.compile")
    for name in row["other_settings"]:
        if name == "adamw-8bit":
            kwargs["optimizer"] = "adamw-8bit"
        elif name in BLOCKERS:
            both.append(name)
        elif name in MEMORY_BLOCKERS:
            mem_only.append(name)
        elif name in THROUGHPUT_BLOCKERS:
            time_only.append(name)
        else:
            approx.append(name)
    settings = _settings(kwargs, both) if row["precision"] in PRECISIONS else None
    triad = _triad(row, both)
    accelerator, cluster = _cluster(row, time_only)
    return Inputs(model=model, settings=settings, triad=triad, accelerator=accelerator, cluster=cluster,
                  not_expressible_memory=tuple(both + mem_only), not_expressible_throughput=tuple(both + time_only),
                  approximations=tuple(approx), assumptions=tuple(sorted(row["assumed"])))


def _engine(row: dict[str, Any]) -> str:
    framework = row["framework"]
    return next((engine for prefix, engine in ENGINES if framework.startswith(prefix)), "megatron")


def _settings(kwargs: dict[str, Any], blockers: list[str]) -> RunSettings | None:
    try:
        return RunSettings(**kwargs)
    except (BatchpilotError, TypeError) as exc:
        blockers.append(f"settings refused: {exc}")
        return None


def _model(row: dict[str, Any], blockers: list[str], approx: list[str]) -> ModelSpec | None:
    """The preset (with ``model_overrides``) or a Hugging Face config built from ``model_shape``."""
    try:
        if row["model"]:
            if not row["model_overrides"]:
                return load_model(row["model"])
            config = {**json.loads(preset_path(row["model"]).read_text()), **row["model_overrides"]}
            return from_hf_config(config, name=f"{row['model']}+overrides")
        shaped = _hf_config(row["model_shape"], value(row, "model_shape.vocab_size"), value(row, "seq_len"), blockers,
                            approx)
        return None if shaped is None else from_hf_config(shaped, name=row["model_shape"]["name"])
    except BatchpilotError as exc:
        blockers.append(f"model refused: {exc}")
        return None


def _hf_config(shape: dict[str, Any], vocab: int | None, seq_len: int, blockers: list[str],
               approx: list[str]) -> dict[str, Any] | None:
    """A ``config.json`` of the batchpilot family closest to ``shape`` (approximations listed)."""
    if not shape:
        blockers.append("model shape not published")
        return None
    kind = shape["hf_model_type"]
    if shape["mlp"] in ("gelu", "squared-relu"):
        if shape["num_kv_heads"] != shape["num_heads"]:
            blockers.append(f"{shape['mlp']} (non-gated) MLP with grouped-query attention: no batchpilot family")
            return None
        if kind != "gpt" or shape["mlp"] != "gelu":
            approx.append(f"{shape['name']} modelled as a GPT-2 block (GELU MLP, LayerNorm, learned positions)")
        return {"model_type": "gpt2", "n_layer": shape["num_layers"], "n_embd": shape["hidden_size"],
                "n_head": shape["num_heads"], "n_inner": shape["ffn_hidden_size"], "vocab_size": vocab,
                "n_positions": shape.get("max_position_embeddings") or seq_len,
                "tie_word_embeddings": shape["tied_embeddings"]}
    common = {"num_hidden_layers": shape["num_layers"], "hidden_size": shape["hidden_size"],
              "num_attention_heads": shape["num_heads"], "num_key_value_heads": shape["num_kv_heads"],
              "vocab_size": vocab, "max_position_embeddings": max(seq_len, 4096),
              "tie_word_embeddings": shape["tied_embeddings"]}
    if shape.get("head_dim"):
        common["head_dim"] = shape["head_dim"]
    if kind == "qwen3_moe":
        approx.append("Qwen3-MoE modelled as a Mixtral block (no query/key RMSNorm)")
        return {**common, "model_type": "mixtral", "intermediate_size": shape["moe_ffn_hidden_size"],
                "num_local_experts": shape["num_experts"], "num_experts_per_tok": shape["experts_per_token"]}
    return {**common, "model_type": "qwen2" if kind == "qwen2" else "llama", "intermediate_size": shape["ffn_hidden_size"]}


def _triad(row: dict[str, Any], blockers: list[str]) -> BatchTriad | None:
    """micro × accum × dp from the published values (accumulation derived from the global batch if needed)."""
    micro, seq_len = value(row, "micro_batch"), value(row, "seq_len")
    dp = value(row, "dp") or row["num_gpus"] // (row["tp"] * row["pp"] * row["cp"])
    accum = value(row, "grad_accum")
    glob = value(row, "global_batch_sequences")
    if glob is None and value(row, "global_batch_tokens"):
        glob = value(row, "global_batch_tokens") // seq_len
    if micro is None or (accum is None and glob is None):
        blockers.append("micro-batch or accumulation not published")
        return None
    try:
        if accum is None:
            return BatchTriad.from_global(global_batch_sequences=glob, micro_batch_sequences=micro,
                                          data_parallel_ranks=dp, seq_len_tokens=seq_len)
        return BatchTriad(micro_batch_sequences=micro, grad_accum_steps=accum, data_parallel_ranks=dp,
                          seq_len_tokens=seq_len)
    except BatchpilotError as exc:
        blockers.append(f"batch refused: {exc}")
        return None


def _cluster(row: dict[str, Any], blockers: list[str]) -> tuple[AcceleratorSpec | None, ClusterSpec | None]:
    try:
        accelerator = load_accelerator(row["gpu"])
    except BatchpilotError:
        blockers.append(f"accelerator {row['gpu']} not in the catalog")
        return None, None
    per_node = min(row["gpus_per_node"], row["num_gpus"])
    nodes = math.ceil(row["num_gpus"] / per_node)
    gbit = value(row, "inter_node_gbit_per_s_per_gpu")
    if nodes > 1 and gbit is None:
        blockers.append("inter-node bandwidth not published")
        return accelerator, None
    bandwidth = gbit * 1e9 / 8 if nodes > 1 else None
    return accelerator, ClusterSpec(accelerator=accelerator, devices_per_node=per_node, num_nodes=nodes,
                                    inter_node_bandwidth_bytes_per_s=bandwidth)


# ------------------------------------------------------------------------------------------- predictions
def published_memory_bytes(row: dict[str, Any]) -> float | None:
    """The published peak per GPU in bytes (from its stated unit), or None."""
    peak = row["measured"]["peak_memory"]
    return None if peak is None else peak["value"] * UNIT_BYTES[peak["unit"]]


def published_throughput(row: dict[str, Any]) -> tuple[str, float] | None:
    """("tokens_per_s_per_gpu" | "tflops_per_gpu", value): measured, else derived from measured values."""
    measured = row["measured"]
    for key in ("tokens_per_s_per_gpu", "tflops_per_gpu"):
        if measured[key] is not None:
            return key, float(measured[key])
        if key in row["derived"]:
            return key, float(row["derived"][key]["value"])
    return None


def _memory(row: dict[str, Any], inputs: Inputs) -> dict[str, Any] | None:
    published = published_memory_bytes(row)
    oom = row["measured"]["oom"]
    if published is None and not oom:
        return None
    peak = row["measured"]["peak_memory"]
    out: dict[str, Any] = {"published_bytes": published, "metric": peak["metric"] if peak else None, "oom": oom,
                           "not_expressible": list(inputs.not_expressible_memory)}
    capacity = inputs.accelerator.memory_bytes if inputs.accelerator else None
    if capacity is None and peak and peak.get("at_capacity"):
        capacity = peak["value"] * 2**30  # a card's nominal "80GB" is 80 GiB (the catalog's convention)
    out["capacity_bytes"] = capacity
    out["near_capacity"] = bool(oom or (peak and peak.get("at_capacity")) or (
        capacity is not None and published is not None and published >= (1 - NEAR_CAPACITY_FRACTION) * capacity))
    if inputs.not_expressible_memory or not (inputs.model and inputs.settings and inputs.triad):
        return out
    triad, per_node = inputs.triad, min(row["gpus_per_node"], row["num_gpus"])
    try:
        predicted = analytic_memory(inputs.model, inputs.settings, micro_batch=triad.micro_batch_sequences,
                                    seq_len=triad.seq_len_tokens, dp=triad.data_parallel_ranks,
                                    grad_accum=triad.grad_accum_steps, gpus_per_node=per_node).total_bytes
    except BatchpilotError as exc:
        out["not_expressible"].append(f"memory estimate refused: {exc}")
        return out
    out["predicted_bytes"] = predicted
    if out["near_capacity"]:
        out["fits_published"] = not oom
        out["fits_predicted"] = None if capacity is None else predicted <= capacity
    elif published:
        out["error"] = predicted / published - 1
    return out


def _throughput(row: dict[str, Any], inputs: Inputs) -> dict[str, Any] | None:
    published = published_throughput(row)
    if published is None:
        return None
    metric, pub = published
    out: dict[str, Any] = {"metric": metric, "published": pub, "not_expressible": list(inputs.not_expressible_throughput)}
    if inputs.not_expressible_throughput or not (inputs.model and inputs.settings and inputs.triad and inputs.cluster):
        if not out["not_expressible"]:
            out["not_expressible"].append("inputs incomplete")
        return out
    try:
        model = StepTimeModel(inputs.model, inputs.cluster, seq_len=inputs.triad.seq_len_tokens)
        step = model.estimate(inputs.settings, inputs.triad)
    except BatchpilotError as exc:
        out["not_expressible"].append(f"step-time estimate refused: {exc}")
        return out
    world = inputs.triad.data_parallel_ranks * inputs.settings.tp * inputs.settings.pp * row["cp"]
    predicted = step.tokens_per_s / world if metric == "tokens_per_s_per_gpu" else step.tflops_per_gpu
    out.update(predicted=predicted, error=predicted / pub - 1, mfu_predicted=step.mfu,
               bubble_share=step.bubble_s / step.step_time_s)
    return out


def evaluate(row: dict[str, Any]) -> dict[str, Any]:
    """One row's predictions, errors and reasons."""
    inputs = row_to_inputs(row)
    return {"id": row["id"], "source": row["source"], "split": row["split"], "gpu": row["gpu"],
            "precision": row["precision"], "memory": _memory(row, inputs), "throughput": _throughput(row, inputs),
            "approximations": list(inputs.approximations), "assumed": list(inputs.assumptions)}


# ------------------------------------------------------------------------------------------- summaries
def _stats(errors: list[tuple[str, float]]) -> dict[str, Any]:
    if not errors:
        return {"rows": 0}
    worst = max(errors, key=lambda e: abs(e[1]))
    return {"rows": len(errors), "median_abs_error": statistics.median(abs(e) for _, e in errors),
            "mean_error": statistics.fmean(e for _, e in errors), "worst_id": worst[0], "worst_error": worst[1]}


def _errors(results: list[dict[str, Any]], quantity: str) -> list[tuple[str, float]]:
    return [(r["id"], r[quantity]["error"]) for r in results if r[quantity] and "error" in r[quantity]]


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Error statistics: all, per split, bf16 vs fp8, per source (≥ 5 compared rows), plus counts."""
    precision_class = {"bf16": "16-bit (bf16, fp16)", "fp16": "16-bit (bf16, fp16)"}
    out: dict[str, Any] = {}
    for quantity in ("memory", "throughput"):
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in results:
            groups["all"].append(r)
            groups[f"split {r['split']}"].append(r)
            groups[f"precision {precision_class.get(r['precision'], 'fp8 (fp8, mxfp8, nvfp4)')}"].append(r)
            groups[f"source {r['source']}"].append(r)
        table = {name: _stats(_errors(rs, quantity)) for name, rs in sorted(groups.items())}
        out[quantity] = {k: v for k, v in table.items()
                         if not k.startswith("source ") or v["rows"] >= MIN_ROWS_PER_SOURCE}
    judged = [r for r in results if r["memory"] and r["memory"].get("fits_predicted") is not None]
    out["memory_near_capacity"] = {
        "rows": len(judged), "agree": sum(r["memory"]["fits_predicted"] == r["memory"]["fits_published"] for r in judged),
        "ids": [r["id"] for r in judged]}
    out["counts"] = _counts(results)
    return out


def _counts(results: list[dict[str, Any]]) -> dict[str, Any]:
    reasons: dict[str, int] = defaultdict(int)
    for r in results:
        for quantity in ("memory", "throughput"):
            for reason in (r[quantity] or {}).get("not_expressible", []):
                reasons[f"{quantity}: {reason.split(' (')[0]}"] += 1
    return {"rows": len(results),
            "memory_published": sum(r["memory"] is not None for r in results),
            "memory_compared": len(_errors(results, "memory")),
            "throughput_published": sum(r["throughput"] is not None for r in results),
            "throughput_compared": len(_errors(results, "throughput")),
            "not_expressible_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1]))}


# ------------------------------------------------------------------------------------------- Megatron check
def megatron_fit_check(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Refit the default efficiency curve on the Narayanan et al. 2021 Table 1 rows (``steptime_vs_published``'s
    grid search); it must reproduce the shipped constants."""
    from benchmarks.steptime_vs_published import Run, fit

    runs = []
    for row in rows:
        if row["source"] != "megatron-lm-paper":
            continue
        inputs = row_to_inputs(row)
        assert inputs.model and inputs.cluster and inputs.settings and inputs.triad, row["id"]
        runs.append(Run(source=row["source"], label=row["id"], model=inputs.model, cluster=inputs.cluster,
                        settings=inputs.settings, triad=inputs.triad,
                        published_tflops=row["measured"]["tflops_per_gpu"]))
    curve, shipped = fit(runs), DefaultCurve()
    return {"runs": len(runs), "fitted": dataclasses.asdict(curve), "shipped": dataclasses.asdict(shipped),
            "reproduced": curve == shipped}


# ------------------------------------------------------------------------------------------- output
def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:+.0%}"


def _gib(x: float | None) -> str:
    return "—" if x is None else f"{x / 2**30:.1f}"


def _summary_lines(summary: dict[str, Any]) -> list[str]:
    lines = []
    for quantity in ("memory", "throughput"):
        lines += ["", f"### {quantity}", "", "| set | rows | median abs error | mean error | worst |", "|---|---:|---:|---:|---|"]
        for name, s in summary[quantity].items():
            if s["rows"]:
                lines.append(f"| {name} | {s['rows']} | {s['median_abs_error']:.0%} | {s['mean_error']:+.0%} | "
                             f"{s['worst_id']} ({s['worst_error']:+.0%}) |")
    near = summary["memory_near_capacity"]
    lines += ["", f"Near capacity (judged by fits / does not fit): {near['agree']} of {near['rows']} agree "
              f"({', '.join(near['ids']) or 'none'})."]
    counts = summary["counts"]
    lines += ["", f"Rows: {counts['rows']}; memory published {counts['memory_published']}, compared "
              f"{counts['memory_compared']}; throughput published {counts['throughput_published']}, compared "
              f"{counts['throughput_compared']}.", "", "| not expressible (quantity: setting) | rows |", "|---|---:|"]
    lines += [f"| {reason} | {n} |" for reason, n in counts["not_expressible_reasons"].items()]
    return lines


def _row_lines(results: list[dict[str, Any]]) -> list[str]:
    lines = ["", "## Rows", "", "| id | split | memory GiB pub / pred | metric | error | throughput pub / pred | error | "
             "not expressible |", "|---|---|---|---|---:|---|---:|---|"]
    for r in results:
        m, t = r["memory"] or {}, r["throughput"] or {}
        fits = f" fits {m['fits_predicted']} vs {m['fits_published']}" if "fits_predicted" in m else ""
        unit = "tok/s" if t.get("metric") == "tokens_per_s_per_gpu" else "TFLOP/s"
        thr = f"{t['published']:,.0f} / {t.get('predicted', 0):,.0f} {unit}" if t else "—"
        why = sorted(set(m.get("not_expressible", []) + t.get("not_expressible", [])))
        lines.append(f"| {r['id']} | {r['split']} | {_gib(m.get('published_bytes'))} / {_gib(m.get('predicted_bytes'))}{fits} | "
                     f"{m.get('metric') or '—'} | {_pct(m.get('error'))} | {thr} | {_pct(t.get('error'))} | "
                     f"{'; '.join(why) or '—'} |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    check = result["megatron_fit_check"]
    lines = ["# batchpilot vs published GPU training runs", "",
             "Generated by `python -m benchmarks.published_runs` from `benchmarks/data/published_runs.json` "
             "(sources, quotes, derived and assumed values: the data file; method: the module docstring). Error = "
             "predicted / published − 1. Memory: batchpilot's total (allocator peak + fragmentation + CUDA context) "
             "against the published peak in its own metric (column 'metric'). Throughput: tokens/s per GPU, or "
             "executed TFLOP/s per GPU where only that is published.", "",
             f"Split rule: {result['split_rule']}", "",
             f"Megatron-LM check: refitting the efficiency curve on the {check['runs']} Narayanan et al. 2021 rows gives "
             f"{check['fitted']}; shipped {check['shipped']}: {'reproduced' if check['reproduced'] else 'NOT reproduced'}.",
             "", "## Summary"]
    lines += _summary_lines(result["summary"])
    lines += _row_lines(result["rows"])
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Predicted vs published, log-log: memory (GiB) and tokens/s per GPU, coloured by split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    panels = (("memory", "published_bytes", "predicted_bytes", 2**30, "peak memory per GPU (GiB)"),
              ("throughput", "published", "predicted", 1.0, "tokens/s per GPU"))
    for ax, (quantity, pub_key, pred_key, scale, label) in zip(axes, panels, strict=True):
        points = [(r[quantity][pub_key] / scale, r[quantity][pred_key] / scale, r["split"]) for r in results
                  if r[quantity] and "error" in r[quantity]
                  and (quantity == "memory" or r[quantity]["metric"] == "tokens_per_s_per_gpu")]
        for split, colour in (("fit", "tab:blue"), ("heldout", "tab:orange")):
            xs = [p[0] for p in points if p[2] == split]
            ax.scatter(xs, [p[1] for p in points if p[2] == split], s=14, c=colour, label=f"{split} ({len(xs)})")
        if points:
            lo = min(min(p[0], p[1]) for p in points) / 1.5
            hi = max(max(p[0], p[1]) for p in points) * 1.5
            ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
            ax.plot([lo, hi], [lo * 1.25, hi * 1.25], "k:", lw=0.6)
            ax.plot([lo, hi], [lo / 1.25, hi / 1.25], "k:", lw=0.6)
        ax.set(xscale="log", yscale="log", xlabel=f"published {label}", ylabel=f"batchpilot {label}")
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle("batchpilot vs published runs (dotted: ±25%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(data_path: Path = DATA) -> dict[str, Any]:
    """Evaluate every row; the result record written to ``results/published_runs.json``."""
    data = load_data(data_path)
    results = [evaluate(row) for row in data["rows"]]
    return {"data": str(data_path.relative_to(HERE.parent)) if data_path.is_relative_to(HERE.parent) else str(data_path),
            "split_rule": data["split_rule"], "summary": summarize(results),
            "megatron_fit_check": megatron_fit_check(data["rows"]), "rows": results, "platform": platform.platform()}


def main() -> int:
    result = run()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "published_runs.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (RESULTS / "published_runs.md").write_text(text)
    plot(result["rows"], RESULTS / "published_runs.png")
    print("\n".join(text.splitlines()[:60]))
    if not result["megatron_fit_check"]["reproduced"]:
        print("error: the efficiency curve refitted on Narayanan et al. 2021 Table 1 differs from the shipped default")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
