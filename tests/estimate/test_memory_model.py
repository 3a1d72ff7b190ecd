"""Behaviour of the analytic memory model: each setting moves the term it should, by the derived amount."""

from __future__ import annotations

import dataclasses

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
    return dataclasses.replace(BF16, **changes)  # type: ignore[arg-type]


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
    megatron = RunSettings(engine="megatron", precision="bf16", zero_stage=1)
    base = sum(activation_terms(LLAMA, megatron, seq_len=4096).values())
    tp = sum(activation_terms(LLAMA, dataclasses.replace(megatron, tp=8), seq_len=4096).values())
    tp_sp = sum(activation_terms(LLAMA, dataclasses.replace(megatron, tp=8, sp=True), seq_len=4096).values())
    assert base > tp > tp_sp
    assert tp_sp == pytest.approx(base / 8, rel=1e-6)  # 8 kv heads split evenly: everything divides by 8
    # torchtitan's SP all-gathers the norm outputs to the full sequence and the matmuls save them: 2 × 2h per token
    titan = sum(activation_terms(LLAMA, _with(tp=8, sp=True), seq_len=4096).values())
    titan_base = sum(activation_terms(LLAMA, BF16, seq_len=4096).values())
    assert titan == pytest.approx(titan_base / 8 + 2 * 2 * H * (1 - 1 / 8), rel=1e-6)


def test_recompute_full_keeps_the_layer_input_only() -> None:
    terms = activation_terms(LLAMA, _with(recompute="full"), seq_len=4096)
    assert terms == {"layer_input": LLAMA.hidden_size * 2}
    full = _mem(settings=_with(recompute="full"))
    none = _mem()
    assert full.details["activations_layers"] == pytest.approx(
        LLAMA.num_layers * 4096 * LLAMA.hidden_size * 2, rel=1e-6)
    assert full.activations_bytes < none.activations_bytes
    # the layer being back-propagated recomputes its whole no-recompute set (plus gradient temporaries)
    none_layer = sum(activation_terms(LLAMA, BF16, seq_len=4096).values())
    assert full.details["activations_layer_backward_working"] >= none_layer * 4096


def test_eager_attention_adds_s_squared_terms_selective_removes_them() -> None:
    hf = RunSettings(precision="bf16", engine="deepspeed", zero_stage=3)
    eager = activation_terms(LLAMA, dataclasses.replace(hf, attention="eager"), seq_len=4096)
    selective = activation_terms(LLAMA, dataclasses.replace(hf, attention="eager", recompute="selective"),
                                 seq_len=4096)
    flash = activation_terms(LLAMA, hf, seq_len=4096)
    # fp32 softmax (HF eager) + its bf16 cast: a·s·(4 + 2) bytes per token
    assert eager["attn_softmax_fp32"] + eager["attn_probs_cast"] == LLAMA.num_heads * 4096 * 6
    assert "attn_softmax_fp32" not in selective and "attn_softmax_fp32" not in flash
    # HF SDPA keeps GQA-sized K/V (enable_gqa); eager repeats them to every head, as torchtitan does before SDPA
    assert flash["attn_k"] * LLAMA.num_heads == eager["attn_k"] * LLAMA.num_kv_heads
    titan = activation_terms(LLAMA, BF16, seq_len=4096)
    assert titan["attn_k"] == eager["attn_k"]


def test_swiglu_saves_four_intermediate_tensors() -> None:
    terms = activation_terms(LLAMA, BF16, seq_len=4096)
    assert terms["mlp"] == 4 * LLAMA.intermediate_size * 2


def test_logits_at_large_vocabulary() -> None:
    """fp32 log-softmax + nll gradient + log-softmax gradient: 12 bytes per token per vocabulary entry,
    plus torchtitan's final RMSNorm on a bf16 input: the fp32 copy, the bf16 normalised tensor and output,
    fp32 rstd — 8h + 4 (torchtitan/models/llama/model.py @ 9dec370a)."""
    per_token = LLAMA.vocab_size * 12 + 8 * LLAMA.hidden_size + 4
    assert sum(logits_terms(LLAMA, BF16).values()) == per_token
    m = _mem(seq_len=8192)
    assert m.details["activations_logits_loss"] == 8192 * per_token


