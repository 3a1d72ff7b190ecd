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

from batchpilot.plan.exports._common import ExportError
from batchpilot.plan.request import Plan, PlanRequest
from batchpilot.specs.model import ModelSpec

#: torchtitan 0.2.x model flavors (``torchtitan/models/llama3/__init__.py``, ``.../deepseek_v3/__init__.py``
#: at tag v0.2.2) by (model_type, layers, hidden, heads, kv heads, dense FFN width, vocab).
_TORCHTITAN_FLAVORS: dict[tuple[str, int, int, int, int, int, int], tuple[str, str]] = {
    ("llama", 32, 4096, 32, 8, 14336, 128256): ("llama3", "8B"),
    ("llama", 80, 8192, 64, 8, 28672, 128256): ("llama3", "70B"),
    ("llama", 126, 16384, 128, 8, 53248, 128256): ("llama3", "405B"),
    ("deepseek_v3", 61, 7168, 128, 128, 18432, 129280): ("deepseek_v3", "671B"),
}


def torchtitan_config(plan: Plan, request: PlanRequest) -> dict[str, dict[str, Any]]:
    """torchtitan job config sections for ``plan`` (``torchtitan/config/job_config.py`` at tag v0.2.2).

    - Batch: torchtitan derives accumulation = ``global_batch_size`` / (``local_batch_size`` × dp), dp =
      ``data_parallel_replicate_degree`` × ``data_parallel_shard_degree`` (``train.py``). Without
      pipelining, ``local_batch_size`` is the micro-batch. With pipelining the schedule splits
      ``local_batch_size`` into microbatches of ``pipeline_parallel_microbatch_size``, so the
      accumulation becomes pipeline microbatches: local = micro × accumulation, pipeline microbatch = micro.
    - ZeRO → FSDP2: stage 0 is DDP (``data_parallel_replicate_degree`` = dp); stages 1–3 shard over dp
      (``data_parallel_shard_degree``). FSDP has no optimizer-only sharding, so stages 1 and 2 keep
      parameters unsharded between forward and backward (``fsdp_reshard_after_forward = "never"``,
      ZeRO-2 memory, at most the plan's) and stage 3 reshards after every forward (``"always"``).
      ``hybrid_shard`` shards within a node and replicates across (HSDP). Offload moves parameters,
      gradients and optimizer states to the CPU (``enable_cpu_offload``), more than the plan offloads.
    - Experts: ``expert_parallel_degree`` = ep, ``expert_tensor_parallel_degree`` = tp (Megatron's
      default); torchtitan carves ep out of the FSDP dimension, so DDP plans with ep > 1 are refused.
    - Precision: bf16 (fp8 adds the ``quantize.linear.float8`` converter) or fp32; fp16 is refused.
    - Pipeline: 1F1B (torchtitan's default) for ``vpp`` 1; ``Interleaved1F1B`` with
      :func:`_torchtitan_interleaved_split` for ``vpp`` > 1.
    """
    t, s = plan.triad, plan.settings
    if s.precision == "fp16":
        raise ExportError("--export torchtitan: torchtitan trains in bfloat16 or float32, not fp16; "
                          "use --precision bf16")
    replicate, shard = _torchtitan_dp(plan, request)
    pipelined = s.pp > 1
    local = t.micro_batch_sequences * (t.grad_accum_steps if pipelined else 1)
    training: dict[str, Any] = {
        "local_batch_size": local, "global_batch_size": t.global_batch_sequences, "seq_len": t.seq_len_tokens,
        "mixed_precision_param": "float32" if s.precision == "fp32" else "bfloat16",
        "enable_cpu_offload": s.offload,
    }
    parallelism: dict[str, Any] = {
        "data_parallel_replicate_degree": replicate, "data_parallel_shard_degree": shard,
        "tensor_parallel_degree": s.tp, "pipeline_parallel_degree": s.pp, "context_parallel_degree": 1,
        "expert_parallel_degree": s.ep, "expert_tensor_parallel_degree": s.tp if s.ep > 1 else 1,
    }
    if shard > 1:
        parallelism["fsdp_reshard_after_forward"] = "always" if s.zero_stage == 3 else "never"
    if pipelined:
        parallelism["pipeline_parallel_microbatch_size"] = t.micro_batch_sequences
    if s.vpp > 1:
        parallelism["pipeline_parallel_schedule"] = "Interleaved1F1B"
        parallelism.update(_torchtitan_interleaved_split(request.model.num_layers, s.pp, s.vpp))
    checkpointing: dict[str, Any] = {"mode": s.recompute}
    if s.recompute == "selective":
        checkpointing["selective_ac_option"] = "op"
    return {"model": _torchtitan_model(request.model, s.precision), "training": training,
            "parallelism": parallelism, "activation_checkpoint": checkpointing}


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
    """(data_parallel_replicate_degree, data_parallel_shard_degree) for the plan's ZeRO stage."""
    dp, s = plan.triad.data_parallel_ranks, plan.settings
    if s.zero_stage == 0:
        if s.ep > 1:
            raise ExportError(f"--export torchtitan: expert parallelism (ep {s.ep}) needs FSDP in torchtitan, "
                              f"but the plan is ZeRO-0 (DDP); pin --zero 1 or higher, or --ep 1")
        return dp, 1
    if not s.hybrid_shard:
        return 1, dp
    shard = min(dp, request.cluster.devices_per_node)
    if dp % shard or shard % s.ep:
        raise ExportError(f"--export torchtitan: hybrid sharding {dp} data-parallel ranks in groups of {shard} "
                          f"(ep {s.ep}) does not divide evenly; drop --hybrid-shard")
    return dp // shard, shard


def _torchtitan_model(model: ModelSpec, precision: str) -> dict[str, Any]:
    key = (model.model_type, model.num_layers, model.hidden_size, model.num_heads, model.num_kv_heads,
           model.intermediate_size, model.vocab_size)
    name, flavor = _TORCHTITAN_FLAVORS.get(key, (model.model_type, f"batchpilot:{model.name}"))
    section: dict[str, Any] = {"name": name, "flavor": flavor}
    if precision == "fp8":
        section["converters"] = ["quantize.linear.float8"]
    return section


def torchtitan_toml(plan: Plan, request: PlanRequest) -> str:
    """:func:`torchtitan_config` as a TOML file for ``torchrun ... -m torchtitan.train --job.config_file``."""
    config = torchtitan_config(plan, request)
    t, s = plan.triad, plan.settings
    world = t.data_parallel_ranks * s.tp * s.pp
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
