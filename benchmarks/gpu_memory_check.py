"""batchpilot's memory and tokens/s predictions against one real GPU: a ~1B and an 8B Llama shape over a few
recomputation policies.

Example (one command on a machine with one CUDA GPU; a few minutes)::

    python -m benchmarks.gpu_memory_check                 # measure, write benchmarks/results/gpu_memory_check.json
    python -m benchmarks.gpu_memory_check --dry-run       # CPU: print the measurements it would make and the predictions

Each case builds a ``transformers`` Llama from its config (random weights, nothing downloaded) on the GPU, applies
the case's recomputation (:func:`batchpilot.measure.recompute.apply_recompute`: torchtitan's per-op policy, full,
1 layer in N) and optionally ``torch.compile`` per decoder layer, and trains :data:`STEPS` steps on random tokens:
forward (bf16 autocast over fp32 weights, or a pure bf16 module), the model's own loss (``logits.float()`` cross
entropy), backward, fused AdamW, ``zero_grad(set_to_none=True)``. The allocator's peaks are reset after the first
(warm-up, optimizer-state-creating) step; then ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``
and tokens/s over the remaining steps are compared with :func:`batchpilot.estimate.memory.analytic_memory`
(``details["allocated_bytes"]`` / ``["reserved_bytes"]``, engine ``torch``, one GPU, fused optimizer) and
:class:`batchpilot.estimate.steptime.StepTimeModel`. A case that runs out of memory is recorded as such (and
compared with the prediction's fits / does not fit).

The 1B shape is Llama 3.2 1B's (https://huggingface.co/meta-llama/Llama-3.2-1B, ``config.json``: hidden 2048,
FFN 8192, 16 layers, 32 query / 8 key-value heads, vocabulary 128,256, tied embeddings); the 8B is the
``llama-3.1-8b`` preset, trained in pure bf16 (8 bytes per parameter of model state: 64 GB) so that one GPU holds it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from batchpilot.errors import BatchpilotError
from batchpilot.estimate.memory import analytic_memory
from batchpilot.estimate.overhead import OverheadModel
from batchpilot.specs.batch import BatchTriad
from batchpilot.specs.hardware import ClusterSpec, load_accelerator
from batchpilot.specs.model import ModelSpec, from_hf_config, load_model
from batchpilot.specs.settings import RunSettings

HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "gpu_memory_check.json"

#: Training steps per case: the first creates the optimizer state and warms the allocator (its peaks are reset).
STEPS = 3

#: Llama 3.2 1B (meta-llama/Llama-3.2-1B config.json; RoPE scaling left out: it changes no tensor size).
LLAMA_1B_CONFIG: dict[str, Any] = {
    "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
}

#: ``torch.cuda.get_device_name()`` words -> accelerator catalog names (first match wins).
DEVICE_NAMES = (("H200", "h200"), ("H100 NVL", "h100-nvl"), ("H100 PCIe", "h100-pcie"), ("H100", "h100-sxm"),
                ("B200", "b200"), ("A100-SXM4-80GB", "a100-80gb"), ("A100 80GB", "a100-80gb"),
                ("A100", "a100-40gb"), ("L40S", "l40s"), ("RTX 4090", "rtx-4090"))


@dataclass(frozen=True, kw_only=True, slots=True)
class Case:
    """One measurement: a model shape, its settings and the batch."""

    name: str
    model: str
    """``llama-1b`` (:data:`LLAMA_1B_CONFIG`) or a preset name."""
    micro_batch: int
    seq_len: int
    recompute: str = "none"
    recompute_every: int = 1
    compile: bool = False
    param_dtype: str = "fp32"
    """``fp32``: bf16 autocast over fp32 weights; ``bf16``: a pure bf16 module and optimizer state."""

    def settings(self) -> RunSettings:
        return RunSettings(engine="torch", precision="bf16", recompute=self.recompute,  # type: ignore[arg-type]
                           recompute_every=self.recompute_every, compile=self.compile, loss="eager",
                           param_dtype=self.param_dtype)  # type: ignore[arg-type]


#: The measurements: four policies on the 1B shape (plus compile), two on the 8B.
CASES = (
    Case(name="1b-none", model="llama-1b", micro_batch=2, seq_len=4096),
    Case(name="1b-op", model="llama-1b", micro_batch=2, seq_len=4096, recompute="op"),
    Case(name="1b-full", model="llama-1b", micro_batch=2, seq_len=4096, recompute="full"),
    Case(name="1b-full-every-2", model="llama-1b", micro_batch=2, seq_len=4096, recompute="full", recompute_every=2),
    Case(name="1b-op-every-2", model="llama-1b", micro_batch=2, seq_len=4096, recompute="op", recompute_every=2),
    Case(name="1b-none-compile", model="llama-1b", micro_batch=2, seq_len=4096, compile=True),
    Case(name="8b-op-bf16", model="llama-3.1-8b", micro_batch=1, seq_len=4096, recompute="op", param_dtype="bf16"),
    Case(name="8b-full-bf16", model="llama-3.1-8b", micro_batch=2, seq_len=4096, recompute="full",
         param_dtype="bf16"),
)


def model_spec(name: str) -> ModelSpec:
    return from_hf_config(LLAMA_1B_CONFIG, name="llama-3.2-1b-shape") if name == "llama-1b" else load_model(name)


def catalog_name(device_name: str) -> str | None:
    """The accelerator catalog name of a CUDA device name (:data:`DEVICE_NAMES`), or None."""
    return next((name for word, name in DEVICE_NAMES if word in device_name), None)


def predict(case: Case, gpu: str | None) -> dict[str, Any]:
    """The analytic memory (allocated, reserved, total) and, with a catalog GPU, the step-time model's tokens/s."""
    spec, settings = model_spec(case.model), case.settings()
    overhead = OverheadModel(optimizer_fused=True, comm_buffer_bytes=0)
    memory = analytic_memory(spec, settings, micro_batch=case.micro_batch, seq_len=case.seq_len, overhead=overhead)
    out: dict[str, Any] = {"allocated_bytes": memory.details["allocated_bytes"],
                           "reserved_bytes": memory.details["reserved_bytes"], "total_bytes": memory.total_bytes,
                           "peak_phase": memory.details["peak_phase"]}
    if gpu is not None:
        accelerator = load_accelerator(gpu)
        out["fits"] = memory.total_bytes <= accelerator.memory_bytes
        try:
            from batchpilot.estimate.steptime import StepTimeModel

            cluster = ClusterSpec(accelerator=accelerator, devices_per_node=1, num_nodes=1)
            triad = BatchTriad(micro_batch_sequences=case.micro_batch, grad_accum_steps=1, data_parallel_ranks=1,
                               seq_len_tokens=case.seq_len)
            out["tokens_per_s"] = StepTimeModel(spec, cluster, seq_len=case.seq_len).estimate(settings, triad).tokens_per_s
        except BatchpilotError as exc:
            out["tokens_per_s_refused"] = str(exc)
    return out