def test_pipeline_first_stage_holds_micro_batches_in_flight() -> None:
    """1F1B: the first stage holds min(pp, m) = 4 micro-batches' saved tensors, 3 of them besides the current."""
    settings = RunSettings(engine="megatron", precision="bf16", pp=4, zero_stage=1)
    one = _mem(settings=settings, grad_accum=1).details
    eight = _mem(settings=settings, grad_accum=8).details
    assert "activations_other_micro_batches" not in one
    assert eight["activations_other_micro_batches"] == pytest.approx(3 * one["activations_layers"], rel=1e-6)


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
    # Megatron's fused SwiGLU: fc1's 2I-wide output + fc2's input, 3 I-wide bf16 tensors per routed copy
    assert terms["moe_experts"] == v3.num_experts_per_token * 3 * v3.moe_intermediate_size * 2


def test_reserved_and_outside_allocator_terms() -> None:
    """total = reserved + what lives outside the caching allocator (CUDA context, NCCL buffers per
    communicator: dp 8 opens one); reserved = allocated + the structural slack (FSDP2's stream pools, the
    freed logits, one layer's forward transients); on a CPU all three are the allocated peak."""
    gpu = _mem(overhead=OverheadModel())
    d = gpu.details
    assert gpu.total_bytes == d["reserved_bytes"] + d["outside_allocator_bytes"]
    assert d["outside_allocator_bytes"] == OverheadModel().cuda_context_bytes + OverheadModel().comm_buffer_bytes
    assert d["reserved_bytes"] == pytest.approx(d["allocated_bytes"] + d["allocator_slack"], abs=2)
    # the reduce-scatter pool holds the sharded fp32 gradients (4 bytes / param / 8 ranks)
    assert d["fsdp_stream_pools"] > 4 * LLAMA.params_total / 8
    cpu = _mem(overhead=OverheadModel.cpu())
    assert cpu.total_bytes == cpu.details["allocated_bytes"] == cpu.details["reserved_bytes"]
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


# ------------------------------------------------------------------------------------------ policies by engine
LLAMA31 = load_model("llama-3.1-8b")
H, KD, FFN, A = 4096, 1024, 14336, 32  # Llama 3.1 8B: hidden, K/V width (8 heads × 128), FFN, query heads


def _per_token(**settings: object) -> float:
    return sum(activation_terms(LLAMA31, RunSettings(**settings), seq_len=8192).values())  # type: ignore[arg-type]


def test_torchtitan_per_op_checkpointing_saves_every_other_matmul() -> None:
    """torchtitan's per-op policy (parallelize_llama.py @ 9dec370a): of wq, wk, wv, wo, w1, w3, w2 the odd ones are
    saved, plus SDPA's output and log-sum-exp and the block input: 8h + 2kd + 2I + 4a; compiled, w2's output is
    not needed by backward and is not stored: 6h + 2kd + 2I + 4a."""
    assert _per_token(engine="fsdp2", recompute="op") == 8 * H + 2 * KD + 2 * FFN + 4 * A == 63_616
    assert _per_token(engine="fsdp2", recompute="op", compile=True) == 6 * H + 2 * KD + 2 * FFN + 4 * A == 55_424


def test_per_op_checkpointing_with_tensor_and_sequence_parallelism() -> None:
    """With TP + SP the row-parallel w2 output is a full-size partial sum (saved, not ÷ t) and both
    reduce-scatter outputs are saved (the collective is in the save list); compiled, w2's mm and reduce-scatter
    outputs go."""
    t = 8
    eager = 2 * H / t + 2 * H / t + 2 * KD / t + (2 * H + 4 * A) / t + 2 * FFN / t + 2 * H + 2 * 2 * H / t
    assert _per_token(engine="fsdp2", recompute="op", tp=t, sp=True) == pytest.approx(eager)
    compiled = 2 * H / t + 2 * H / t + 2 * KD / t + (2 * H + 4 * A) / t + 2 * FFN / t + 2 * H / t
    assert _per_token(engine="fsdp2", recompute="op", tp=t, sp=True, compile=True) == pytest.approx(compiled)


