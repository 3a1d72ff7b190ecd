"""torchtitan job config (TOML), from a plan.

A torchtitan job config (TOML, the ``--job.config_file`` of torchtitan ≤ 0.2.x; later releases take the same
keys as ``--section.key`` flags): ``[training]`` local/global batch and sequence length, ``[parallelism]``
DDP/FSDP/HSDP degrees from the ZeRO stage, TP, PP (with its microbatch), EP, ``[activation_checkpoint]`` mode,
``[model]`` name/flavor where torchtitan ships one of the same shape (:func:`torchtitan_config` says how each
field is derived).
"""

from __future__ import annotations

import json
from typing import Any

from batchpilot.plan.exports._common import (
    Exported,
    ExportError,
    ExportOptions,
    launch_shape,
    require_engine,
    world_size,
)
from batchpilot.plan.request import Plan, PlanRequest
from batchpilot.specs.model import ModelSpec
from batchpilot.specs.settings import RunSettings

#: torchtitan 0.2.x model flavors (``torchtitan/models/llama3/__init__.py``, ``.../deepseek_v3/__init__.py``
#: at tag v0.2.2) by (model_type, layers, hidden, heads, kv heads, dense FFN width, vocab).
_TORCHTITAN_FLAVORS: dict[tuple[str, int, int, int, int, int, int], tuple[str, str]] = {
    ("llama", 32, 4096, 32, 8, 14336, 128256): ("llama3", "8B"),
    ("llama", 80, 8192, 64, 8, 28672, 128256): ("llama3", "70B"),
    ("llama", 126, 16384, 128, 8, 53248, 128256): ("llama3", "405B"),
    ("deepseek_v3", 61, 7168, 128, 128, 18432, 129280): ("deepseek_v3", "671B"),
}


TORCHTITAN_RESHARD = ("default", "always", "never")
"""``parallelism.fsdp_reshard_after_forward`` values of torchtitan v0.2.2."""


