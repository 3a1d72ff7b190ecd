"""The per-op step-time model: kernel profiles (published microbenchmarks, each with its source), the op
inventory of a layer (its GEMMs cover exactly the model's matmul weights), memory-bound bytes per op, fp8,
and collectives at achieved bus bandwidth. Numbers come from the cited tables or are derived by hand here."""

from __future__ import annotations

import dataclasses
import math

import pytest
from plan_fixtures import A100, a100_cluster, gpt

from batchpilot.errors import SpecError, UnknownNameError
from batchpilot.estimate.collectives import Fabric
from batchpilot.estimate.kernels import load_profile, profile_for, profile_names
from batchpilot.estimate.layer_time import (
    Implementation,
    Shape,
    dense_layer,
    head,
    moe_layer,
    recompute_parts,
)
from batchpilot.estimate.steptime import StepTimeModel
from batchpilot.specs.batch import BatchTriad
from batchpilot.specs.hardware import ClusterSpec, accelerator_names, load_accelerator
from batchpilot.specs.model import load_model
from batchpilot.specs.settings import RunSettings

EAGER = Implementation(fused=False, attention_kernel="fa2")
FUSED = Implementation(fused=True, attention_kernel="fa2", compiled=True, fused_loss=True)


# ---------------------------------------------------------------------- kernel profiles
@pytest.mark.parametrize("name", profile_names())
def test_every_profile_figure_has_a_source(name):
    profile = load_profile(name)
    assert profile.sources and all(s.url.startswith("https://") and s.says for s in profile.sources.values())
    assert {f"gemm_efficiency.{d}" for d in profile.gemm_efficiency} <= set(profile.sources)
    for curve in profile.attention.values():
        assert curve.source.url.startswith("https://") and curve.source.says


@pytest.mark.parametrize(("accelerator", "profile", "bf16", "fp8"), [
    # Maximum Achievable Matmul FLOPS table (stas00/ml-engineering @ 744d01e): MAMF / theory
    ("a100-80gb", "ampere", 271.2 / 312, None), ("h100-sxm", "hopper", 794.5 / 989, 1402.6 / 1979),
    ("h200", "hopper", 794.5 / 989, 1402.6 / 1979), ("h800", "hopper", 794.5 / 989, 1402.6 / 1979),
    ("b200", "blackwell", 1745.0 / 2250, 3432.5 / 4500), ("gb200", "grace-blackwell", 1822.0 / 2500, 3615.6 / 5000),
    ("mi300x", "cdna3", 668.4 / 1300, None),
    # FBGEMM PR 2546 'H100 500W': bf16 8192³ 585.23 TFLOP/s, fp8 row GEMM 1125.51, of 989.4 / 1978.9 dense
    ("h100-sxm-96gb-hbm2e-500w", "hopper-500w", 585.23 / 989.4, 1125.51 / 1978.9),
])
def test_accelerators_get_their_generation_profile(accelerator, profile, bf16, fp8):
    chosen = profile_for(load_accelerator(accelerator))
    assert chosen.name == profile
    assert chosen.gemm_fraction("bf16") == pytest.approx(bf16, abs=6e-4)
    if fp8 is not None:
        assert chosen.gemm_fraction("fp8") == pytest.approx(fp8, abs=6e-4)
    else:
        assert chosen.gemm_fraction("fp8") == chosen.gemm_fraction("bf16")


def test_every_catalog_accelerator_has_a_profile_and_the_unknown_ones_say_generic():
    names = {n: profile_for(load_accelerator(n)).name for n in accelerator_names()}
    assert names["rtx-4090"] == names["l40s"] == "generic"
    assert profile_for(A100).name == "ampere"  # the test fixture: matched by its display name
    with pytest.raises(UnknownNameError, match="kernel profile"):
        load_profile("volta")


