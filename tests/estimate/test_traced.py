"""Traced estimate against real CPU steps (torch profiler), and its FLOPs against the spec's formula.

The reference numbers are measurements: :func:`measure_cpu_step_peak` runs the same step
(:mod:`batchpilot.measure.step`: module, optimizer, autocast, loss) for two real iterations and reads the CPU
allocator's peak from the profiler.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from batchpilot.errors import SpecError
from batchpilot.measure.cpu_peak import measure_cpu_step_peak
from batchpilot.measure.step import OptimizerImpl
from batchpilot.measure.traced import (
    CudaTerms,
    _global_peak_tracker,
    _tracked_rng_states,
    _unpacked_rows,
    check_traceable,
    peak_error,
    trace_step,
    traced_flops,
    traced_memory,
)
from batchpilot.specs.model import load_model
from batchpilot.specs.settings import RunSettings

TOLERANCE = 0.02  # the acceptance bound: traced peak within 2 % of the measured allocator peak


def _assert_matches(preset: str, settings: RunSettings, micro_batch: int, seq_len: int, *,
                    optimizer_impl: OptimizerImpl | None = None) -> None:
    spec = load_model(preset)
    traced = trace_step(spec, settings, micro_batch=micro_batch, seq_len=seq_len, optimizer_impl=optimizer_impl,
                        count_flops=False).memory
    measured = measure_cpu_step_peak(spec, settings, micro_batch=micro_batch, seq_len=seq_len,
                                     optimizer_impl=optimizer_impl)
    error = peak_error(traced.total_bytes, measured)
    assert abs(error) <= TOLERANCE, f"{preset} b={micro_batch} {settings}: traced {traced.total_bytes} vs {measured}"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("micro_batch", [1, 4])
def test_tiny_1m_peak_matches_real_cpu_step(precision: str, micro_batch: int) -> None:
    _assert_matches("tiny-llama-1m", RunSettings(precision=precision), micro_batch, 128)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("micro_batch", [1, 4])
def test_tiny_15m_peak_matches_real_cpu_step(precision: str, micro_batch: int) -> None:
    _assert_matches("tiny-llama-15m", RunSettings(precision=precision), micro_batch, 128)


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings",
    [
        RunSettings(precision="bf16", attention="eager"),
        RunSettings(precision="fp16"),
        RunSettings(precision="bf16", recompute="full"),
        RunSettings(precision="fp32", attention="eager", recompute="selective"),
        RunSettings(precision="bf16", recompute="selective"),
        RunSettings(precision="fp32", optimizer="sgd-momentum"),
    ],
    ids=["eager", "fp16", "full-recompute", "selective-eager", "selective-flash", "sgd"],
)
def test_settings_variants_match_real_cpu_step(settings: RunSettings) -> None:
    _assert_matches("tiny-llama-1m", settings, 1, 128)


#: Bytes the trace may differ from the allocator under checkpointing. The allocations it does not replay are
#: the scalars of ``transformers``' value checks that fake tensors cannot answer (``(mask[:, -1] == 0).all()``:
#: micro-batch + 1 bytes, freed before the first layer runs), so they never sit at the peak: measured 0 bytes
#: for none/op/full, every 1 and 2, fp32 and bf16 autocast, micro-batch 4 and 32, sequence 64 and 512.
#: (Before the trace took the real step's mask path and counted checkpointing's RNG states: +3.5 % … +20.1 %.)
RECOMPUTE_TOLERANCE_BYTES = 16


@pytest.mark.parametrize(
    ("precision", "recompute", "every"),
    [("fp32", "full", 1), ("fp32", "op", 1), ("bf16", "full", 2), ("bf16", "op", 2)],
)
def test_recompute_peak_equals_real_cpu_step(precision: str, recompute: str, every: int) -> None:
    """Checkpointed layers: the trace builds no packed-sequence mask (the real step finds one document per
    row) and counts the CPU RNG state each checkpointed layer stashes, so it lands on the allocator's peak."""
    spec = load_model("tiny-llama-1m")
    settings = RunSettings(precision=precision, attention="flash", recompute=recompute,  # type: ignore[arg-type]
                           recompute_every=every)
    traced = traced_memory(spec, settings, micro_batch=4, seq_len=64).total_bytes
    measured = measure_cpu_step_peak(spec, settings, micro_batch=4, seq_len=64)
    assert abs(traced - measured) <= RECOMPUTE_TOLERANCE_BYTES, f"{settings}: traced {traced} vs {measured}"


