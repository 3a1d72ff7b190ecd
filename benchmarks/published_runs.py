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

- memory: :func:`batchpilot.estimate.memory.analytic_memory` (default CUDA overhead model; the fused optimizer
  where the framework uses it, :func:`row_overhead`) against the published peak per GPU, converted to bytes from
  its stated unit and compared in the published metric (:data:`METRIC_DETAIL`: ``reserved`` with the caching
  allocator's reserved peak, ``allocated``/``active`` with its allocated peak, anything else with the whole GPU:
  reserved + CUDA context + NCCL). Every run that ran must fit its GPU (``memory_false_does_not_fit``). Runs whose
  published peak is within 5% of the GPU's capacity (or that ran out of memory) are judged by fits / does not
  fit only. The torchtitan version a run used decides FSDP2's reshard default and whether ``compile`` compiled
  the loss (:data:`TORCHTITAN_VERSIONS`). ``benchmarks/published_plans.py`` plans the same runs.
- throughput: :class:`batchpilot.estimate.steptime.StepTimeModel` (the per-op model) tokens/s per GPU against the
  published (or derived-from-published) tokens/s per GPU; where a source publishes only executed TFLOP/s per GPU
  (Narayanan et al., BLOOM, Llama 3) against that. Each row's kernels follow its engine's defaults, corrected where
  the source says otherwise (:func:`row_implementation`: FlashAttention 1 in llm-foundry's tables, materialised
  scores before FlashAttention, Megatron's fused kernels, async TP). Reported: tokens/s, MFU and step time per
  source and split, bf16 and fp8 apart (:func:`throughput_summary`); the predicted order of alternatives a source
  measured side by side (:func:`ranking_checks`); DeepSeek-V3 on 2048 H800 with its stated assumptions
  (:func:`deepseek_v3_check`).

The step-time model's two fitted constants (:mod:`batchpilot.estimate.fitted`) are refitted here on the FIT split
only (:func:`fit_constants`); the run fails when they differ from the shipped ones. Results:
``benchmarks/results/published_runs.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import platform
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from batchpilot.errors import BatchpilotError
from batchpilot.estimate.fitted import FITTED, FittedConstants
from batchpilot.estimate.kernels import KernelProfile, profile_for
from batchpilot.estimate.layer_time import Implementation
from batchpilot.estimate.memory import analytic_memory
from batchpilot.estimate.overhead import OverheadModel
from batchpilot.estimate.steptime import StepTime, StepTimeModel, default_implementation
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

#: The published memory metric -> the analytic estimate's matching figure (``MemoryBreakdown.details``):
#: ``reserved`` = ``torch.cuda.max_memory_reserved`` (torchtitan's log), ``allocated``/``active`` = the caching
#: allocator's allocated/active peak; any other metric (``unstated``, nvidia-smi) = the total with the CUDA context
#: and NCCL buffers.
METRIC_DETAIL = {"reserved": "reserved_bytes", "allocated": "allocated_bytes", "active": "allocated_bytes"}

#: Sources summarised on their own need at least this many compared rows.
MIN_ROWS_PER_SOURCE = 5

#: Published ``other_settings`` that block both predictions.
BLOCKERS = {"unpacked-variable-length", "inconsistent-as-published"}
#: Published ``other_settings`` that change memory in ways batchpilot cannot express yet.
MEMORY_BLOCKERS = {"optimizer-in-backward", "activation-offloading"}
#: Published ``other_settings`` that change the step time in ways batchpilot cannot express yet.
THROUGHPUT_BLOCKERS = {"dualpipe", "batch-size-ramp"}
#: Row activation-checkpointing policies -> batchpilot ``recompute`` values (when batchpilot has them).
RECOMPUTE_NAMES = {"none": "none", "full": "full", "selective-attention": "selective", "selective-op": "op",
                   "selective-layer": "full"}
#: torchtitan's memory behaviour by the document a row comes from (the torchtitan commit its runs used):
#: ``reshard_after_forward`` — before ``83e69410`` (2025-07-28) torchtitan's default kept the last block and the
#: root unit (embedding, final norm, output) unsharded (``apply_fsdp`` in ``parallelize_llama.py`` @ ``9dec370a``
#: and ``e7c0cae9``), batchpilot's ``last``; since then only ``[norm, output]`` (``default``, @ ``6fc499f6``);
#: ``loss`` — before ``bbb1b616`` (2025-04) ``training.compile`` did not compile the loss ("TODO: compiling loss
#: function causes CUDA errors", ``train.py`` @ ``9dec370a``), later it does (``components/loss.py`` @ ``e7c0cae9``).
TORCHTITAN_VERSIONS: dict[str, dict[str, str]] = {
    "torchtitan-llama3-h100-202412": {"reshard_after_forward": "last", "loss": "uncompiled"},
    "torchtitan-asynctp-h100-202506": {"reshard_after_forward": "last"},
    "torchtitan-llama3-8b-h200-202506-trainy": {"reshard_after_forward": "last"},
    "torchtitan-performance-202404": {"reshard_after_forward": "last", "loss": "uncompiled"},
    "torchtitan-performance-202408": {"reshard_after_forward": "last", "loss": "uncompiled"},
}
#: Published ``other_settings`` -> batchpilot ``loss`` (torchtune's ``CEWithChunkedOutputLoss``; Megatron's
#: ``--cross-entropy-loss-fusion`` keeps its vocab-parallel loss's memory).
LOSS_SETTINGS = {"chunked-cross-entropy": "chunked", "cross-entropy-loss-fusion": "fused"}
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
    precision, recipe = _precision(row)
    kwargs: dict[str, Any] = {"precision": precision, "engine": _engine(row),
                              "tp": row["tp"], "pp": row["pp"], "ep": row["ep"], "sp": bool(value(row, "sp"))}
    if precision not in PRECISIONS:
        both.append(f"precision {row['precision']}")
    elif recipe and "fp8_recipe" in fields:
        kwargs["fp8_recipe"] = recipe
        text = (row["fp8_recipe"] or "").lower()
        if "all-gather" in text or "all_gather" in text:
            kwargs["fp8_all_gather"] = kwargs["engine"] == "fsdp2" and recipe == "tensorwise"
    elif row["fp8_recipe"] and precision == "fp8":
        approx.append(f"fp8 recipe '{row['fp8_recipe']}' modelled as generic fp8")
    if row["param_dtype"] == "bf16":
        kwargs["param_dtype"] = "bf16"
    kwargs["zero_stage"] = (value(row, "sharding") or {}).get("zero_stage") or 0
    kwargs.update(_memory_settings(row, kwargs, approx))
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
        elif name in LOSS_SETTINGS:
            kwargs["loss"] = LOSS_SETTINGS[name]
        elif name in BLOCKERS:
            both.append(name)
        elif name in MEMORY_BLOCKERS:
            mem_only.append(name)
        elif name in THROUGHPUT_BLOCKERS:
            time_only.append(name)
        else:
            approx.append(name)
    settings = _settings(kwargs, both) if precision in PRECISIONS else None
    triad = _triad(row, both)
    accelerator, cluster = _cluster(row, time_only)
    return Inputs(model=model, settings=settings, triad=triad, accelerator=accelerator, cluster=cluster,
                  not_expressible_memory=tuple(both + mem_only), not_expressible_throughput=tuple(both + time_only),
                  approximations=tuple(approx), assumptions=tuple(sorted(row["assumed"])))


#: Words of a row's ``fp8_recipe`` text -> batchpilot fp8 recipes (first match wins; Transformer Engine's current
#: scaling is per-tensor dynamic scaling, batchpilot's ``tensorwise``; Composer's ``amp_fp8`` ran Transformer
#: Engine's default ``DelayedScaling`` recipe).
FP8_RECIPE_WORDS = (("mxfp8", "mxfp8"), ("mx block", "mxfp8"), ("blockwise", "blockwise"), ("rowwise", "rowwise"),
                    ("tensorwise", "tensorwise"), ("current scaling", "tensorwise"), ("amp_fp8", "delayed"),
                    ("delayed", "delayed"))


def _precision(row: dict[str, Any]) -> tuple[str, str | None]:
    """(batchpilot precision, fp8 recipe): MXFP8 is fp8 matmuls with the ``mxfp8`` recipe."""
    text = (row["fp8_recipe"] or "").lower()
    if row["precision"] == "mxfp8":
        return "fp8", "mxfp8"
    if row["precision"] != "fp8":
        return row["precision"], None
    return "fp8", next((recipe for word, recipe in FP8_RECIPE_WORDS if word in text), None)


def _memory_settings(row: dict[str, Any], kwargs: dict[str, Any], approx: list[str]) -> dict[str, Any]:
    """Settings that change memory only: every-N checkpointing, FSDP2's reshard policy and the loss path of the
    torchtitan version a row ran (:data:`TORCHTITAN_VERSIONS`), Megatron's block recomputation."""
    out: dict[str, Any] = {}
    ac = row["activation_checkpointing"] or {}
    if ac.get("policy") == "selective-layer" and ac.get("every_n_layers"):
        out["recompute_every"] = ac["every_n_layers"]  # torchtitan's integer option: full AC on every N-th block
    if ac.get("recompute_method") == "block" and ac.get("recompute_num_layers"):
        stage_layers = math.ceil(row_layers(row) / row["pp"])
        out["recompute_every"] = max(1, round(stage_layers / ac["recompute_num_layers"]))
        approx.append(f"Megatron block recomputation of the first {ac['recompute_num_layers']} layers per stage "
                      f"modelled as 1 layer in {out['recompute_every']}")
    version = TORCHTITAN_VERSIONS.get(row["document"], {}) if row["framework"].startswith("torchtitan") else {}
    sharding = value(row, "sharding") or {}
    if kwargs["engine"] == "fsdp2" and kwargs["zero_stage"] == 3:
        if sharding.get("reshard_after_forward") is False:
            out["reshard_after_forward"] = "never"
        elif "reshard_after_forward" in version:
            out["reshard_after_forward"] = version["reshard_after_forward"]
    if version.get("loss") == "uncompiled" and row["compile"]:
        out["loss"] = "parallel" if row["tp"] > 1 else "eager"
    if row["framework"].startswith("torchtune") and row["compile"]:
        # ``training.compile_loss(self._loss_fn)`` discards its result, which compiles only a chunked loss in
        # place (``recipes/full_finetune_single_device.py``, ``torchtune/training/_compile.py`` @ ``1814feb1``)
        out["loss"] = "eager"
    return out


def row_layers(row: dict[str, Any]) -> int:
    """Transformer layers of a row's model (preset or published shape)."""
    if row["model"]:
        return load_model(row["model"]).num_layers
    return int(row["model_shape"]["num_layers"])


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


#: Frameworks whose optimizer is the fused kernel (``torch.optim.AdamW(fused=True)``): torchtune's configs
#: (``recipes/configs/llama3_2/3B_full.yaml`` @ ``1814feb1``: ``fused: True``).
FUSED_OPTIMIZER_FRAMEWORKS = ("torchtune",)


def row_overhead(row: dict[str, Any]) -> OverheadModel:
    """The CUDA overhead model of a row: the default, with the fused optimizer where the framework uses it."""
    return OverheadModel(optimizer_fused=row["framework"].startswith(FUSED_OPTIMIZER_FRAMEWORKS))


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
        memory = analytic_memory(inputs.model, inputs.settings, micro_batch=triad.micro_batch_sequences,
                                 seq_len=triad.seq_len_tokens, dp=triad.data_parallel_ranks,
                                 grad_accum=triad.grad_accum_steps, gpus_per_node=per_node,
                                 overhead=row_overhead(row))
    except BatchpilotError as exc:
        out["not_expressible"].append(f"memory estimate refused: {exc}")
        return out
    predicted = memory.details[METRIC_DETAIL.get(out["metric"], "total")] if out["metric"] in METRIC_DETAIL \
        else memory.total_bytes
    out.update(predicted_bytes=predicted, predicted_total_bytes=memory.total_bytes,
               predicted_allocated_bytes=memory.details["allocated_bytes"],
               predicted_reserved_bytes=memory.details["reserved_bytes"])
    if capacity is not None:
        out["fits_predicted"] = memory.total_bytes <= capacity  # reserved + CUDA context + NCCL must fit
    if out["near_capacity"]:
        out["fits_published"] = not oom
    elif published:
        out["error"] = predicted / published - 1
    return out


#: Attention kernels of sources whose runs did not use the engine's default (:func:`default_implementation`):
#: llm-foundry's ``gpu`` extra pinned ``flash-attn==1.0.9`` (FlashAttention 1) at the commits that published its
#: tables (``setup.py`` at b2a43a1 and 5e85bd6; the MPT yamls set ``attn_impl: flash``); Megatron-LM (2021),
#: MT-NLG (2021) and BLOOM (2022, Megatron-DeepSpeed) predate FlashAttention (Dao et al., May 2022) and
#: materialise the scores with Megatron's fused scale-mask-softmax.
ATTENTION_BY_SOURCE = {"llm-foundry": "fa1", "megatron-lm-paper": "eager", "mt-nlg": "eager", "bloom": "eager"}
#: Framework prefixes that run Megatron's fused kernels (fused norms, bias-GeLU, softmax) whatever the engine
#: batchpilot models their bookkeeping with.
FUSED_FRAMEWORKS = ("megatron", "deepspeed + megatron", "meta internal")
#: Megatron-Bridge's MoE performance recipes (``src/megatron/bridge/perf_recipes/{qwen,deepseek}/<gpu>/*.py`` at
#: 067f987, the commit of its performance summary): the ``flex`` dispatcher (HybridEP / DeepEP, one copy per
#: destination node) everywhere except Qwen3-235B-A22B on H100 and B200 (``moe_token_dispatcher_type =
#: "alltoall"``); ``overlap_moe_expert_parallel_comm`` for Qwen3-235B-A22B on H100 and DeepSeek-V3 in MXFP8.
MOE_ALLTOALL = (("Qwen3-235B-A22B", "h100-sxm"), ("Qwen3-235B-A22B", "b200"))
MOE_OVERLAP = (("Qwen3-235B-A22B", "h100-sxm", None), ("deepseek-v3", None, "mxfp8"))


def row_implementation(row: dict[str, Any], settings: RunSettings, profile: KernelProfile) -> Implementation:
    """How a row's kernels were implemented: the settings' default, with the source's attention kernel
    (:data:`ATTENTION_BY_SOURCE`), Megatron's fused kernels for Megatron-based frameworks, torchtitan's async
    tensor parallelism (``async-tp``: TP collectives overlapped with the GEMMs) and Megatron-Bridge's MoE
    dispatcher and all-to-all overlap (:data:`MOE_ALLTOALL`, :data:`MOE_OVERLAP`)."""
    base = default_implementation(settings, profile)
    fused = base.fused or row["framework"].startswith(FUSED_FRAMEWORKS)
    model = str(row["model"] or (row["model_shape"] or {}).get("name", ""))
    bridge_moe = row["source"] == "nvidia-megatron" and row["ep"] > 1
    dedup = bridge_moe and (model, row["gpu"]) not in MOE_ALLTOALL
    overlap = bridge_moe and any(model == m and row["gpu"] == (g or row["gpu"]) and row["precision"] == (p or row["precision"])
                                 for m, g, p in MOE_OVERLAP)
    return dataclasses.replace(base, attention_kernel=ATTENTION_BY_SOURCE.get(row["source"], base.attention_kernel),
                               fused=fused, fused_loss=base.fused_loss or fused,
                               tp_comm_overlap="async-tp" in row["other_settings"], deduplicated_dispatch=dedup,
                               ep_comm_overlap=overlap)


def _throughput(row: dict[str, Any], inputs: Inputs, fitted: FittedConstants = FITTED) -> dict[str, Any] | None:
    """Predicted tokens/s per GPU (or executed TFLOP/s per GPU), MFU and step time against the published ones."""
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
        step, world, bf16_peak = _step(row, inputs, fitted)
    except BatchpilotError as exc:
        out["not_expressible"].append(f"step-time estimate refused: {exc}")
        return out
    per_gpu = step.tokens_per_s / world
    predicted = per_gpu if metric == "tokens_per_s_per_gpu" else step.tflops_per_gpu
    published_step = step.step_time_s * predicted / pub  # the same global batch at the published rate
    model_flops_per_token = step.model_flops_per_step / inputs.triad.global_batch_tokens
    out.update(predicted=predicted, error=predicted / pub - 1, step_time_predicted_s=step.step_time_s,
               step_time_published_s=published_step, step_time_error=step.step_time_s / published_step - 1,
               mfu_predicted=per_gpu * model_flops_per_token / bf16_peak,
               mfu_published=per_gpu * model_flops_per_token / bf16_peak * pub / predicted,
               bubble_share=step.bubble_s / step.step_time_s, kernel_profile=step.kernel_profile,
               attention_kernel=step.attention_kernel,
               compute_share={k: v / step.step_time_s for k, v in step.compute_by_op_s.items() if v},
               exposed_share={k: v / step.step_time_s for k, v in step.exposed_comm_s.items() if v})
    return out


def _step(row: dict[str, Any], inputs: Inputs, fitted: FittedConstants) -> tuple[StepTime, int, float]:
    """The step estimate of a complete row, its GPU count and the GPU's dense bf16 peak (the MFU denominator)."""
    assert inputs.model and inputs.settings and inputs.triad and inputs.cluster
    profile = profile_for(inputs.cluster.accelerator)
    implementation = row_implementation(row, inputs.settings, profile)
    model = StepTimeModel(inputs.model, inputs.cluster, seq_len=inputs.triad.seq_len_tokens,
                          implementation=implementation, profile=profile, fitted=fitted)
    step = model.estimate(inputs.settings, inputs.triad)
    world = inputs.triad.data_parallel_ranks * inputs.settings.tp * inputs.settings.pp * row["cp"]
    return step, world, inputs.cluster.accelerator.peak_flops_per_s("bf16")


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
            groups[f"source {r['source']} · split {r['split']}"].append(r)
        table = {name: _stats(_errors(rs, quantity)) for name, rs in sorted(groups.items())}
        out[quantity] = {k: v for k, v in table.items()
                         if not k.startswith("source ") or v["rows"] >= MIN_ROWS_PER_SOURCE
                         or (" · split " in k and table[k.split(" · ")[0]]["rows"] >= MIN_ROWS_PER_SOURCE and v["rows"])}
    judged = [r for r in results if r["memory"] and "fits_published" in r["memory"]
              and r["memory"].get("fits_predicted") is not None]
    out["memory_near_capacity"] = {
        "rows": len(judged), "agree": sum(r["memory"]["fits_predicted"] == r["memory"]["fits_published"] for r in judged),
        "ids": [r["id"] for r in judged]}
    ran = [r for r in results if r["memory"] and not r["memory"]["oom"] and r["memory"].get("fits_predicted") is not None]
    out["memory_false_does_not_fit"] = {"rows": len(ran),
                                        "ids": [r["id"] for r in ran if not r["memory"]["fits_predicted"]]}
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


# ------------------------------------------------------------------------------------------- tokens/s part
#: Grids of the fit of :mod:`batchpilot.estimate.fitted` (coarse, then fine around the coarse optimum); the
#: optimum must lie inside them.
SUSTAINED_GRID = (0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95, 1.00)
INTERFERENCE_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
FINE_SUSTAINED_STEP, FINE_INTERFERENCE_STEP = 0.01, 0.05

#: The sources whose executed TFLOP/s per GPU (Narayanan et al. 2021, MT-NLG, BLOOM) or tokens/s (Llama 3 405B)
#: the step-time model was first checked on (``benchmarks/steptime_vs_published.py``): listed on their own.
TFLOPS_SOURCES = ("megatron-lm-paper", "mt-nlg", "bloom", "llama3-paper")


def fit_rows(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], Inputs]]:
    """The FIT-split rows with a published throughput that batchpilot can express."""
    out = []
    for row in rows:
        if row["split"] != "fit" or published_throughput(row) is None:
            continue
        inputs = row_to_inputs(row)
        if not inputs.not_expressible_throughput and inputs.model and inputs.settings and inputs.triad and inputs.cluster:
            out.append((row, inputs))
    return out


