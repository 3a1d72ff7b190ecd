"""Megatron-LM model arguments per preset and the torchtitan TOML export, checked against torchtitan's own
config parser and parallel-dims validation (torchtitan 0.2.2, the last release that reads TOML) where installed.

Megatron-LM's training argument parser is not on PyPI (``megatron-core`` ships only ``megatron.core``), so the
Megatron tests rebuild the network from our argv with the parameter formula of Megatron's GPT model and compare
it with the exact (transformers-verified) ``ModelSpec.params_total``."""

from __future__ import annotations

import dataclasses

import pytest
import tomllib

from batchpilot.plan.exports import ExportError, export_text
from batchpilot.plan.exports.megatron import megatron_model_args
from batchpilot.plan.exports.torchtitan import torchtitan_config
from batchpilot.plan.planner import Pins, PlanRequest, plan
from batchpilot.specs.hardware import ClusterSpec, load_accelerator
from batchpilot.specs.model import load_model
from batchpilot.specs.settings import RunSettings

CLUSTER = ClusterSpec(accelerator=load_accelerator("h100-sxm"), devices_per_node=8, num_nodes=2,
                      inter_node_bandwidth_bytes_per_s=50e9)


def _values(argv: list[str]) -> dict[str, str | bool]:
    out: dict[str, str | bool] = {}
    for i, a in enumerate(argv):
        if a.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else "--"
            out[a] = True if nxt.startswith("--") else nxt
    return out


