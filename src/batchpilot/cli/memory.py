"""``batchpilot memory`` — per-GPU training memory of one configuration, and whether it fits.

Examples::

    batchpilot memory --model tiny-llama-1m --gpu h100-sxm --seq-len 256 --micro-batch 4 --precision fp32
    batchpilot memory --model llama-3-8b --gpu h100-sxm --gpus 64 --seq-len 8192 --micro-batch 1 \\
        --engine fsdp2 --zero 3 --recompute selective --json
    batchpilot memory --model tiny-llama-15m --gpu h100-sxm --seq-len 256 --micro-batch 2 --method traced
"""

from __future__ import annotations

from typing import Annotated, Any

from rich.table import Table

from batchpilot.cli._common import console, handle_errors, print_json
from batchpilot.cli._finetune import FinetuneOpt, with_finetune
from batchpilot.cli._options import GpuOpt, JsonOpt, ModelOpt, SeqLenOpt, choice, count, option, whole
from batchpilot.cli._settings import (
    DEFAULTS,
    AttentionOpt,
    CompileOpt,
    CpOpt,
    EngineOpt,
    EpOpt,
    Fp8AllGatherOpt,
    Fp8RecipeOpt,
    HybridShardOpt,
    LossChunksOpt,
    LossOpt,
    OffloadOpt,
    OptimizerOpt,
    ParamDtypeOpt,
    PpOpt,
    PrecisionOpt,
    RecomputeEveryOpt,
    RecomputeOpt,
    ReshardOpt,
    SpOpt,
    TpOpt,
    VppOpt,
    ZeroOpt,
    settings_from_options,
)
from batchpilot.errors import SpecError
from batchpilot.estimate.breakdown import MemoryBreakdown
from batchpilot.estimate.memory import analytic_memory
from batchpilot.specs.hardware import check_device_count, load_accelerator
from batchpilot.specs.model import ModelSpec, load_model
from batchpilot.specs.settings import RunSettings, check_effective, validate_for_model
from batchpilot.units import GIB

METHODS = ("analytic", "traced")
PEAK_PHASES = ("backward start", "backward end", "optimizer step", "backward of a layer")


def data_parallel_ranks(gpus: int, settings: RunSettings) -> int:
    """Data-parallel ranks of ``gpus`` GPUs under ``tp × pp × cp`` model parallelism (one-line error if not whole)."""
    check_device_count(gpus)
    if gpus % settings.model_parallel_size:
        raise SpecError(
            f"--gpus {gpus} is not a multiple of tp {settings.tp} × pp {settings.pp} × cp {settings.cp} = "
            f"{settings.model_parallel_size}; use a multiple of {settings.model_parallel_size}"
        )
    return gpus // settings.model_parallel_size


def estimate(model: ModelSpec, settings: RunSettings, *, method: str, micro_batch: int, seq_len: int, dp: int,
             grad_accum: int) -> MemoryBreakdown:
    """One estimator call; ``traced`` (fake-tensor execution of one GPU of the model) is imported lazily."""
    if method == "analytic":
        return analytic_memory(model, settings, micro_batch=micro_batch, seq_len=seq_len, dp=dp,
                               grad_accum=grad_accum)
    if method == "traced":
        from batchpilot.measure.traced import traced_memory

        return traced_memory(model, settings, micro_batch=micro_batch, seq_len=seq_len, target="cuda")
    raise SpecError(f"--method {method!r} is not one of: {', '.join(METHODS)}")


def memory_record(model: ModelSpec, settings: RunSettings, memory: MemoryBreakdown, *, gpu_name: str,
                  gpu_memory_bytes: int, gpus: int, dp: int, micro_batch: int, seq_len: int, grad_accum: int,
                  method: str) -> dict[str, Any]:
    """The ``memory --json`` contract: model, settings, gpu, memory breakdown, fits, headroom."""
    return {
        "model": model.name,
        "method": method,
        "micro_batch": micro_batch,
        "seq_len": seq_len,
        "grad_accum": grad_accum,
        "gpus": gpus,
        "dp": dp,
        "settings": settings.to_dict(),
        "gpu": {"name": gpu_name, "memory_bytes": gpu_memory_bytes},
        "memory": memory.to_dict(),
        "peak_phase": _peak_phase(memory),
        "allocated_bytes": memory.details.get("allocated_bytes"),
        "reserved_bytes": memory.details.get("reserved_bytes"),
        "fits": memory.total_bytes <= gpu_memory_bytes,
        "headroom_bytes": gpu_memory_bytes - memory.total_bytes,
    }


def _peak_phase(memory: MemoryBreakdown) -> str | None:
    """When the analytic peak happens (``details["peak_phase"]``); None for estimators that do not say."""
    index = memory.details.get("peak_phase")
    return PEAK_PHASES[index] if index is not None and 0 <= index < len(PEAK_PHASES) else None