def test_rng_state_stashed_by_checkpointing_is_tracked_until_dropped() -> None:
    """``torch.get_rng_state()`` allocates a real CPU tensor without a dispatched op (so MemTracker alone never
    sees it); non-reentrant checkpointing keeps one per checkpointed layer until its recomputation."""
    import torch
    from torch.distributed._tools import mem_tracker

    def total(tracker: Any) -> int:
        return sum(snap["Total"] for snap in tracker.get_tracker_snapshot().values())

    tracker = _global_peak_tracker(mem_tracker)
    original = torch.get_rng_state
    with _tracked_rng_states(tracker), tracker:
        start = total(tracker)
        state = torch.get_rng_state()
        held = total(tracker)
        del state
        dropped = total(tracker)
    assert torch.get_rng_state is original
    assert (held - start, dropped - start) == (original().nbytes, 0)


def test_fake_tensors_take_the_real_steps_unpacked_mask_path() -> None:
    """``transformers``' packed-sequence check reads values: under fake tensors it answers "packed" (a tensor),
    which builds a b×1×s×s mask; the trace answers ``None``, as the check does for the step's real ids."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import masking_utils

    positions = torch.arange(64).expand(4, -1)
    assert masking_utils.find_packed_sequence_indices(positions) is None  # real tensors: one document per row
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake_positions = torch.arange(64).expand(4, -1)
        assert masking_utils.find_packed_sequence_indices(fake_positions) is not None
        with _unpacked_rows():
            assert masking_utils.find_packed_sequence_indices(fake_positions) is None


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_foreach_optimizer_peak_matches_real_cpu_step(precision: str) -> None:
    """The multi-tensor AdamW (torch's CUDA default) forced on CPU: its whole-model step temporaries too."""
    _assert_matches("tiny-llama-1m", RunSettings(precision=precision), 1, 128, optimizer_impl="foreach")


def test_breakdown_categories_are_model_states_and_activations() -> None:
    """fp32 AdamW: weights 4Ψ; optimizer 8Ψ (m and v) + one fp32 ``step`` scalar per parameter tensor."""
    spec = load_model("tiny-llama-1m")
    result = trace_step(spec, RunSettings(precision="fp32"), micro_batch=2, seq_len=64, count_flops=False)
    memory, details = result.memory, result.memory.details
    tensors = spec.num_layers * (4 + 3 + 2) + 3  # per layer q,k,v,o, gate,up,down, 2 norms; embed, norm, head
    assert details["weights.parameters"] == 4 * spec.params_total
    assert memory.optimizer_bytes == 8 * spec.params_total + 4 * tensors
    assert details["overhead.inputs"] == 8 * 2 * 64  # the int64 ids
    assert memory.total_bytes == sum(v for v in details.values())
    assert result.category_max_bytes["gradients.parameters"] == 4 * spec.params_total
    assert memory.activations_bytes > 0


def test_flops_equal_spec_formula_with_eager_attention() -> None:
    """Eager attention is plain matmuls: FlopCounterMode's count is 6·N_matmul + attention, the spec's."""
    spec = load_model("tiny-llama-1m")
    flops = traced_flops(spec, RunSettings(precision="bf16", attention="eager"), micro_batch=2, seq_len=128)
    assert flops == spec.flops_per_token(128) * 2 * 128


def test_flops_count_cpu_flash_attention_with_its_score_recompute() -> None:
    """The registered CPU flash formulas: forward QKᵀ and PV, backward 5 score-sized matmuls instead of 4,
    so 2·b·h·s²·d per layer above the spec's 3× forward (FlopCounterMode would count 0 without them)."""
    spec = load_model("tiny-llama-1m")
    b, s = 2, 128
    flops = traced_flops(spec, RunSettings(precision="bf16", attention="flash"), micro_batch=b, seq_len=s)
    recompute = 2 * b * spec.num_heads * s * s * spec.head_dim_qk * spec.num_layers
    assert flops == spec.flops_per_token(s) * b * s + recompute


def test_full_recompute_costs_one_more_layer_forward_up_to_the_last_saved_tensor() -> None:
    """Checkpointed layers run their forward again in backward, except the output head (outside the
    layers) and each layer's ``down_proj``: non-reentrant checkpointing stops recomputing once every
    tensor backward needs exists, and ``down_proj``'s output is only added to the residual stream."""
    spec = load_model("tiny-llama-1m")
    s = 64
    base = traced_flops(spec, RunSettings(attention="eager"), micro_batch=1, seq_len=s)
    full = traced_flops(spec, RunSettings(attention="eager", recompute="full"), micro_batch=1, seq_len=s)
    head = 3 * 2 * spec.hidden_size * spec.vocab_size * s
    down_proj = 2 * spec.intermediate_size * spec.hidden_size * s * spec.num_layers
    assert full == base + (base - head) // 3 - down_proj


def test_recompute_settings_order_activation_memory() -> None:
    """none > selective > full in activation bytes, and selective drops eager attention's s×s scores."""
    spec = load_model("tiny-llama-1m")
    acts = {rc: traced_memory(spec, RunSettings(attention="eager", recompute=rc), micro_batch=1,  # type: ignore[arg-type]
                              seq_len=256).activations_bytes for rc in ("none", "selective", "full")}
    assert acts["none"] > acts["selective"] > acts["full"]
    scores_per_layer = spec.num_heads * 256 * 256 * 2  # one bf16 score matrix per layer, micro-batch 1
    assert acts["none"] - acts["selective"] > spec.num_layers * scores_per_layer


def test_cuda_target_adds_explicit_terms_and_rounds_blocks() -> None:
    spec = load_model("tiny-llama-1m")
    settings = RunSettings(precision="bf16")
    cpu = traced_memory(spec, settings, micro_batch=1, seq_len=64)
    terms = CudaTerms()
    cuda = trace_step(spec, settings, micro_batch=1, seq_len=64, target="cuda", count_flops=False,
                      cuda_terms=terms).memory
    assert cuda.details["overhead.cuda_context"] == terms.context_bytes
    assert cuda.details["overhead.cublas_workspace"] == terms.cublas_workspace_bytes
    allocated = cuda.total_bytes - sum(v for k, v in cuda.details.items() if k.startswith("overhead.cu"))
    assert cuda.details["overhead.cuda_fragmentation_allowance"] == round(allocated * 0.05)
    # 512-byte blocks: every storage is a multiple of 512, so every traced category is too.
    assert cuda.details["weights.parameters"] % 512 == 0
    assert allocated > cpu.total_bytes
    assert cuda.optimizer_bytes >= cpu.optimizer_bytes  # the same fused AdamW state, in 512-byte blocks


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"precision": "fp8"}, "fp8"),
        ({"optimizer": "adamw-8bit"}, "adamw-8bit"),
        ({"optimizer": "adafactor"}, "adafactor"),
        ({"engine": "deepspeed"}, "--engine"),
        ({"zero_stage": 3, "engine": "fsdp2"}, "--zero"),
        ({"tp": 2}, "--tp"),
    ],
)
def test_untraceable_settings_are_one_line_errors(changes: dict[str, object], message: str) -> None:
    settings = dataclasses.replace(RunSettings(), **changes)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match=message) as info:
        check_traceable(load_model("tiny-llama-1m"), settings, micro_batch=1, seq_len=64)
    assert "\n" not in str(info.value) and "--method analytic" in str(info.value)