def torchtitan_config(plan: Plan, request: PlanRequest, data: str | None = None) -> dict[str, dict[str, Any]]:
    """torchtitan job config sections for ``plan`` (``torchtitan/config/job_config.py`` at tag v0.2.2), refused
    unless torchtitan runs the plan (:data:`batchpilot.plan.engines.TORCHTITAN`).

    - Batch: torchtitan derives accumulation = ``global_batch_size`` / (``local_batch_size`` × dp), dp =
      ``data_parallel_replicate_degree`` × ``data_parallel_shard_degree`` (``train.py:195-215``; cp, tp and pp
      are not in it). Without pipelining, ``local_batch_size`` is the micro-batch. With pipelining the schedule
      splits ``local_batch_size`` into microbatches of ``pipeline_parallel_microbatch_size``, so the
      accumulation becomes pipeline microbatches: local = micro × accumulation, pipeline microbatch = micro.
    - Sharding: ZeRO-0 is DDP (``data_parallel_replicate_degree`` = dp; torchtitan runs it only as the sole
      parallelism, ``parallelize.py:148-151``); ZeRO-2/3 shard over dp (``data_parallel_shard_degree``) with
      ``fsdp_reshard_after_forward`` ``never`` (ZeRO-2) or the plan's policy (ZeRO-3); ``hybrid_shard`` shards
      within a node and replicates across (HSDP).
    - Layout: ``tensor_parallel_degree`` (sequence parallel is always on with it), ``context_parallel_degree``,
      ``expert_parallel_degree`` = ep with ``expert_tensor_parallel_degree`` = tp (Megatron's default);
      pipeline ``1F1B``, or ``Interleaved1F1B`` with :func:`_torchtitan_interleaved_split` for ``vpp`` > 1.
    - Recomputation: ``activation_checkpoint.mode`` none | full | selective with ``selective_ac_option`` "op"
      (per-op) or "N" (every N-th block in full: the plan's 1 in N); the mode is always written, since the default
      is selective "2" (``job_config.py:651-655``).
    - Precision: ``mixed_precision_param`` bfloat16 or float32, ``training.dtype`` bfloat16 for pure bf16; fp8 adds
      the ``quantize.linear.float8`` converter (recipe_name rowwise, or tensorwise with
      ``enable_fsdp_float8_all_gather``) or ``quantize.linear.mx``; ``[compile]`` for torch.compile.
    """
    require_engine(plan, request, "torchtitan", "torchtitan")
    t, s = plan.triad, plan.settings
    if s.zero_stage == 3 and s.reshard_after_forward not in TORCHTITAN_RESHARD:
        raise ExportError(f"--export torchtitan: v0.2.2 reshards after forward {', '.join(TORCHTITAN_RESHARD)} "
                          f"(config/job_config.py:336), not {s.reshard_after_forward} (its default before 83e69410); "
                          f"plan with --reshard-after-forward default")
    replicate, shard = _torchtitan_dp(plan, request)
    pipelined = s.pp > 1
    local = t.micro_batch_sequences * (t.grad_accum_steps if pipelined else 1)
    training: dict[str, Any] = {
        "local_batch_size": local, "global_batch_size": t.global_batch_sequences, "seq_len": t.seq_len_tokens,
        "mixed_precision_param": "float32" if s.precision == "fp32" else "bfloat16",
        "enable_cpu_offload": False,
    }
    if s.param_dtype == "bf16":
        training["dtype"] = "bfloat16"
    if data is not None:
        training["dataset_path"] = data
    parallelism: dict[str, Any] = {
        "data_parallel_replicate_degree": replicate, "data_parallel_shard_degree": shard,
        "tensor_parallel_degree": s.tp, "pipeline_parallel_degree": s.pp, "context_parallel_degree": s.cp,
        "expert_parallel_degree": s.ep, "expert_tensor_parallel_degree": s.tp if s.ep > 1 else 1,
    }
    if shard > 1 or s.zero_stage >= 2:
        parallelism["fsdp_reshard_after_forward"] = s.reshard_after_forward if s.zero_stage == 3 else "never"
    if pipelined:
        parallelism["pipeline_parallel_microbatch_size"] = t.micro_batch_sequences
        parallelism["pipeline_parallel_schedule"] = "Interleaved1F1B" if s.vpp > 1 else "1F1B"
    if s.vpp > 1:
        parallelism.update(_torchtitan_interleaved_split(request.model.num_layers, s.pp, s.vpp))
    sections: dict[str, dict[str, Any]] = {
        "model": _torchtitan_model(request.model, s), "training": training, "parallelism": parallelism,
        "activation_checkpoint": _checkpointing(s)}
    if s.compile:
        sections["compile"] = {"enable": True, "components": ["model", "loss"]}
    sections.update(_fp8_sections(s))
    return sections


def _checkpointing(s: RunSettings) -> dict[str, Any]:
    if s.recompute == "none":
        return {"mode": "none"}
    if s.recompute == "op":
        return {"mode": "selective", "selective_ac_option": "op"}
    if s.recompute_every > 1:  # full AC of every N-th block (distributed/activation_checkpoint.py:176-181)
        return {"mode": "selective", "selective_ac_option": str(s.recompute_every)}
    return {"mode": "full"}


def _fp8_sections(s: RunSettings) -> dict[str, dict[str, Any]]:
    """``[quantize.linear.float8]`` / ``[quantize.linear.mx]`` for fp8 (``config/job_config.py:731-781``): a
    ``recipe_name`` excludes the fp8 all-gather (``components/quantization/float8.py:65-69``), so tensorwise
    (torchao's default recipe) leaves it out."""
    recipe = s.resolved_fp8_recipe
    if recipe is None:
        return {}
    if recipe == "mxfp8":
        return {"quantize.linear.mx": {"recipe_name": "mxfp8_cublas"}}
    if recipe == "tensorwise":
        return {"quantize.linear.float8": {"enable_fsdp_float8_all_gather": s.fp8_all_gather}}
    return {"quantize.linear.float8": {"recipe_name": recipe}}