def test_block_without_recomputation_per_engine() -> None:
    """torchtitan (fp32 RMSNorm copies, repeat_kv before SDPA; the SDPA output is also wo's input): 24h + 8I + 4a + 8;
    compiled (measured on CPU: block input, five h-wide, K/V, lse, rstd, gate/up/product): 12h + 4kd + 6I + 4a + 8;
    Megatron + TE (LayerNormLinear input/ln_out/rsigma, fused SwiGLU): 12h + 4kd + 6I + 4a + 8, in fp8 (ln_out and
    fc2/proj inputs in fp8) 11h + 4kd + 5I + 4a + 8."""
    assert _per_token(engine="fsdp2") == 24 * H + 8 * FFN + 4 * A + 8
    assert _per_token(engine="fsdp2", compile=True) == 12 * H + 4 * KD + 6 * FFN + 4 * A + 8
    assert _per_token(engine="megatron") == 12 * H + 4 * KD + 6 * FFN + 4 * A + 8
    assert _per_token(engine="megatron", precision="fp8") == 11 * H + 4 * KD + 5 * FFN + 4 * A + 8
    # a Hugging Face block in pure bf16 (DeepSpeed): fp32 norm copies, GQA-sized K/V under SDPA
    assert _per_token(engine="deepspeed") == 20 * H + 4 * KD + 8 * FFN + 4 * A + 8


def test_recompute_every_checkpoints_one_layer_in_n() -> None:
    """torchtitan's integer selective_ac_option: layers N, 2N, ... full-AC, the others keep everything."""
    settings = _with(recompute="full", recompute_every=4)
    none_layer = sum(activation_terms(LLAMA, BF16, seq_len=4096).values())
    full_layer = sum(activation_terms(LLAMA, _with(recompute="full"), seq_len=4096).values())
    expected = (8 * full_layer + 24 * none_layer) * 4096  # 32 layers, 8 checkpointed
    assert _mem(settings=settings).details["activations_layers"] == pytest.approx(expected, rel=1e-9)


def test_context_parallelism_splits_every_per_token_term() -> None:
    """cp ranks each hold seq/cp tokens of every sequence; parameters and states shard over dp × cp."""
    one = _mem(settings=_with(recompute="full"), seq_len=8192, dp=8)
    four = _mem(settings=_with(recompute="full", cp=4), seq_len=4 * 8192, dp=2)
    assert four.details["activations_layers"] == pytest.approx(one.details["activations_layers"], rel=1e-9)
    assert four.details["activations_logits_loss"] == pytest.approx(one.details["activations_logits_loss"])
    assert four.optimizer_bytes == pytest.approx(one.optimizer_bytes, rel=1e-9)
    with pytest.raises(SpecError, match="--seq-len 8190 must be a multiple of --cp 4"):
        _mem(settings=_with(cp=4), seq_len=8190)


@pytest.mark.parametrize(
    ("settings", "bytes_per_vocab"),
    [({"loss": "eager"}, 12.0), ({"loss": "compiled"}, 4.0), ({"loss": "parallel", "tp": 8}, 16.0 / 8),
     ({"engine": "megatron", "zero_stage": 1, "tp": 8}, 6.0 / 8), ({"loss": "chunked"}, 4.0 + 8.0 / 8),
     ({"loss": "chunked", "compile": True}, 2.0 + 2.0 / 8)],
)
def test_loss_paths(settings: dict[str, object], bytes_per_vocab: float) -> None:
    """Bytes per token per vocabulary entry at the loss's backward (logits_terms' docstring, one per path)."""
    terms = logits_terms(LLAMA, _with(**settings))
    loss = sum(v for k, v in terms.items() if k.startswith("loss_"))
    assert loss == pytest.approx(bytes_per_vocab * LLAMA.vocab_size)


def _unsharded(policy: str) -> float:
    settings = _with(reshard_after_forward=policy)
    return float(_mem(settings=settings, overhead=OverheadModel()).details["compute_weight_copies"])


def test_fsdp2_reshard_policies() -> None:
    """Unsharded bf16 weights kept from forward to backward: torchtitan's old default (root unit + last block) >
    its current default ([norm, output]) > always (none); never keeps every unit."""
    head = LLAMA.vocab_size * H + H
    block = LLAMA.params_dense_layer
    assert _unsharded("always") == 0
    assert _unsharded("default") == pytest.approx(2 * head)
    assert _unsharded("last") == pytest.approx(2 * (LLAMA.params_embedding + H) + 2 * block)
    assert _unsharded("never") == pytest.approx(2 * LLAMA.params_total)