def test_bad_sizes_are_errors() -> None:
    spec = load_model("tiny-llama-1m")
    with pytest.raises(SpecError, match="--micro-batch 0"):
        traced_memory(spec, RunSettings(), micro_batch=0, seq_len=64)
    with pytest.raises(SpecError, match="exceeds the 1024 positions"):
        traced_memory(spec, RunSettings(), micro_batch=1, seq_len=4096)
    with pytest.raises(SpecError, match="target"):
        traced_memory(spec, RunSettings(), micro_batch=1, seq_len=64, target="tpu")  # type: ignore[arg-type]


@pytest.mark.slow
def test_7b_shape_traces_without_real_memory() -> None:
    """Two Llama-2-7B layers at sequence 2048: fake tensors, so the process grows by far less than the
    ~1 GiB of fp32 weights + 2 GiB of AdamW state the trace reports."""
    import resource

    spec = load_model("llama-2-7b")
    two_layers = dataclasses.replace(spec, num_layers=2,
                                     hf_config={**spec.hf_config, "num_hidden_layers": 2})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    memory = traced_memory(two_layers, RunSettings(precision="bf16"), micro_batch=1, seq_len=2048)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert memory.details["weights.parameters"] == 4 * two_layers.params_total
    assert grown < memory.total_bytes / 4