def measure(case: Case, steps: int = STEPS) -> dict[str, Any]:
    """Train ``steps`` steps of ``case`` on the current CUDA device; the allocator's peaks after the first."""
    import torch
    import transformers

    from batchpilot.measure.recompute import apply_recompute, checkpointed_layers

    spec = model_spec(case.model)
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**dict(spec.hf_config))
    dtype = torch.bfloat16 if case.param_dtype == "bf16" else torch.float32
    with torch.device("cuda"):
        module = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    module.train()
    apply_recompute(module, case.recompute, every=case.recompute_every)
    if case.compile:
        for layer in checkpointed_layers(module):
            layer.compile()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, spec.vocab_size, (case.micro_batch, case.seq_len), device="cuda")
    autocast = case.param_dtype == "fp32"
    times = []
    try:
        for step in range(steps):
            if step == 1:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                loss = module(input_ids=ids, labels=ids).loss
            loss.backward()
            del loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError as exc:
        return {"oom": True, "error": " ".join(str(exc).split())[:300]}
    finally:
        del optimizer, module
    tokens = case.micro_batch * case.seq_len
    return {"oom": False, "max_memory_allocated": torch.cuda.max_memory_allocated(),
            "max_memory_reserved": torch.cuda.max_memory_reserved(),
            "tokens_per_s": tokens * (len(times) - 1) / sum(times[1:]), "step_times_s": times}


def compare(case: Case, measured: dict[str, Any], predicted: dict[str, Any]) -> dict[str, Any]:
    """Relative errors (predicted / measured − 1) of allocated, reserved and tokens/s; fits vs OOM."""
    out: dict[str, Any] = {"case": asdict(case), "measured": measured, "predicted": predicted}
    if measured.get("oom"):
        out["fits_agree"] = predicted.get("fits") is False
        return out
    out["allocated_error"] = predicted["allocated_bytes"] / measured["max_memory_allocated"] - 1
    out["reserved_error"] = predicted["reserved_bytes"] / measured["max_memory_reserved"] - 1
    if "tokens_per_s" in predicted:
        out["tokens_per_s_error"] = predicted["tokens_per_s"] / measured["tokens_per_s"] - 1
    return out


def dry_run_lines(cases: tuple[Case, ...], gpu: str | None) -> list[str]:
    """What a run would measure, with the predictions (no CUDA needed)."""
    lines = [f"{len(cases)} measurements on one GPU ({gpu or 'unknown GPU: no tokens/s prediction'}), {STEPS} steps "
             f"each, peaks after the first:"]
    for case in cases:
        p = predict(case, gpu)
        tokens = f", {p['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in p else ""
        fits = "" if "fits" not in p else (" (fits)" if p["fits"] else " (predicted NOT to fit)")
        lines.append(f"  {case.name}: {case.model} micro {case.micro_batch} × seq {case.seq_len}, recompute "
                     f"{case.recompute} 1 in {case.recompute_every}, compile {case.compile}, params "
                     f"{case.param_dtype} -> predicted allocated {p['allocated_bytes'] / 2**30:.2f} GiB, reserved "
                     f"{p['reserved_bytes'] / 2**30:.2f} GiB{fits}{tokens}")
    return lines


def run(cases: tuple[Case, ...], gpu: str | None) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; use --dry-run to see the plan of measurements")
    device = torch.cuda.get_device_name()
    gpu = gpu or catalog_name(device)
    results = [compare(case, measure(case), predict(case, gpu)) for case in cases]
    return {"device": device, "catalog_gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
            "platform": platform.platform(), "steps": STEPS, "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the measurements and predictions; no GPU")
    parser.add_argument("--gpu", default=None, help="accelerator catalog name (default: from the device name)")
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    cases = CASES if args.cases is None else tuple(c for c in CASES if c.name in args.cases.split(","))
    if not cases:
        parser.error(f"--cases: none of {args.cases!r} is one of {', '.join(c.name for c in CASES)}")
    if args.dry_run:
        print("\n".join(dry_run_lines(cases, args.gpu or "h100-sxm")))
        return 0
    record = run(cases, args.gpu)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    for r in record["results"]:
        name = r["case"]["name"]
        if r["measured"].get("oom"):
            print(f"{name}: out of memory (predicted fits: {r['predicted'].get('fits')})")
        else:
            print(f"{name}: allocated {r['allocated_error']:+.1%}, reserved {r['reserved_error']:+.1%}"
                  + (f", tokens/s {r['tokens_per_s_error']:+.1%}" if "tokens_per_s_error" in r else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