def test_fp8_all_gather_keeps_one_byte_per_matmul_weight() -> None:
    fp8 = _with(precision="fp8", reshard_after_forward="last")
    bf16 = _mem(settings=fp8, overhead=OverheadModel()).details["compute_weight_copies"]
    gathered = _mem(settings=dataclasses.replace(fp8, fp8_all_gather=True), overhead=OverheadModel())
    norms = LLAMA.params_norms_per_layer
    assert bf16 - gathered.details["compute_weight_copies"] == pytest.approx(LLAMA.params_dense_layer - norms)


def test_fsdp2_pipeline_accumulates_unsharded_fp32_gradients() -> None:
    """FSDP2 under pipeline parallelism: gradient sync is off for every micro-batch (torch pipelining's
    backward_maybe_with_nosync), so each stage accumulates unsharded fp32 gradients of all its parameters."""
    settings = _with(pp=4)
    m = _mem(settings=settings, grad_accum=4, overhead=OverheadModel())
    stage_params = 8 * LLAMA.params_dense_layer  # the first stage: 8 blocks + the embedding
    assert m.gradients_bytes >= 4 * stage_params


def test_pure_bf16_keeps_8_bytes_per_parameter() -> None:
    """torchtune/torchtitan pure bf16: bf16 weights, gradients and AdamW m, v."""
    states = model_state_bytes(RunSettings(precision="bf16", param_dtype="bf16"), params=1e9, dp=1)
    assert states.total_bytes == pytest.approx(8e9)
    assert states.compute_copies_bytes == 0  # no autocast copies


def test_transformer_engine_fp8_weight_cache() -> None:
    """TE keeps row- and column-wise fp8 copies of every matmul weight across micro-batches: +2 bytes each."""
    fp8 = model_state_bytes(RunSettings(engine="megatron", precision="fp8"), params=1e9, dp=1, matmul_params=9e8)
    assert fp8.compute_copies_bytes == pytest.approx(2 * 9e8)


def test_moe_imbalance_scales_the_routed_terms() -> None:
    mixtral = load_model("mixtral-8x7b")
    settings = RunSettings(engine="megatron", precision="bf16", zero_stage=1, ep=8)
    even = activation_terms(mixtral, settings, seq_len=4096, moe_layer=True)
    skewed = activation_terms(mixtral, settings, seq_len=4096, moe_layer=True, imbalance=2.0)
    assert skewed["moe_experts"] == pytest.approx(2 * even["moe_experts"])
    assert skewed["moe_router"] == even["moe_router"]
    with pytest.raises(SpecError, match="moe_token_imbalance"):
        OverheadModel(moe_token_imbalance=0.5)


def test_deepspeed_reduce_bucket() -> None:
    """ZeRO's reduce bucket: 5e8 bf16 elements (deepspeed/runtime/zero/config.py defaults), there from the
    first backward on, e.g. at the end of backward next to all model states."""
    zero2 = RunSettings(engine="deepspeed", precision="bf16", zero_stage=2)
    m = _mem(settings=zero2, dp=8, overhead=OverheadModel.zero())
    states = model_state_bytes(zero2, params=LLAMA.params_total, dp=8).total_bytes
    assert m.details["backward_end_peak"] - states == pytest.approx(5e8 * 2, rel=1e-6)


def test_expert_parallel_all_to_all_buffers_are_a_layer_transient() -> None:
    """With ep > 1 each MoE layer's dispatch holds the k permuted copies sent and those received (× imbalance)."""
    from batchpilot.estimate.activations import backward_working_terms

    mixtral = load_model("mixtral-8x7b")
    settings = RunSettings(engine="megatron", precision="bf16", zero_stage=1, ep=8)
    terms = backward_working_terms(mixtral, settings, seq_len=4096, moe_layer=True, policy="full", imbalance=4.0)
    a2a = mixtral.num_experts_per_token * mixtral.hidden_size * 2 * (1 + 4.0)
    assert terms["grad_temporaries"] >= a2a