def test_attention_curves_read_the_published_points_and_interpolate_in_log_length():
    """FlashAttention-3 paper Fig. 5/6, H100 SXM5, head dim 128, FlashAttention-2: forward causal 298 at 2k and 319 at
    4k TFLOP/s; backward (full mask) 291 and 310; forward full 362 and 368."""
    _, fa2 = load_profile("hopper").attention_curve("fa2")
    assert fa2.forward_fraction(2048, causal=True) * 989.4e12 == pytest.approx(298e12)
    mid = math.sqrt(2048 * 4096)  # halfway in log(length)
    assert fa2.forward_fraction(mid, causal=True) * 989.4e12 == pytest.approx((298e12 + 319e12) / 2)
    assert fa2.forward_fraction(100, causal=True) == fa2.forward_fraction(512, causal=True)  # clamped
    # causal backward = full backward × the forward's causal/full ratio at that length
    assert fa2.backward_fraction(4096, causal=True) * 989.4e12 == pytest.approx(310e12 * 319 / 368)


def test_attention_kernels_fall_back_to_what_the_generation_has():
    ampere = load_profile("ampere")
    assert ampere.attention_curve("fa3")[0] == "fa2"  # FlashAttention-3 and cuDNN attention need Hopper
    assert load_profile("hopper").attention_curve("fa4")[0] == "cudnn"
    assert ampere.default_attention_kernel("megatron") == "fa2"
    assert load_profile("hopper").default_attention_kernel("megatron") == "cudnn"
    assert load_profile("hopper").default_attention_kernel("fsdp2") == "fa2"
    with pytest.raises(SpecError, match="unknown attention kernel"):
        ampere.attention_curve("fa9")


# ---------------------------------------------------------------------- the op inventory
def _shape(tokens: int, seq: int, *, tp: int = 1, sp: bool = False, ep: int = 1, precision: str = "bf16") -> Shape:
    return Shape(tokens=tokens, seq=seq, sequences=tokens / seq, tp=tp, sp=sp, ep=ep, cp=1, precision=precision)


@pytest.mark.parametrize(("name", "tp"), [("llama-3-8b", 1), ("llama-3-8b", 4), ("deepseek-v3", 1)])
def test_layer_gemms_cover_exactly_the_matmul_weights(name, tp):
    """Forward GEMM FLOPs of a layer = 2 × its matmul weights ÷ t × tokens (the routed experts a token uses, k of E;
    the router; shared experts); backward twice that. Independent of ModelSpec: counted from the config here."""
    model, accel = load_model(name), load_accelerator("h100-sxm")
    profile, tokens = profile_for(accel), 4096
    layer = (moe_layer if model.is_moe else dense_layer)(accel, profile, EAGER, model, _shape(tokens, 4096, tp=tp))
    h, cfg = model.hidden_size, model.hf_config
    if model.is_moe:  # DeepSeek-V3: MLA with q LoRA, 8 of 256 routed experts + 1 shared, router 256 x h
        q = cfg["q_lora_rank"] * h + cfg["q_lora_rank"] * cfg["num_attention_heads"] * (
            cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"])
        kv = h * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) + cfg["kv_lora_rank"] * cfg["num_attention_heads"] * (
            cfg["qk_nope_head_dim"] + cfg["v_head_dim"])
        o = cfg["num_attention_heads"] * cfg["v_head_dim"] * h
        experts = (cfg["num_experts_per_tok"] + cfg["n_shared_experts"]) * 3 * h * cfg["moe_intermediate_size"]
        weights = q + kv + o + experts + cfg["n_routed_experts"] * h
    else:  # Llama 3 8B: q, k, v, o and a SwiGLU MLP
        kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
        weights = (2 * h * h + 2 * h * kv + 3 * h * cfg["intermediate_size"]) / tp
    assert layer.forward.gemm_flops == pytest.approx(2 * weights * tokens, rel=1e-9)
    assert layer.backward.gemm_flops == pytest.approx(2 * layer.forward.gemm_flops, rel=1e-9)


