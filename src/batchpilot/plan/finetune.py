"""Which ways of training a model fit a cluster: full training in mixed precision, with 8-bit AdamW, in pure bf16
(plain, Kahan-compensated), LoRA and QLoRA — each planned for the same target batch, with its memory, speed, and
what it changes in the optimizer and the result (``plan --finetune compare``).

    >>> from batchpilot.plan.options import PlanOptions, prepare_plan
    >>> req = prepare_plan(PlanOptions(model="qwen2.5-7b", gpu="h100-sxm", gpus=1, seq_len=4096,
    ...                                global_batch=16)).request
    >>> modes = compare_modes(req)
    >>> [(m.name, m.fits) for m in modes if m.name in ("full", "lora", "qlora")]
    [('full', False), ('lora', True), ('qlora', True)]

What each mode changes (the ``optimizer`` and ``result`` texts of :class:`~batchpilot.records.cost.FineTuneMode`)
cites its source: mixed precision (Micikevicius et al. 2018, arXiv:1710.03740: fp32 master weights); 8-bit
AdamW (Dettmers et al. 2022, arXiv:2110.02861: block-wise quantized states, matching 32-bit Adam on their
fine-tuning and pretraining benchmarks); pure bf16 (Zamirai et al. 2020, arXiv:2010.06192: round-to-nearest
updates lose small steps, Kahan summation or stochastic rounding recover 32-bit accuracy); LoRA (Hu et al. 2021,
arXiv:2106.09685; Biderman et al. 2024, arXiv:2405.09673: LoRA learns less than full fine-tuning on code and
math and forgets less); QLoRA (Dettmers et al. 2023, arXiv:2305.14314 §5: NF4 + double quantization matches
16-bit LoRA and full fine-tuning on their benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from batchpilot.errors import BatchpilotError
from batchpilot.estimate.finetune import trainable_params
from batchpilot.plan.cost import training_cost
from batchpilot.plan.engines import get_engine
from batchpilot.plan.planner import plan
from batchpilot.plan.request import PlanRequest, PlanResult
from batchpilot.records.cost import FineTuneMode, TrainingCost
from batchpilot.specs.finetune import FULL, FineTune, format_finetune, parse_finetune
from batchpilot.specs.settings import RunSettings


@dataclass(frozen=True, kw_only=True, slots=True)
class _Mode:
    name: str
    finetune: FineTune
    optimizer: str | None
    """``--optimizer`` of this mode (None: the request's)."""
    param_dtype: str | None
    optimizer_text: str
    result_text: str


#: LoRA's default for the comparison: rank 16 on every linear (QLoRA §4: adapters on all linear layers are needed
#: to match full fine-tuning; PEFT's ``target_modules="all-linear"``).
LORA = parse_finetune("lora,r=16,alpha=16,targets=all-linear")
QLORA = parse_finetune("qlora,r=16,alpha=16,targets=all-linear")

_FULL_RESULT = "every weight trains (the reference)"
_BF16_RESULT = ("every weight trains; round-to-nearest bf16 updates drop steps below the weight's precision "
                "(Zamirai et al. 2020): use kahan or stochastic rounding for long runs")
MODES: tuple[_Mode, ...] = (
    _Mode(name="full", finetune=FULL, optimizer="adamw", param_dtype="fp32",
          optimizer_text="AdamW with fp32 master weights and fp32 m, v (mixed precision)", result_text=_FULL_RESULT),
    _Mode(name="full, 8-bit AdamW", finetune=FULL, optimizer="adamw-8bit", param_dtype="fp32",
          optimizer_text="AdamW's m, v block-wise 8-bit (bitsandbytes AdamW8bit; Dettmers et al. 2022)",
          result_text="every weight trains; 8-bit states matched 32-bit Adam in Dettmers et al. 2022"),
    _Mode(name="full, pure bf16", finetune=FULL, optimizer="adamw", param_dtype="bf16",
          optimizer_text="weights, gradients and AdamW m, v in bf16, no master copy", result_text=_BF16_RESULT),
    _Mode(name="full, pure bf16, Kahan", finetune=parse_finetune("full,kahan"), optimizer="adamw", param_dtype="bf16",
          optimizer_text="pure bf16 AdamW with a bf16 Kahan compensation buffer (+2 bytes/param)",
          result_text="every weight trains; Kahan summation recovers fp32-master accuracy (Zamirai et al. 2020)"),
    _Mode(name="full, pure bf16, 8-bit AdamW", finetune=parse_finetune("full,stochastic"), optimizer="adamw-8bit",
          param_dtype="bf16",
          optimizer_text="bf16 weights and gradients, 8-bit AdamW states, stochastically rounded updates",
          result_text="every weight trains; stochastic rounding keeps small updates in expectation"),
    _Mode(name="lora", finetune=LORA, optimizer="adamw", param_dtype="fp32",
          optimizer_text="AdamW over the fp32 adapters only; the bf16 base is frozen (no gradients, no states)",
          result_text="a rank-16 update of every linear; learns less than full fine-tuning on code/math and "
                      "forgets less (Biderman et al. 2024)"),
    _Mode(name="qlora", finetune=QLORA, optimizer="adamw", param_dtype="fp32",
          optimizer_text="AdamW over the adapters; the base in 4-bit NF4 with double quantization, frozen",
          result_text="as LoRA over a 4-bit base; matched 16-bit LoRA and full fine-tuning in QLoRA §5"),
)


def mode_settings(base: RunSettings, mode: _Mode) -> RunSettings:
    """The request's settings with this mode's fine-tuning, optimizer and parameter dtype (bf16 compute)."""
    precision = "bf16" if base.precision == "fp32" else base.precision
    return replace(base, finetune=mode.finetune, optimizer=mode.optimizer or base.optimizer,  # type: ignore[arg-type]
                   param_dtype=mode.param_dtype or base.param_dtype, precision=precision)  # type: ignore[arg-type]


#: Engines that run PEFT adapters (Hugging Face Trainer, Lightning and batchpilot's runner load PEFT models;
#: DeepSpeed through the HF integration). torchtitan (v0.2) and Megatron-LM have no LoRA.
ADAPTER_ENGINES = ("hf", "batchpilot", "lightning", "deepspeed")
#: The order in which other engines are tried when the request's cannot run a mode (e.g. pure bf16 under hf).
ENGINE_ORDER = ("hf", "torchtitan", "batchpilot", "deepspeed", "lightning", "megatron")


def mode_flags(settings: RunSettings, engine: str | None = None) -> str:
    """The ``plan`` flags of a mode's settings (``--engine`` when it is not the request's)."""
    flags = [f"--finetune {format_finetune(settings.finetune)}"]
    if engine:
        flags.append(f"--engine {engine}")
    if settings.optimizer != "adamw":
        flags.append(f"--optimizer {settings.optimizer}")
    if settings.param_dtype != "fp32":
        flags.append(f"--param-dtype {settings.param_dtype}")
    return " ".join(flags)


def compare_modes(req: PlanRequest, *, train_tokens: int | None = None, tokens_source: str = "--train-tokens",
                  price_per_gpu_hour: float | None = None) -> tuple[FineTuneMode, ...]:
    """Plan ``req`` once per mode of :data:`MODES` (the same target, cluster, pins and engine)."""
    out = []
    for mode in MODES:
        settings = mode_settings(req.settings, mode)
        entry = FineTuneMode(name=mode.name, flags=mode_flags(settings), fits=False,
                             trainable_params=trainable_params(req.model, settings.finetune),
                             optimizer=mode.optimizer_text, result=mode.result_text)
        found = _plan_mode(req, settings)
        if isinstance(found, str):
            out.append(replace(entry, reason=found))
            continue
        result, engine = found
        entry = replace(entry, flags=mode_flags(settings, engine if engine != req.engine else None))
        best = result.plans[0]
        cost: TrainingCost | None = None
        if train_tokens is not None:
            cost = training_cost(tokens_per_s=best.step.tokens_per_s, gpus=req.cluster.total_devices,
                                 train_tokens=train_tokens, price_per_gpu_hour=price_per_gpu_hour,
                                 tokens_source=tokens_source)
        out.append(replace(entry, fits=True, memory_bytes=best.memory.total_bytes, micro_batch=best.triad.micro_batch_sequences,
                           grad_accum=best.triad.grad_accum_steps, recompute=best.settings.recompute,
                           zero_stage=best.settings.zero_stage, tokens_per_s=best.step.tokens_per_s,
                           step_time_s=best.step.step_time_s, cost=cost))
    return tuple(out)


def _plan_mode(req: PlanRequest, settings: RunSettings) -> tuple[PlanResult, str | None] | str:
    """The plan of ``settings`` on the request's engine, else on the first engine of :data:`ENGINE_ORDER` that
    runs it (adapters: :data:`ADAPTER_ENGINES`); the reason on the request's engine when none does."""
    engines = [req.engine, *(e for e in ENGINE_ORDER if e != req.engine)] if req.engine else [None]
    first_reason = ""
    for name in engines:
        if settings.finetune.adapters and name is not None and name not in ADAPTER_ENGINES:
            first_reason = first_reason or f"--engine {name} runs no LoRA adapters (use {', '.join(ADAPTER_ENGINES)})"
            continue
        attempt = settings if name is None else replace(settings, engine=get_engine(name).shardings[0].bookkeeping)
        try:
            return plan(replace(req, settings=attempt, engine=name)), name
        except BatchpilotError as exc:
            reason = str(exc).split(";")[0]
            if reason.startswith("nothing fits"):  # the engine runs it, the cluster is too small
                return reason if name == req.engine else f"{reason} (--engine {name})"
            first_reason = first_reason or reason
            if "engine" not in reason:
                break
    return first_reason
