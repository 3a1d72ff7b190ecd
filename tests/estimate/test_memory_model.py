"""Behaviour of the analytic memory model: each setting moves the term it should, by the derived amount."""

from __future__ import annotations

import pytest

from batchpilot.errors import SpecError
from batchpilot.estimate.activations import activation_terms, logits_terms
from batchpilot.estimate.memory import analytic_memory, max_micro_batch
from batchpilot.estimate.model_states import model_state_bytes
from batchpilot.estimate.overhead import OverheadModel
from batchpilot.specs.model import load_model
from batchpilot.specs.settings import RunSettings
from batchpilot.units import GIB

LLAMA = load_model("llama-3-8b")
TINY = load_model("tiny-llama-1m")
BF16 = RunSettings(precision="bf16", engine="fsdp2", zero_stage=3)
NO_OVERHEAD = OverheadModel.zero()


def _mem(model=LLAMA, settings=BF16, **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("micro_batch", 1)
    kw.setdefault("seq_len", 4096)
    kw.setdefault("dp", 8)
    kw.setdefault("overhead", NO_OVERHEAD)
    return analytic_memory(model, settings, **kw)


def _with(**changes: object) -> RunSettings:
    return RunSettings(**{**BF16.to_dict(), **changes})


def test_categories_sum_to_total_and_json_keys() -> None:
    m = _mem(overhead=OverheadModel())
    record = m.to_dict()
    assert set(record) >= {"weights", "gradients", "optimizer", "activations", "overhead", "total"}
    assert record["total"] == sum(record[k] for k in ("weights", "gradients", "optimizer", "activations",
                                                     "overhead"))
    assert m.details["activations_peak"] == m.activations_bytes > 0


def test_activations_linear_in_micro_batch() -> None:
    a1, a4 = _mem(micro_batch=1).activations_bytes, _mem(micro_batch=4).activations_bytes
    assert a4 == pytest.approx(4 * a1, rel=1e-6)


def test_zero_stages_decrease_model_states() -> None:
    totals = [model_state_bytes(_with(zero_stage=z), params=8e9, dp=8).total_bytes for z in (0, 1, 2, 3)]
    assert totals == sorted(totals, reverse=True)
    assert totals[3] == pytest.approx(totals[0] / 8)


def test_hybrid_shard_shards_within_a_node_only() -> None:
    full = model_state_bytes(_with(zero_stage=3), params=8e9, dp=64)
    hybrid = model_state_bytes(_with(zero_stage=3, hybrid_shard=True), params=8e9, dp=64, shard=8)
    assert hybrid.total_bytes == pytest.approx(8 * full.total_bytes)
    assert _mem(settings=_with(hybrid_shard=True), dp=64).weights_bytes == pytest.approx(
        _mem(dp=8).weights_bytes, rel=1e-6)


def test_offload_moves_optimizer_states_off_the_gpu() -> None:
    assert _mem(settings=_with(offload=True)).optimizer_bytes == 0
    assert _mem().optimizer_bytes > 0


def test_tensor_parallel_divides_inner_activations_sequence_parallel_the_rest() -> None:
    base = sum(activation_terms(LLAMA, BF16, seq_len=4096).values())
    tp = sum(activation_terms(LLAMA, _with(tp=8), seq_len=4096).values())
    tp_sp = sum(activation_terms(LLAMA, _with(tp=8, sp=True), seq_len=4096).values())
    assert base > tp > tp_sp
    assert tp_sp == pytest.approx(base / 8, rel=1e-6)  # 8 kv heads split evenly: everything divides by 8


def test_recompute_full_keeps_the_layer_input_only() -> None:
    terms = activation_terms(LLAMA, _with(recompute="full"), seq_len=4096)
    assert terms == {"layer_input": LLAMA.hidden_size * 2}
    full = _mem(settings=_with(recompute="full"))
    none = _mem()
    assert full.details["activations_layers"] == pytest.approx(
        LLAMA.num_layers * 4096 * LLAMA.hidden_size * 2, rel=1e-6)
    assert full.activations_bytes < none.activations_bytes
    assert full.details["activations_recompute_working_layer"] > 0


def test_eager_attention_adds_s_squared_terms_selective_removes_them() -> None:
    eager = activation_terms(LLAMA, _with(attention="eager"), seq_len=4096)
    selective = activation_terms(LLAMA, _with(attention="eager", recompute="selective"), seq_len=4096)
    flash = activation_terms(LLAMA, BF16, seq_len=4096)
    # fp32 softmax (HF eager) + its bf16 cast: a·s·(4 + 2) bytes per token
    assert eager["attn_softmax_fp32"] + eager["attn_probs_cast"] == LLAMA.num_heads * 4096 * 6
    assert "attn_softmax_fp32" not in selective and "attn_softmax_fp32" not in flash
    # flash keeps GQA-sized K/V; eager repeats them to every head
    assert flash["attn_k"] * LLAMA.num_heads == eager["attn_k"] * LLAMA.num_kv_heads


def test_swiglu_saves_four_intermediate_tensors() -> None:
    terms = activation_terms(LLAMA, BF16, seq_len=4096)
    assert terms["mlp"] == 4 * LLAMA.intermediate_size * 2


def test_logits_at_large_vocabulary() -> None:
    """fp32 log-softmax + nll gradient + log-softmax gradient: 12 bytes per token per vocabulary entry,
    plus the final RMSNorm (normalised + output in bf16, fp32 rstd)."""
    per_token = LLAMA.vocab_size * 12 + 2 * LLAMA.hidden_size * 2 + 4
    assert sum(logits_terms(LLAMA, BF16).values()) == per_token
    m = _mem(seq_len=8192)
    assert m.details["activations_logits_loss"] == 8192 * per_token


def test_pipeline_first_stage_holds_micro_batches_in_flight() -> None:
    settings = RunSettings(engine="megatron", precision="bf16", pp=4, zero_stage=1)
    assert _mem(settings=settings, grad_accum=8).details["activations_layers"] == pytest.approx(
        4 * _mem(settings=settings, grad_accum=1).details["activations_layers"], rel=1e-6)


def test_expert_parallel_splits_routed_experts() -> None:
    mixtral = load_model("mixtral-8x7b")
    s1 = RunSettings(engine="megatron", precision="bf16", zero_stage=1)
    s8 = RunSettings(engine="megatron", precision="bf16", zero_stage=1, ep=8)
    w1 = _mem(mixtral, s1, dp=8).weights_bytes
    w8 = _mem(mixtral, s8, dp=8).weights_bytes
    routed = mixtral.num_moe_layers * mixtral.num_experts * mixtral.params_expert
    assert w1 - w8 == pytest.approx(2 * routed * (1 - 1 / 8), rel=1e-6)


def test_mla_counts_the_latent_kv() -> None:
    v3 = load_model("deepseek-v3")
    terms = activation_terms(v3, RunSettings(engine="megatron", precision="bf16"), seq_len=4096, moe_layer=True)
    assert terms["mla_kv_latent_norm"] == pytest.approx(2 * v3.kv_lora_rank * 2 + 4)
    assert terms["moe_experts"] == v3.num_experts_per_token * 4 * v3.moe_intermediate_size * 2


def test_overhead_terms() -> None:
    no_gather = _with(zero_stage=2)
    bare = _mem(settings=no_gather, dp=1, overhead=OverheadModel.zero())
    gpu = _mem(settings=no_gather, dp=1, overhead=OverheadModel(fragmentation_fraction=0.1))
    peak = max(bare.details["fwd_bwd_peak"], bare.details["optimizer_step_peak"])
    expected = OverheadModel().cuda_context_bytes + OverheadModel().workspace_bytes + 0.1 * peak
    assert gpu.total_bytes - bare.total_bytes == pytest.approx(expected, rel=1e-6)
    multi = _mem(dp=8, overhead=OverheadModel(fragmentation_fraction=0.0, gather_layers=0))
    single_rank_overheads = OverheadModel().cuda_context_bytes + OverheadModel().workspace_bytes
    assert multi.overhead_bytes == single_rank_overheads + OverheadModel().comm_buffer_bytes
    assert OverheadModel.cpu().cuda_context_bytes == 0


def test_optimizer_step_can_be_the_peak() -> None:
    """At a tiny micro-batch the AdamW step (weights + grads + states + one state-sized temporary) wins."""
    m = analytic_memory(TINY, RunSettings(precision="fp32"), micro_batch=1, seq_len=8,
                        overhead=OverheadModel.cpu(optimizer_foreach=True))
    n = TINY.params_total
    assert m.total_bytes == pytest.approx((4 + 4 + 8 + 4) * n, rel=1e-6)
    assert m.activations_bytes == 0 and m.details["activations_peak"] > 0
    assert m.details["peak_phase"] == 2


def test_per_tensor_loop_optimizer_transient() -> None:
    """torch's CPU default (foreach=False): two fp32 temporaries of the largest tensor, here the 8192 × 384
    output head of tiny-llama-15m — measured 25.17 MB above weights + gradients + states
    (benchmarks/cpu_step.py, foreach=False)."""
    small = load_model("tiny-llama-15m")
    m = analytic_memory(small, RunSettings(precision="fp32"), micro_batch=1, seq_len=8,
                        overhead=OverheadModel.cpu())
    assert m.details["optimizer_step_transient"] == 2 * 4 * 8192 * 384
    assert m.details["optimizer_step_transient"] == pytest.approx(25.17e6, rel=0.01)


def test_max_micro_batch_is_the_largest_that_fits() -> None:
    budget = 70 * GIB
    best = max_micro_batch(LLAMA, BF16, seq_len=4096, dp=8, budget_bytes=budget)
    assert best >= 1
    assert _mem(micro_batch=best, overhead=OverheadModel()).total_bytes <= budget
    assert _mem(micro_batch=best + 1, overhead=OverheadModel()).total_bytes > budget
    assert max_micro_batch(LLAMA, BF16, seq_len=4096, dp=8, budget_bytes=GIB) == 0
    assert max_micro_batch(TINY, RunSettings(precision="fp32"), seq_len=8, budget_bytes=10**15, limit=64) == 64


@pytest.mark.parametrize(
    ("settings", "kw", "needle"),
    [
        (RunSettings(tp=3), {}, "--tp 3 does not divide the 32 attention heads"),
        (RunSettings(pp=64), {}, "--pp 64 exceeds the 32 layers"),
        (RunSettings(), {"micro_batch": -1}, "--micro-batch -1 must be a positive integer"),
        (RunSettings(), {"seq_len": 0}, "--seq-len 0 must be a positive integer"),
        (RunSettings(), {"dp": 0}, "--dp 0 must be a positive integer"),
    ],
)
def test_bad_settings_are_one_line_errors(settings: RunSettings, kw: dict[str, int], needle: str) -> None:
    args = {"micro_batch": 1, "seq_len": 128, **kw}
    with pytest.raises(SpecError) as info:
        analytic_memory(LLAMA, settings, micro_batch=args["micro_batch"], seq_len=args["seq_len"],
                        dp=args.get("dp", 1))
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_ep_larger_than_dp_is_rejected() -> None:
    mixtral = load_model("mixtral-8x7b")
    with pytest.raises(SpecError, match="--ep 8 must divide the 2 data-parallel ranks"):
        analytic_memory(mixtral, RunSettings(ep=8), micro_batch=1, seq_len=128, dp=2)
    with pytest.raises(SpecError, match="--ep 4 must divide the 6 data-parallel ranks"):
        analytic_memory(mixtral, RunSettings(ep=4), micro_batch=1, seq_len=128, dp=6)


def test_overhead_model_validation() -> None:
    with pytest.raises(SpecError, match="fragmentation_fraction"):
        OverheadModel(fragmentation_fraction=1.5)
    with pytest.raises(SpecError, match="cuda_context_bytes"):
        OverheadModel(cuda_context_bytes=-1)


def test_bad_dropout_field_is_a_one_line_error() -> None:
    from batchpilot.specs.model import from_hf_config

    spec = from_hf_config({"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 128,
                           "vocab_size": 100, "attn_pdrop": "high"}, name="bad-gpt")
    with pytest.raises(SpecError, match="field 'attn_pdrop' must be a dropout probability"):
        analytic_memory(spec, RunSettings(), micro_batch=1, seq_len=64)


def test_config_fields_outside_the_spec_equality_are_not_cached_away() -> None:
    """Two GPT configs that differ only in dropout compare equal as ModelSpecs; the cache must not mix them."""
    from batchpilot.specs.model import from_hf_config

    shape = {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 128, "vocab_size": 100}
    with_dropout = from_hf_config(shape, name="gpt")
    without = from_hf_config({**shape, "resid_pdrop": 0.0, "attn_pdrop": 0.0, "embd_pdrop": 0.0}, name="gpt")
    assert with_dropout == without
    settings = RunSettings(attention="eager")
    a = analytic_memory(with_dropout, settings, micro_batch=1, seq_len=64).details["activations_peak"]
    b = analytic_memory(without, settings, micro_batch=1, seq_len=64).details["activations_peak"]
    assert a > b


def test_fsdp2_shard_grad_op_keeps_unsharded_compute_copies() -> None:
    """FSDP2 with reshard_after_forward=False (--zero 2): fp32 params sharded, bf16 unsharded copies kept."""
    states = model_state_bytes(RunSettings(engine="fsdp2", precision="bf16", zero_stage=2), params=8e9, dp=8)
    assert states.weights_bytes == pytest.approx(4 * 8e9 / 8)
    assert states.compute_copies_bytes == pytest.approx(2 * 8e9)
    full = model_state_bytes(RunSettings(engine="fsdp2", precision="bf16", zero_stage=3), params=8e9, dp=8)
    assert full.compute_copies_bytes == 0  # ZeRO-3 gathers one layer at a time (overhead: zero3_gather_buffer)