def test_memory_bound_bytes_follow_the_table_eager_and_fused():
    """Llama 3 8B layer forward on one GPU (h 4096, 32 query and 8 KV heads of 128, I 14336), per token: two
    RMSNorms (36 bytes/element eager, 4 fused), two residual adds (6 / 4), rotary on q and k (24 / 4), the
    attention output copy (4 / 0) and SwiGLU (10 / 6 per inner element); seconds = bytes ÷ (3.35 TB/s × 0.88)."""
    model, accel = load_model("llama-3-8b"), load_accelerator("h100-sxm")
    profile, tokens = profile_for(accel), 8192
    h, q, k, inner = 4096, 4096, 1024, 14336
    eager = 2 * 36 * h + 2 * 6 * h + 24 * (q + k) + 4 * q + 10 * inner
    fused = 2 * 4 * h + 2 * 4 * h + 4 * (q + k) + 0 * q + 6 * inner
    hbm = 3.35e12 * 0.88
    for impl, per_token in ((EAGER, eager), (FUSED, fused)):
        layer = dense_layer(accel, profile, impl, model, _shape(tokens, 8192))
        assert layer.forward.elementwise == pytest.approx(tokens * per_token / hbm)


def test_sequence_parallelism_splits_the_norms_not_the_rest():
    model, accel = load_model("llama-3-8b"), load_accelerator("h100-sxm")
    profile = profile_for(accel)
    plain = dense_layer(accel, profile, EAGER, model, _shape(8192, 8192, tp=4))
    split = dense_layer(accel, profile, EAGER, model, _shape(8192, 8192, tp=4, sp=True))
    norms_and_adds = 8192 * (2 * 36 + 2 * 6) * 4096 / (3.35e12 * 0.88)
    assert plain.forward.elementwise - split.forward.elementwise == pytest.approx(norms_and_adds * 3 / 4)
    assert plain.forward.gemm == split.forward.gemm


def test_fp8_speeds_up_the_linear_gemms_only_and_pays_the_casts():
    """FP8 runs the layer GEMMs at the fp8 peak × its efficiency (H100: 1978.9 × 0.709 vs 989.5 × 0.803: 1.77×
    faster where compute-bound) and adds the casts; attention and the output head stay bf16. A whole layer
    therefore gains well under 2× (the issue: published runs gain 1.2–1.5×)."""
    model, accel = load_model("llama-3-8b"), load_accelerator("h100-sxm")
    profile = profile_for(accel)
    bf16 = dense_layer(accel, profile, EAGER, model, _shape(8192, 8192))
    fp8 = dense_layer(accel, profile, EAGER, model, _shape(8192, 8192, precision="fp8"))
    assert fp8.forward.attention == bf16.forward.attention
    assert bf16.forward.gemm / fp8.forward.gemm == pytest.approx(1978.9 * 0.709 / (989.5 * 0.803), rel=0.03)
    assert fp8.forward.fp8_cast > 0 == bf16.forward.fp8_cast
    gain = (bf16.forward.total_s + bf16.backward.total_s) / (fp8.forward.total_s + fp8.backward.total_s)
    assert 1.15 < gain < 1.6
    top = {p: head(accel, profile, EAGER, model, _shape(8192, 8192, precision=p)) for p in ("bf16", "fp8")}
    assert top["bf16"].forward.gemm == top["fp8"].forward.gemm


def test_casts_cost_by_recipe():
    """Bytes per quantised element: delayed 4, tensorwise 6, rowwise 10 (module docstring derivation)."""
    model, accel = load_model("llama-3-8b"), load_accelerator("h100-sxm")
    profile = profile_for(accel)
    casts = {r: dense_layer(accel, profile, dataclasses.replace(EAGER, fp8_recipe=r), model,
                            _shape(8192, 8192, precision="fp8")).forward.fp8_cast
             for r in ("delayed", "tensorwise", "rowwise")}
    assert casts["tensorwise"] / casts["delayed"] == pytest.approx(6 / 4)
    assert casts["rowwise"] / casts["delayed"] == pytest.approx(10 / 4)


def test_compiled_layers_run_fewer_bytes_and_kernels():
    model, accel = load_model("llama-3-8b"), load_accelerator("h100-sxm")
    profile = profile_for(accel)
    eager = dense_layer(accel, profile, EAGER, model, _shape(8192, 8192))
    fused = dense_layer(accel, profile, FUSED, model, _shape(8192, 8192))
    assert fused.forward.elementwise < eager.forward.elementwise / 3
    assert fused.forward.kernels < eager.forward.kernels
    assert fused.forward.gemm == eager.forward.gemm and fused.forward.attention == eager.forward.attention