def _fit_loss(prepared: list[tuple[dict[str, Any], Inputs]], fitted: FittedConstants) -> float:
    """Σ log²(predicted / published) over the prepared rows (tokens/s per GPU or executed TFLOP/s per GPU)."""
    total = 0.0
    for row, inputs in prepared:
        result = _throughput(row, inputs, fitted)
        assert result is not None and "error" in result, row["id"]
        total += math.log(1 + result["error"]) ** 2
    return total


def fit_constants(rows: list[dict[str, Any]]) -> FittedConstants:
    """Grid search of the two fitted constants on the fit split: the coarse grids, then steps of 0.01 and 0.05 within
    one coarse step of the coarse optimum. Deterministic; raises when the optimum sits on a grid edge."""
    prepared = fit_rows(rows)

    def best(sustained: Iterable[float], interference: Iterable[float]) -> FittedConstants:
        grid = [FittedConstants(sustained_fraction=round(s, 2), overlap_interference=round(k, 2))
                for s in sustained for k in interference]
        return min(grid, key=lambda c: _fit_loss(prepared, c))

    coarse = best(SUSTAINED_GRID, INTERFERENCE_GRID)
    if coarse.sustained_fraction in (SUSTAINED_GRID[0], SUSTAINED_GRID[-1]) or coarse.overlap_interference == INTERFERENCE_GRID[-1]:
        raise SystemExit(f"fit on the grid's edge: {coarse}; widen the grid")
    s0, k0 = coarse.sustained_fraction, coarse.overlap_interference
    fine_s = [s0 + FINE_SUSTAINED_STEP * i for i in range(-5, 6)]
    fine_k = [max(0.0, k0 + FINE_INTERFERENCE_STEP * i) for i in range(-5, 6)]
    return best(fine_s, sorted(set(fine_k)))