def _torchtitan_interleaved_split(layers: int, pp: int, vpp: int) -> dict[str, int]:
    """Settings that make torchtitan cut ``pp × vpp`` virtual stages: it makes ⌈(L + w_in + w_out) /
    layers_per_stage⌉ of them, counting the embedding and the output as ``w_in``/``w_out`` layers
    (``pipeline_parallel_first/last_stage_less_layers``, default 1; v0.2.2
    ``distributed/pipeline_parallel.py``). Weights 0 first — the plan's split: ⌈L/pp⌉ layers on every
    stage, embedding and head on top — then torchtitan's default 1."""
    stages = pp * vpp
    for weight in (0, 1):
        for per_stage in range(1, layers + 2 * weight + 1):
            if -(-(layers + 2 * weight) // per_stage) == stages:
                return {"pipeline_parallel_layers_per_stage": per_stage,
                        "pipeline_parallel_first_stage_less_layers": weight,
                        "pipeline_parallel_last_stage_less_layers": weight}
    raise ExportError(f"--export torchtitan: no layers-per-stage splits {layers} layers into {pp} ranks × {vpp} "
                      f"virtual stages; pin another --vpp or --pp")


def _torchtitan_dp(plan: Plan, request: PlanRequest) -> tuple[int, int]:
    """(data_parallel_replicate_degree, data_parallel_shard_degree) for the plan's sharding."""
    dp, s = plan.triad.data_parallel_ranks, plan.settings
    if s.zero_stage == 0:
        return dp, 1
    if not s.hybrid_shard:
        return 1, dp
    shard = min(dp, request.cluster.devices_per_node)
    if dp % shard or shard % s.ep:
        raise ExportError(f"--export torchtitan: hybrid sharding {dp} data-parallel ranks in groups of {shard} "
                          f"(ep {s.ep}) does not divide evenly; drop --hybrid-shard")
    return dp // shard, shard


def _torchtitan_model(model: ModelSpec, s: RunSettings) -> dict[str, Any]:
    key = (model.model_type, model.num_layers, model.hidden_size, model.num_heads, model.num_kv_heads,
           model.intermediate_size, model.vocab_size)
    name, flavor = _TORCHTITAN_FLAVORS.get(key, (model.model_type, f"batchpilot:{model.name}"))
    section: dict[str, Any] = {"name": name, "flavor": flavor}
    recipe = s.resolved_fp8_recipe
    if recipe is not None:
        section["converters"] = ["quantize.linear.mx" if recipe == "mxfp8" else "quantize.linear.float8"]
    return section


def torchtitan_toml(plan: Plan, request: PlanRequest, data: str | None = None) -> str:
    """:func:`torchtitan_config` as a TOML file for ``torchrun ... -m torchtitan.train --job.config_file``."""
    config = torchtitan_config(plan, request, data)
    t = plan.triad
    world = world_size(plan)
    lines = [f"# batchpilot plan for {request.model.name} on {world} GPUs: micro-batch {t.micro_batch_sequences} x "
             f"accumulation {t.grad_accum_steps} x dp {t.data_parallel_ranks} = {t.global_batch_sequences} sequences",
             "# torchtitan <= 0.2.x: --job.config_file THIS_FILE; later releases take each key as --section.key VALUE."]
    if config["model"]["flavor"].startswith("batchpilot:"):
        lines.append(f"# torchtitan ships no flavor of this shape: register {config['model']['flavor']!r} under "
                     f"torchtitan/models/<model>/ or the run stops at the unknown flavor.")
    for section, values in config.items():
        lines += ["", f"[{section}]"] + [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    """A TOML scalar or array: booleans, integers, basic strings, lists of those. JSON's string escapes
    (``\\"``, ``\\\\``, ``\\n``, ``\\uXXXX`` for control characters) are TOML's; DEL, which TOML also forbids raw,
    is escaped too. Non-ASCII stays UTF-8 (``ensure_ascii`` would write surrogate pairs, which TOML rejects)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def torchtitan_export(plan: Plan, request: PlanRequest, options: ExportOptions) -> Exported:
    text = torchtitan_toml(plan, request, options.data)
    nodes, per_node = launch_shape(plan, request)
    return Exported(text=text, notes=(f"torchrun --nnodes {nodes} --nproc-per-node {per_node} -m torchtitan.train "
                                      f"--job.config_file THIS_FILE",))