def test_causal_flash_attention_does_half_the_square():
    """FLOPs of one layer's attention forward on one GPU: 4·s²·heads·d per sequence, halved by the causal mask,
    at the published causal speed (FlashAttention-2 on A100: 155 TFLOP/s at 2k, fwd + bwd)."""
    model = gpt(layers=1, hidden=2048, heads=16)
    layer = dense_layer(A100, load_profile("ampere"), EAGER, model, _shape(4 * 2048, 2048))
    flops = 4 * 2048**2 * 16 * 128 / 2 * 4  # four sequences
    assert layer.forward.attention == pytest.approx(flops / 155e12)
    assert layer.backward.attention == pytest.approx(2.5 * flops / 155e12)
    assert layer.attention_forward.attention == layer.forward.attention


def test_recompute_policies_repeat_the_forward_parts():
    model, accel = load_model("llama-3-8b"), load_accelerator("h100-sxm")
    layer = dense_layer(accel, profile_for(accel), EAGER, model, _shape(8192, 8192))
    assert recompute_parts(layer, "full").total_s == pytest.approx(layer.forward.total_s)
    assert recompute_parts(layer, "selective").total_s == pytest.approx(layer.attention_forward.total_s)
    op = recompute_parts(layer, "op")  # torchtitan: every second matmul, every memory-bound op, no attention
    assert op.gemm == pytest.approx(layer.forward.gemm / 2) and op.attention == 0.0
    assert op.elementwise == layer.forward.elementwise
    assert recompute_parts(layer, "none").total_s == 0.0


def test_experts_see_the_tokens_of_the_expert_parallel_group():
    """Mixtral 8x7B, 2 of 8 experts: each of the 8/e local experts receives b·s·k·e/E tokens; with e = 8 every GPU
    holds one expert and runs its GEMMs on 2·8/8 = 2× its own tokens, i.e. the same FLOPs as e = 1 (balanced)."""
    model, accel = load_model("mixtral-8x7b"), load_accelerator("h100-sxm")
    profile = profile_for(accel)
    times = {e: moe_layer(accel, profile, EAGER, model, _shape(2048, 2048, ep=e)) for e in (1, 8)}
    assert times[1].forward.gemm_flops == pytest.approx(times[8].forward.gemm_flops)


# ---------------------------------------------------------------------- collectives
def test_group_placement_follows_megatron_rank_order():
    fabric = Fabric.of(a100_cluster(4), load_profile("ampere"))
    assert fabric.placement(8, 1) == (8, 1)  # tensor parallel inside a node
    assert fabric.placement(4, 8) == (1, 4)  # data parallel across nodes at stride t = 8
    assert fabric.placement(16, 2) == (4, 4)  # stride 2: four members per node
    assert fabric.placement(2, 2) == (2, 1)


def test_collectives_run_at_the_measured_bus_bandwidth():
    """One 8x A100 node: ring busbw 234.89 of 300 GB/s (nvlink-hgx-a100), P_half 11.5 MiB. Across nodes a ring runs at
    min(intra ring, local × per-GPU NIC × 0.94) (ib-ndr's measured 94 %), P_half 85.75 MiB."""
    fabric = Fabric.of(a100_cluster(4), load_profile("ampere"))
    size = 2**30
    intra = 234.89e9 * size / (size + 11.5 * 2**20)
    assert fabric.all_reduce_s(size, 8, 1) == pytest.approx(2 * 7 / 8 * size / intra)
    assert fabric.gather_s(size, 8, 1) == pytest.approx(7 / 8 * size / intra)
    inter = 25e9 * 0.94 * size / (size + 85.75 * 2**20)  # one member per node: one NIC's worth
    assert fabric.gather_s(size, 4, 8) == pytest.approx(3 / 4 * size / inter)
    wide = min(234.89e9, 8 * 25e9 * 0.94) * size / (size + 85.75 * 2**20)  # 8 members per node: all NICs
    assert fabric.all_reduce_s(size, 32, 1) == pytest.approx(2 * 31 / 32 * size / wide)
    assert fabric.all_reduce_s(size, 1, 1) == 0.0