def _render(record: dict[str, Any]) -> None:
    mem, gpu_bytes = record["memory"], record["gpu"]["memory_bytes"]
    title = (f"{record['model']} on {record['gpu']['name']}: micro-batch {record['micro_batch']} × seq "
             f"{record['seq_len']}, dp {record['dp']} ({record['method']}, per GPU)")
    table = Table("term", "GiB", "share", title=title)
    for key in ("weights", "gradients", "optimizer", "activations", "overhead", "total"):
        share = mem[key] / mem["total"] if mem["total"] else 0.0
        table.add_row(key, f"{mem[key] / GIB:,.3f}", f"{share:.0%}")
    console.print(table)
    if record["peak_phase"]:
        console.print(f"peak at the {record['peak_phase']}; activation peak "
                      f"{mem['details']['activations_peak'] / GIB:,.3f} GiB")
    details = mem.get("details", {})
    if "reserved_bytes" in details:
        console.print(f"caching allocator: {details['allocated_bytes'] / GIB:,.2f} GiB allocated, "
                      f"{details['reserved_bytes'] / GIB:,.2f} GiB reserved; outside it (CUDA context, NCCL) "
                      f"{details['outside_allocator_bytes'] / GIB:,.2f} GiB")
    verdict = "fits" if record["fits"] else "does NOT fit"
    console.print(f"{verdict}: {mem['total'] / GIB:,.2f} GiB of {gpu_bytes / GIB:,.2f} GiB "
                  f"(headroom {record['headroom_bytes'] / GIB:,.2f} GiB)")


@handle_errors
def memory(
    model: ModelOpt,
    gpu: GpuOpt,
    seq_len: SeqLenOpt,
    micro_batch: Annotated[int, option("--micro-batch", count("--micro-batch"), help=(
        "Sequences per GPU per forward/backward."))],
    gpus: Annotated[int, option("--gpus", whole("--gpus"), help="GPUs in the job (dp = gpus / (tp × pp × cp)).")] = 1,
    grad_accum: Annotated[int, option("--grad-accum", whole("--grad-accum"), help=(
        "Micro-batches per step (pipeline in flight)."))] = 1,
    method: Annotated[str, option("--method", choice("--method", METHODS), help=(
        "analytic (closed form) or traced (the real module under fake tensors)."))] = "analytic",
    precision: PrecisionOpt = DEFAULTS.precision, optimizer: OptimizerOpt = DEFAULTS.optimizer,
    engine: EngineOpt = DEFAULTS.engine, zero: ZeroOpt = DEFAULTS.zero_stage,
    hybrid_shard: HybridShardOpt = DEFAULTS.hybrid_shard, tp: TpOpt = DEFAULTS.tp, pp: PpOpt = DEFAULTS.pp,
    vpp: VppOpt = DEFAULTS.vpp,
    ep: EpOpt = DEFAULTS.ep, sp: SpOpt = DEFAULTS.sp, recompute: RecomputeOpt = DEFAULTS.recompute,
    attention: AttentionOpt = DEFAULTS.attention, offload: OffloadOpt = DEFAULTS.offload,
    cp: CpOpt = DEFAULTS.cp, recompute_every: RecomputeEveryOpt = DEFAULTS.recompute_every,
    compile: CompileOpt = DEFAULTS.compile, fp8_recipe: Fp8RecipeOpt = DEFAULTS.fp8_recipe,
    fp8_all_gather: Fp8AllGatherOpt = DEFAULTS.fp8_all_gather,
    reshard_after_forward: ReshardOpt = DEFAULTS.reshard_after_forward, loss: LossOpt = DEFAULTS.loss,
    loss_chunks: LossChunksOpt = DEFAULTS.loss_chunks, param_dtype: ParamDtypeOpt = DEFAULTS.param_dtype,
    finetune: FinetuneOpt = "full",
    json_output: JsonOpt = False,
) -> None:
    """Per-GPU memory of one training step: weights, gradients, optimizer, activations, overhead."""
    settings = settings_from_options(precision=precision, optimizer=optimizer, engine=engine, zero=zero,
                                     hybrid_shard=hybrid_shard, tp=tp, pp=pp, vpp=vpp, ep=ep, sp=sp,
                                     recompute=recompute, attention=attention, offload=offload, cp=cp,
                                     recompute_every=recompute_every, compile=compile, fp8_recipe=fp8_recipe,
                                     fp8_all_gather=fp8_all_gather, reshard_after_forward=reshard_after_forward,
                                     loss=loss, loss_chunks=loss_chunks, param_dtype=param_dtype)
    settings = with_finetune(settings, finetune)
    check_effective(settings)
    spec, accelerator = load_model(model), load_accelerator(gpu)
    validate_for_model(settings, spec)
    dp = data_parallel_ranks(gpus, settings)
    breakdown = estimate(spec, settings, method=method, micro_batch=micro_batch, seq_len=seq_len, dp=dp,
                         grad_accum=grad_accum)
    record = memory_record(spec, settings, breakdown, gpu_name=accelerator.name,
                           gpu_memory_bytes=accelerator.memory_bytes, gpus=gpus, dp=dp, micro_batch=micro_batch,
                           seq_len=seq_len, grad_accum=grad_accum, method=method)
    if json_output:
        print_json(record)
    else:
        _render(record)