def fit_check(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Refit :mod:`batchpilot.estimate.fitted` on the fit split; the shipped constants must equal the refit."""
    fitted = fit_constants(rows)
    return {"rows": len(fit_rows(rows)), "fitted": dataclasses.asdict(fitted), "shipped": dataclasses.asdict(FITTED),
            "reproduced": fitted == FITTED}


def _precision_class(precision: str) -> str:
    return "bf16" if precision in ("bf16", "fp16") else "fp8"


def _token_stats(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Tokens/s per GPU (rows publishing it), MFU and step time of a set of results."""
    rows = [r["throughput"] for r in results if r["throughput"] and "error" in r["throughput"]
            and r["throughput"]["metric"] == "tokens_per_s_per_gpu"]
    if not rows:
        return {"rows": 0}
    errors = [t["error"] for t in rows]
    return {"rows": len(rows), "median_abs_error": statistics.median(abs(e) for e in errors),
            "mean_error": statistics.fmean(errors), "within_20": sum(abs(e) <= 0.2 for e in errors) / len(rows),
            "mfu_published_median": statistics.median(t["mfu_published"] for t in rows),
            "mfu_predicted_median": statistics.median(t["mfu_predicted"] for t in rows),
            "step_time_median_abs_error": statistics.median(abs(t["step_time_error"]) for t in rows)}


def throughput_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Tokens/s per GPU by split × precision and by source × split (every source with a compared row)."""
    out: dict[str, Any] = {"by_split": {}, "by_source": {}}
    for split in ("heldout", "fit", "all"):
        chosen = [r for r in results if split == "all" or r["split"] == split]
        out["by_split"][split] = {p: _token_stats([r for r in chosen if p == "all" or _precision_class(r["precision"]) == p])
                                  for p in ("all", "bf16", "fp8")}
    for source in sorted({r["source"] for r in results}):
        mine = [r for r in results if r["source"] == source]
        stats = {split: _token_stats([r for r in mine if split == "all" or r["split"] == split])
                 for split in ("heldout", "fit", "all")}
        if stats["all"]["rows"]:
            out["by_source"][source] = stats
    out["tflops_sources"] = [
        {"id": r["id"], "split": r["split"], "metric": r["throughput"]["metric"], "published": r["throughput"]["published"],
         "predicted": r["throughput"]["predicted"], "error": r["throughput"]["error"]}
        for r in results if r["source"] in TFLOPS_SOURCES and r["throughput"] and "error" in r["throughput"]]
    return out


#: Settings a source measured side by side, and the row fields allowed to change with each (context parallelism
#: changes the sequence length and the data-parallel ranks, FSDP+TP the data-parallel ranks): two rows of one
#: published table (same document and locator) that differ in one such setting and nothing else form a pair
#: whose predicted order must match the published one.
RANKED_SETTINGS: dict[str, tuple[str, ...]] = {
    "pp_schedule": ("pp_schedule", "vpp"), "tp": ("tp", "dp", "sp"), "compile": ("compile",),
    "precision": ("precision", "fp8_recipe"), "async-tp": ("async-tp",),
    "cp": ("cp", "seq_len", "dp", "grad_accum", "global_batch_sequences", "global_batch_tokens", "num_gpus")}
#: The fields that make up a run's configuration (``a.b`` reads a nested field; ``async-tp`` the other setting).
CONFIG_FIELDS = ("model", "model_overrides", "model_shape", "gpu", "num_gpus", "gpus_per_node", "precision",
                 "fp8_recipe", "param_dtype", "seq_len", "micro_batch", "grad_accum", "global_batch_sequences",
                 "global_batch_tokens", "dp", "tp", "pp", "vpp", "pp_schedule", "cp", "ep", "sp", "framework",
                 "sharding.kind", "activation_checkpointing.policy", "compile", "other_settings", "async-tp")


def _config(row: dict[str, Any], skip: tuple[str, ...]) -> str:
    def field(key: str) -> Any:
        if key == "async-tp":
            return "async-tp" in row["other_settings"]
        if key == "other_settings":
            return sorted(s for s in row["other_settings"] if s != "async-tp")
        return value(row, key)

    return json.dumps({key: field(key) for key in CONFIG_FIELDS if key not in skip}, sort_keys=True, default=str)


def ranking_pairs(rows: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(setting, row a, row b): rows of one published table that differ in exactly one ranked setting
    (:data:`RANKED_SETTINGS`) and otherwise only in the fields it moves. Rows that publish executed TFLOP/s are
    paired only at equal sequence lengths (sources count attention FLOPs differently; tokens/s is convention-free)."""
    tables: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        tables[(row["document"], row["locator"])].append(row)
    pairs = []
    for members in tables.values():
        for a, b in itertools.combinations(members, 2):
            for setting, moves in RANKED_SETTINGS.items():
                if _config(a, tuple(f for f in CONFIG_FIELDS if f not in moves[:2])) == _config(
                        b, tuple(f for f in CONFIG_FIELDS if f not in moves[:2])) or _config(a, moves) != _config(b, moves):
                    continue
                metrics = {(published_throughput(r) or ("", 0.0))[0] for r in (a, b)}
                if metrics != {"tokens_per_s_per_gpu"} and value(a, "seq_len") != value(b, "seq_len"):
                    continue
                pairs.append((setting, a, b))
                break
    return pairs


#: What the DeepSeek-V3 report does not state, assumed for :func:`deepseek_v3_check`: the values, then each reason.
DEEPSEEK_V3_MICRO_BATCH, DEEPSEEK_V3_BATCH = 1, 15360
DEEPSEEK_V3_ASSUMPTIONS = {
    "micro_batch": "1: not published; DualPipe needs ≥ 2·pp micro-batches per step, and 1 sequence gives 120 per "
                   "data-parallel rank at the final batch (Megatron-Bridge's DeepSeek-V3 recipes also run 1)",
    "recompute": "none: the report recomputes only RMSNorm and the MLA up-projections (§3.2.3), a few % of the "
                 "layer forward",
    "batch": "15360 sequences: the final value of the batch ramp (3072 → 15360 over the first 469B of 14.8T tokens)",
    "mtp": "not modelled: the depth-1 multi-token-prediction module (one more MoE layer and the shared head per token, "
           "~2 % of the compute)",
}


def deepseek_v3_check(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """DeepSeek-V3 on 2048 H800 at its published batch: tokens/s per GPU against the rate its report implies
    (1e12 tokens per 180K GPU hours), with DualPipe and block-wise fp8 and the stated assumptions
    (:data:`DEEPSEEK_V3_ASSUMPTIONS`). The goal: within 20 %."""
    row = next(r for r in rows if r["id"] == "deepseek-v3-pretrain-2048gpu")
    accelerator = load_accelerator(row["gpu"])
    cluster = ClusterSpec(accelerator=accelerator, devices_per_node=8, num_nodes=row["num_gpus"] // 8,
                          inter_node_bandwidth_bytes_per_s=row["inter_node_gbit_per_s_per_gpu"] * 1e9 / 8)
    settings = RunSettings(precision="fp8", fp8_recipe="blockwise", engine="megatron", zero_stage=1, tp=1,
                           pp=row["pp"], ep=row["ep"], recompute="none")
    triad = BatchTriad.from_global(global_batch_sequences=DEEPSEEK_V3_BATCH, micro_batch_sequences=DEEPSEEK_V3_MICRO_BATCH,
                                   data_parallel_ranks=row["num_gpus"] // row["pp"], seq_len_tokens=row["seq_len"])
    profile = profile_for(accelerator)
    implementation = dataclasses.replace(row_implementation(row, settings, profile), dualpipe=True,
                                         deduplicated_dispatch=True)
    model = StepTimeModel(load_model(row["model"]), cluster, seq_len=row["seq_len"], implementation=implementation,
                          profile=profile)
    step = model.estimate(settings, triad)
    predicted = step.tokens_per_s / row["num_gpus"]
    published = published_throughput(row)
    assert published is not None
    return {"id": row["id"], "published": published[1], "predicted": predicted, "error": predicted / published[1] - 1,
            "assumptions": dict(DEEPSEEK_V3_ASSUMPTIONS),
            "compute_share": {k: v / step.step_time_s for k, v in step.compute_by_op_s.items() if v},
            "exposed_share": {k: v / step.step_time_s for k, v in step.exposed_comm_s.items() if v},
            "bubble_share": step.bubble_s / step.step_time_s}


#: Published throughputs closer than this are a tie, not an order (a table republished across releases moves by a
#: few percent).
RANKING_NOISE = 0.05


def ranking_checks(rows: list[dict[str, Any]], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every side-by-side pair both of whose rows batchpilot predicts and whose published throughputs differ by
    more than :data:`RANKING_NOISE`: the published and the predicted faster row."""
    by_id = {r["id"]: r for r in results}
    checks = []
    for setting, a, b in ranking_pairs(rows):
        ta, tb = by_id[a["id"]]["throughput"], by_id[b["id"]]["throughput"]
        if not (ta and tb and "error" in ta and "error" in tb):
            continue
        if abs(ta["published"] / tb["published"] - 1) <= RANKING_NOISE:
            continue
        published = ta["published"] > tb["published"]
        predicted = ta["predicted"] > tb["predicted"]
        checks.append({"setting": setting, "a": a["id"], "b": b["id"], "published": [ta["published"], tb["published"]],
                       "predicted": [ta["predicted"], tb["predicted"]], "agree": published == predicted})
    return checks


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
    false_oom = summary["memory_false_does_not_fit"]
    lines += ["", f"Published runs that ran, predicted not to fit their GPU (reserved + CUDA context + NCCL > "
              f"capacity): {len(false_oom['ids'])} of {false_oom['rows']} ({', '.join(false_oom['ids']) or 'none'})."]
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
        fits = f" fits {m['fits_predicted']} vs {m['fits_published']}" if "fits_published" in m else ""
        unit = "tok/s" if t.get("metric") == "tokens_per_s_per_gpu" else "TFLOP/s"
        predicted = "—" if t.get("predicted") is None else f"{t['predicted']:,.0f}"
        thr = f"{t['published']:,.0f} / {predicted} {unit}" if t else "—"
        why = sorted(set(m.get("not_expressible", []) + t.get("not_expressible", [])))
        lines.append(f"| {r['id']} | {r['split']} | {_gib(m.get('published_bytes'))} / {_gib(m.get('predicted_bytes'))}{fits} | "
                     f"{m.get('metric') or '—'} | {_pct(m.get('error'))} | {thr} | {_pct(t.get('error'))} | "
                     f"{'; '.join(why) or '—'} |")
    return lines


def _token_cells(s: dict[str, Any]) -> str:
    if not s["rows"]:
        return "0 | — | — | — | — | — |"
    return (f"{s['rows']} | {s['median_abs_error']:.0%} | {s['mean_error']:+.0%} | {s['within_20']:.0%} | "
            f"{s['mfu_published_median']:.0%} / {s['mfu_predicted_median']:.0%} | {s['step_time_median_abs_error']:.0%} |")


def _throughput_lines(result: dict[str, Any]) -> list[str]:
    """The tokens/s part: the fit, tokens/s per split × precision and per source, the TFLOP/s sources, ranking."""
    check, summary = result["fit_check"], result["throughput_summary"]
    head = "| rows | median abs error | mean error | within 20% | MFU pub / pred (median) | step time median abs error |"
    lines = ["", "## Step time (tokens/s per GPU)", "",
             "The per-op step-time model (`batchpilot.estimate.steptime`) with kernel speeds from published "
             "microbenchmarks (`batchpilot/data/kernel_profiles`) and two constants fitted on the fit split "
             f"(`batchpilot.estimate.fitted`): refit on {check['rows']} fit rows gives {check['fitted']}; shipped "
             f"{check['shipped']}: {'reproduced' if check['reproduced'] else 'NOT reproduced'}. MFU: tokens/s × "
             "model FLOPs per token (6N + attention, non-causal) ÷ the GPU's dense bf16 peak, for the published and "
             "the predicted tokens/s alike (fp8 runs too).", "",
             f"| split | precision {head}", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for split, by_precision in summary["by_split"].items():
        for precision, stats in by_precision.items():
            lines.append(f"| {split} | {precision} | {_token_cells(stats)}")
    lines += ["", f"| source | split {head}", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for source, by_split in summary["by_source"].items():
        for split, stats in by_split.items():
            if stats["rows"]:
                lines.append(f"| {source} | {split} | {_token_cells(stats)}")
    lines += ["", "Executed TFLOP/s per GPU (Narayanan et al. 2021 Table 1, BLOOM) or tokens/s per GPU (MT-NLG, "
              "Llama 3 405B), the sources the model was first checked on:", "",
              "| row | split | metric | published | predicted | error |", "|---|---|---|---:|---:|---:|"]
    for r in summary["tflops_sources"]:
        lines.append(f"| {r['id']} | {r['split']} | {r['metric']} | {r['published']:,.0f} | {r['predicted']:,.0f} | "
                     f"{r['error']:+.0%} |")
    deepseek = result["deepseek_v3"]
    lines += ["", f"DeepSeek-V3 on 2048 H800 at its published batch (DualPipe, block-wise fp8, node-limited deduplicated "
              f"dispatch): {deepseek['predicted']:,.0f} tokens/s per GPU predicted against {deepseek['published']:,.0f} "
              f"implied by the report ({deepseek['error']:+.0%}). Assumed: "
              + "; ".join(f"{k}: {v}" for k, v in deepseek["assumptions"].items()) + "."]
    ranking = result["ranking"]
    agree = sum(c["agree"] for c in ranking)
    lines += ["", f"Ranking: alternatives a source measured side by side (one setting differs): the predicted order "
              f"matches the published one in {agree} of {len(ranking)} pairs.", "",
              "| setting | a | b | published a / b | predicted a / b | agree |", "|---|---|---|---:|---:|---|"]
    for c in ranking:
        lines.append(f"| {c['setting']} | {c['a']} | {c['b']} | {c['published'][0]:,.0f} / {c['published'][1]:,.0f} | "
                     f"{c['predicted'][0]:,.0f} / {c['predicted'][1]:,.0f} | {'yes' if c['agree'] else 'NO'} |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    lines = ["# batchpilot vs published GPU training runs", "",
             "Generated by `python -m benchmarks.published_runs` from `benchmarks/data/published_runs.json` "
             "(sources, quotes, derived and assumed values: the data file; method: the module docstring). Error = "
             "predicted / published − 1. Memory: batchpilot's figure in the published peak's own metric (column "
             "'metric'): reserved = the caching allocator's reserved peak, allocated/active = its allocated peak, "
             "otherwise the whole GPU (reserved + CUDA context + NCCL). Throughput: tokens/s per GPU, or "
             "executed TFLOP/s per GPU where only that is published.", "",
             f"Split rule: {result['split_rule']}", "", "## Summary"]
    lines += _summary_lines(result["summary"])
    lines += _throughput_lines(result)
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
            "throughput_summary": throughput_summary(results), "fit_check": fit_check(data["rows"]),
            "ranking": ranking_checks(data["rows"], results), "deepseek_v3": deepseek_v3_check(data["rows"]),
            "rows": results, "platform": platform.platform()}


def main() -> int:
    result = run()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "published_runs.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (RESULTS / "published_runs.md").write_text(text)
    plot(result["rows"], RESULTS / "published_runs.png")
    print("\n".join(text.splitlines()[:60]))
    if not result["fit_check"]["reproduced"]:
        print(f"error: the constants refitted on the fit split, {result['fit_check']['fitted']}, differ from the shipped "
              f"{result['fit_check']['shipped']}; update batchpilot/estimate/fitted.py")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