def test_hopper_all_reduce_uses_nvls_and_the_rest_the_ring():
    """nvlink-hgx-h100: ring 367.61 GB/s (82 %), NVLS all-reduce 478.87 GB/s, of 450 GB/s per GPU."""
    cluster = ClusterSpec(accelerator=load_accelerator("h100-sxm"), devices_per_node=8)
    fabric = Fabric.of(cluster, load_profile("hopper"))
    assert fabric.intra_ring_bytes_per_s == pytest.approx(367.61e9)
    assert fabric.intra_all_reduce_bytes_per_s == pytest.approx(478.87e9)
    # an H800's NVLink (200 GB/s each way) at the same fractions
    h800 = Fabric.of(ClusterSpec(accelerator=load_accelerator("h800"), devices_per_node=8), load_profile("hopper"))
    assert h800.intra_ring_bytes_per_s == pytest.approx(367.61e9 / 450e9 * 200e9)


def test_all_to_all_leaves_the_node_through_its_own_nic():
    """EP 16 over 2 nodes: 8/16 of each rank's bytes cross its 25 GB/s NIC at DeepEP's 43/50, 7/16 use NVLink at
    153/160; the slower of the two, scaled by the message-size curve."""
    fabric = Fabric.of(a100_cluster(2), load_profile("ampere"))
    size = 2**28
    inter = size * 8 / 16 / (25e9 * 43 / 50)
    intra = size * 7 / 16 / (300e9 * 153 / 160)
    assert fabric.all_to_all_s(size, 16, 1) == pytest.approx(max(inter, intra) * (size + 85.75 * 2**20) / size)
    deduplicated = fabric.all_to_all_s(size, 16, 1, remote_bytes=size / 8)
    assert deduplicated < fabric.all_to_all_s(size, 16, 1)


def test_context_parallel_ring_hides_behind_the_attention_kernel():
    """Ring attention: cp − 1 K/V sends per layer forward, twice that backward; at long sequences the attention
    kernel hides them, and the tokens/s per GPU of a longer sequence over more GPUs is lower (attention grows
    with s)."""
    model = load_model("llama-3-8b")
    cluster = ClusterSpec(accelerator=load_accelerator("h100-sxm"), devices_per_node=8)
    rates = []
    for cp in (1, 2, 4, 8):
        seq = 32768 * cp
        steps = StepTimeModel(model, cluster, seq_len=seq)
        triad = BatchTriad(micro_batch_sequences=1, grad_accum_steps=1, data_parallel_ranks=8 // cp,
                           seq_len_tokens=seq)
        step = steps.estimate(RunSettings(engine="fsdp2", zero_stage=3, cp=cp, recompute="full"), triad)
        assert (step.cp_comm_s > 0) == (cp > 1)
        rates.append(step.tokens_per_s / 8)
    assert rates == sorted(rates, reverse=True)


def test_the_clusters_network_sets_the_achieved_fraction():
    """A cluster on AWS p5en (EFA, ring all-reduce measured at 91.2 % of the node's NIC sum) against the default
    400 Gb/s InfiniBand figure (94 %); the step names nothing else."""
    from batchpilot.specs.network import load_network

    efa = load_network("efa-p5en")
    h200 = load_accelerator("h200")
    plain = ClusterSpec(accelerator=h200, devices_per_node=8, num_nodes=4, inter_node_bandwidth_bytes_per_s=50e9)
    named = dataclasses.replace(plain, network=efa)
    assert Fabric.of(plain, load_profile("hopper")).network == "ib-ndr"
    fabric = Fabric.of(named, load_profile("hopper"))
    assert fabric.network == "efa-p5en" and fabric.inter_fraction == pytest.approx(364.87e9 / (16 * 25e9))
    assert named.to_dict()["network"] == "efa-p5en" and plain.to_dict()["network"] is None
    model = load_model("llama-3-8b")
    triad = BatchTriad(micro_batch_sequences=1, grad_accum_steps=1, data_parallel_ranks=32, seq_len_tokens=8192)
    settings = RunSettings(engine="fsdp2", zero_stage=3)
    slower = StepTimeModel(model, named, seq_len=8192).estimate(settings, triad)
    faster = StepTimeModel(model, plain, seq_len=8192).estimate(settings, triad)
    assert slower.dp_comm_s > faster.dp_comm_s