def test_memory_cli_traced_method(cli_runner: Any) -> None:
    """``batchpilot memory --method traced --json`` reports the CUDA-target trace in the memory contract."""
    from batchpilot.cli import app

    args = ["memory", "--model", "tiny-llama-1m", "--gpu", "h100-sxm", "--seq-len", "64", "--micro-batch", "1",
            "--method", "traced", "--precision", "fp32", "--json"]
    result = cli_runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    expected = traced_memory(load_model("tiny-llama-1m"), RunSettings(precision="fp32"), micro_batch=1,
                             seq_len=64, target="cuda")
    assert record["method"] == "traced"
    assert record["memory"] == expected.to_dict()
    refused = cli_runner.invoke(app, [*args[:-1], "--engine", "deepspeed"])
    assert refused.exit_code == 2
    assert "--method analytic" in refused.stderr and refused.stderr.count("\n") == 1


def test_cuda_target_keeps_attention_dropout_inside_the_flash_kernel() -> None:
    """GPT-2 has attn_pdrop 0.1: CPU SDPA then runs the math kernel (s×s tensors saved, FLOPs = plain
    matmuls); the CUDA target traces FlashAttention's in-kernel dropout as the CPU flash kernel."""
    spec = load_model("gpt2")
    small = dataclasses.replace(spec, num_layers=1, hf_config={**spec.hf_config, "n_layer": 1})
    s, heads = 256, small.num_heads
    cpu = trace_step(small, RunSettings(precision="fp32"), micro_batch=1, seq_len=s)
    cuda = trace_step(small, RunSettings(precision="fp32"), micro_batch=1, seq_len=s, target="cuda",
                      cuda_terms=CudaTerms(block_bytes=1, context_bytes=0, cublas_workspace_bytes=0,
                                           fragmentation_fraction=0.0))
    assert cpu.flops == small.flops_per_token(s) * s  # math kernel: 4 score-sized matmuls in backward
    assert cuda.flops == cpu.flops + 2 * heads * s * s * small.head_dim_qk  # flash: 5, the scores recomputed
    saved = "activations.saved_and_forward"  # (this one-layer model peaks at its 50k-vocab logits instead)
    assert cpu.category_max_bytes[saved] - cuda.category_max_bytes[saved] > heads * s * s * 4  # fp32 scores