def megatron_gpt_params(argv: list[str]) -> int:
    """Parameters of Megatron-LM's GPTModel for ``argv`` (layer structure of ``megatron/core/models/gpt`` and
    ``megatron/core/transformer``: fused QKV, linear_proj, fc1 (2× for SwiGLU), fc2, router, shared experts,
    MLA down/up projections with their layernorms); written from the module layout, not from ModelSpec."""
    v = _values(argv)
    get = lambda k, d=0: int(v[k]) if k in v else d  # noqa: E731
    h, heads, layers, ffn = get("--hidden-size"), get("--num-attention-heads"), get("--num-layers"), get("--ffn-hidden-size")
    vocab = get("--padded-vocab-size") or get("--vocab-size")
    bias, qkv_bias = "--disable-bias-linear" not in v, "--add-qkv-bias" in v or "--disable-bias-linear" not in v
    gated = 2 if "--swiglu" in v else 1
    norm = h if v.get("--normalization") == "RMSNorm" else 2 * h
    if "--multi-latent-attention" in v:
        qk, rope, vd, kvr, qr = (get("--qk-head-dim"), get("--qk-pos-emb-head-dim"), get("--v-head-dim"),
                                 get("--kv-lora-rank"), get("--q-lora-rank"))
        q = (h * qr + qr + qr * heads * (qk + rope)) if qr else h * heads * (qk + rope)
        attn = q + h * (kvr + rope) + kvr + kvr * heads * (qk + vd) + heads * vd * h
    else:
        d = get("--kv-channels", h // heads)
        groups = get("--num-query-groups", heads) if "--group-query-attention" in v else heads
        qkv_out = d * (heads + 2 * groups)
        attn = h * qkv_out + (qkv_out if qkv_bias else 0) + heads * d * h + (h if bias else 0)

    def mlp(width: int) -> int:
        return h * gated * width + width * h + ((gated * width + h) if bias else 0)

    dense_layer = attn + mlp(ffn) + 2 * norm
    total = vocab * h * (1 if "--untie-embeddings-and-output-weights" not in v else 2) + norm
    if v.get("--position-embedding-type") == "learned_absolute":
        total += get("--max-position-embeddings") * h
    if "--num-experts" not in v:
        return total + layers * dense_layer
    experts, moe_ffn = get("--num-experts"), get("--moe-ffn-hidden-size")
    moe_layer = attn + 2 * norm + experts * h + experts * mlp(moe_ffn) + (
        mlp(get("--moe-shared-expert-intermediate-size")) if "--moe-shared-expert-intermediate-size" in v else 0)
    pattern = v.get("--moe-layer-freq")
    dense = int(str(pattern).split("]*")[1].split("+")[0]) if isinstance(pattern, str) else 0
    return total + dense * dense_layer + (layers - dense) * moe_layer


@pytest.mark.parametrize("name", ["llama-3-8b", "mixtral-8x7b", "qwen2.5-7b", "deepseek-v3", "deepseek-v2", "gpt2",
                                  "mistral-7b", "llama-3.1-405b"])
def test_megatron_arguments_build_the_presets_parameter_count(name):
    spec = load_model(name)
    assert megatron_gpt_params(megatron_model_args(spec, tp=1)) == spec.params_total


@pytest.mark.parametrize(("name", "expected"), [
    ("llama-3-8b", {"--group-query-attention": True, "--num-query-groups": "8", "--ffn-hidden-size": "14336",
                    "--normalization": "RMSNorm", "--norm-epsilon": "1e-05", "--rotary-base": "500000",
                    "--padded-vocab-size": "128256", "--disable-bias-linear": True, "--swiglu": True,
                    "--untie-embeddings-and-output-weights": True, "--position-embedding-type": "rope"}),
    ("llama-3.1-405b", {"--use-rope-scaling": True, "--rope-scaling-factor": "8"}),
    ("qwen2.5-7b", {"--add-qkv-bias": True, "--disable-bias-linear": True, "--num-query-groups": "4",
                    "--norm-epsilon": "1e-06", "--rotary-base": "1000000"}),
    ("mixtral-8x7b", {"--num-experts": "8", "--moe-router-topk": "2", "--moe-ffn-hidden-size": "14336"}),
    ("deepseek-v3", {"--multi-latent-attention": True, "--q-lora-rank": "1536", "--kv-lora-rank": "512",
                     "--qk-head-dim": "128", "--qk-pos-emb-head-dim": "64", "--v-head-dim": "128",
                     "--moe-layer-freq": "[0]*3+[1]*58", "--moe-shared-expert-intermediate-size": "2048",
                     "--moe-router-score-function": "sigmoid", "--moe-router-enable-expert-bias": True,
                     "--moe-router-num-groups": "8", "--moe-router-group-topk": "4",
                     "--moe-router-topk-scaling-factor": "2.5", "--rotary-scaling-factor": "40"}),
    ("gpt2", {"--position-embedding-type": "learned_absolute", "--norm-epsilon": "1e-05"}),
])
def test_megatron_model_flags_follow_the_config(name, expected):
    # values from each preset's config.json; flag spellings as in NVIDIA's DeepSeek-R1 recipe (module docstring)
    v = _values(megatron_model_args(load_model(name), tp=1))
    assert {k: v.get(k) for k in expected} == expected
    if name == "gpt2":
        assert "--swiglu" not in v and "--disable-bias-linear" not in v and "--untie-embeddings-and-output-weights" not in v


def test_megatron_keeps_the_exact_vocabulary_only_where_tp_divides_it():
    gpt2 = load_model("gpt2")  # 50257 is odd: Megatron pads --vocab-size to a multiple of 128 × tp
    assert _values(megatron_model_args(gpt2, tp=2))["--vocab-size"] == "50257"
    assert _values(megatron_model_args(gpt2, tp=1))["--padded-vocab-size"] == "50257"


def chosen(model="tiny-llama-15m", *, precision="bf16", hybrid=False, engine="torchtitan", **pins):
    request = PlanRequest(model=load_model(model), cluster=CLUSTER, seq_len=1024, global_batch_sequences=96,
                          settings=RunSettings(precision=precision, hybrid_shard=hybrid), engine=engine,
                          pins=Pins(**pins))
    return plan(request).plans[0], request


@pytest.mark.parametrize("case", [
    dict(zero_stage=0, tp=1, pp=1, micro_batch=2),
    dict(zero_stage=3, tp=2, pp=1, micro_batch=3, recompute="full"),
    dict(zero_stage=2, tp=1, pp=2, micro_batch=1, recompute="op"),
    dict(zero_stage=2, tp=1, pp=1, hybrid=True),
    dict(zero_stage=3, tp=1, pp=2, vpp=3, micro_batch=1),
])
def test_torchtitan_toml_loads_in_torchtitans_config_manager(case):
    """torchtitan's own TOML parser and ParallelDims at 16 ranks, and its in-trainer rules (engine_checks), read back
    equal to the plan."""
    import engine_checks as checks

    case = dict(case)
    hybrid = case.pop("hybrid", False)
    best, request = chosen(hybrid=hybrid, **case)
    text = export_text(best, request, "torchtitan")
    parsed = tomllib.loads(text)
    par = parsed["parallelism"]
    assert (par["data_parallel_shard_degree"] > 1) == (best.settings.zero_stage > 0)
    assert (par["data_parallel_replicate_degree"] > 1) == (hybrid or best.settings.zero_stage == 0)
    assert checks.check_torchtitan(text, best, request) == checks.expected(best, request, seq_len=True)


def test_torchtitan_refuses_ddp_with_tensor_parallelism():
    """torchtitan raises "DDP has not supported > 1D parallelism" (parallelize.py:148-151 at v0.2.2) for DDP with
    tp, pp or cp: the planner does not propose it and the export refuses a plan that has it."""
    from batchpilot.errors import SpecError

    with pytest.raises(SpecError, match="--engine torchtitan runs ZeRO-0 DDP only as the sole parallelism"):
        plan(PlanRequest(model=load_model("tiny-llama-15m"), cluster=CLUSTER, seq_len=1024, global_batch_sequences=96,
                         engine="torchtitan", pins=Pins(zero_stage=0, tp=2)))
    tp_plan, request = chosen(zero_stage=3, tp=2)
    ddp_tp = dataclasses.replace(tp_plan, settings=dataclasses.replace(tp_plan.settings, engine="torch", zero_stage=0))
    with pytest.raises(ExportError, match="DDP runs only as the sole parallelism"):
        export_text(ddp_tp, request, "torchtitan")


def test_torchtitan_names_its_own_flavor_when_the_shape_matches_and_refuses_fp16():
    best, request = chosen()
    assert torchtitan_config(best, request)["model"]["flavor"] == "batchpilot:tiny-llama-15m"
    assert "register 'batchpilot:tiny-llama-15m'" in export_text(best, request, "torchtitan")
    big = PlanRequest(model=load_model("llama-3-8b"), cluster=CLUSTER, seq_len=1024, global_batch_sequences=96,
                      engine="torchtitan")
    assert torchtitan_config(plan(big).plans[0], big)["model"] == {"name": "llama3", "flavor": "8B"}
    fp16 = dataclasses.replace(best, settings=dataclasses.replace(best.settings, precision="fp16"))
    with pytest.raises(ExportError, match="not fp16"):
        export_text(fp16, request, "torchtitan")


def test_torchtitan_toml_escapes_strings():
    from batchpilot.plan.exports.torchtitan import _toml_value

    tricky = 'a"b\\c\nd\x7fé😀'
    assert tomllib.loads(f"k = {_toml_value(tricky)}")["k"] == tricky


def test_megatron_layout_for_a_pipeline_that_does_not_divide_the_layers():
    from batchpilot.plan.exports.megatron import _megatron_pipeline_split

    layout = _megatron_pipeline_split(61, 32, 1)[1].split("|")  # DeepSeek-V3's planned pp 32: ⌈61/32⌉ = 2
    assert len(layout) == 32 and sum(stage.count("t") for stage in layout) == 61
    assert max(stage.count("t") for stage in layout) == 2 and layout[0].startswith("E") and layout[-1].endswith("L")
    assert _megatron_pipeline_split(32, 4, 1) == []


def test_megatron_interleaved_split():
    """vpp > 1: an even split names the virtual stages (Megatron derives the chunk size); an uneven one lists
    pp × vpp stages in the layout (Megatron derives vpp = stages / pp, arguments.py)."""
    from batchpilot.plan.exports.megatron import _megatron_pipeline_split

    assert _megatron_pipeline_split(128, 16, 8) == ["--num-virtual-stages-per-pipeline-rank", "8"]
    flag, layout = _megatron_pipeline_split(126, 16, 4)  # Llama 3 405B: 126 layers over 64 virtual stages
    stages = layout.split("|")
    assert flag == "--pipeline-model-parallel-layout" and len(stages) == 64
    assert sum(stage.count("t") for stage in stages) == 126 and {stage.count("t") for stage in stages} == {1, 2}
    with pytest.raises(ExportError, match="cannot fill 16 pipeline stages × 8 virtual stages"):
        _megatron_pipeline_split(126, 16, 8)
