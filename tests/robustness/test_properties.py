"""Property-based tests (hypothesis): no input makes the parsers or the planner crash, and whatever they
accept satisfies its own invariants.

"Crash" means any exception other than the library's :class:`~batchpilot.errors.BatchpilotError`
family (which the CLI turns into one line and exit 2). Example counts are kept small enough for the
default run; ``tests/robustness/test_fuzz_config.py`` runs the long, coverage-guided version.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from batchpilot.errors import BatchpilotError, SpecError
from batchpilot.io import read_json_object
from batchpilot.specs.hardware import (
    DTYPES,
    ClusterSpec,
    accelerator_from_dict,
    accelerator_names,
    load_accelerator,
)
from batchpilot.specs.model import MODEL_TYPES, ModelSpec, from_hf_config
from batchpilot.units import GIB, parse_bytes, parse_count, parse_seconds

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON values of every type, the edge numbers included (what json.loads can hand a parser).
EDGE_NUMBERS = st.sampled_from([0, -1, 1, 2, 3, 7, 64, 2**31, 2**31 + 1, 2**62, 2**64, -(2**63), 0.5, 1.0, 64.0,
                                1e300, -0.0, math.nan, math.inf, -math.inf])
SCALARS = st.one_of(st.none(), st.booleans(), EDGE_NUMBERS, st.integers(), st.floats(allow_nan=True),
                    st.text(max_size=12))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=6)


# ---------------------------------------------------------------------- units
@FAST
@given(st.one_of(st.text(max_size=30), st.integers(), st.floats(), st.booleans(),
                 st.from_regex(r"\s*[0-9]{0,25}\.?[0-9]{1,25}([eE][+-]?[0-9]{1,4})?\s*[A-Za-z]{0,4}\s*", fullmatch=True)))
def test_unit_parsers_return_a_valid_value_or_a_batchpilot_error(text: Any) -> None:
    for parse, check in (
        (parse_count, lambda v: isinstance(v, int) and 1 <= v <= 2**62),
        (parse_bytes, lambda v: isinstance(v, int) and 1 <= v <= 2**62),
        (parse_seconds, lambda v: isinstance(v, float) and math.isfinite(v) and v > 0),
    ):
        try:
            value = parse(text, "--flag")
        except BatchpilotError as exc:
            assert "\n" not in str(exc) and str(exc).startswith("--flag")
        else:
            assert check(value), (parse.__name__, text, value)


@FAST
@given(st.integers(min_value=1, max_value=2**62))
def test_counts_and_bytes_round_trip_exactly(n: int) -> None:
    """Whole numbers up to 2^62 parse exactly (a float detour would round 2^53 + 1 to 2^53)."""
    assert parse_count(str(n)) == n == parse_count(n)
    assert parse_bytes(str(n)) == n == parse_bytes(n)


@FAST
@given(st.integers(min_value=1, max_value=2**20), st.sampled_from([("Ki", 2**10), ("Mi", 2**20), ("K", 10**3),
                                                                   ("M", 10**6), ("B", 10**9)]))
def test_count_suffixes_multiply(n: int, suffix: tuple[str, int]) -> None:
    name, factor = suffix
    total = n * factor
    if total <= 2**62:
        assert parse_count(f"{n}{name}") == total


# ---------------------------------------------------------------------- model configs
REQUIRED = {
    "gpt2": ("n_embd", "n_head", "n_layer", "vocab_size", "n_positions"),
    "llama": ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size",
              "max_position_embeddings"),
    "moe": ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size",
            "max_position_embeddings", "num_local_experts", "num_experts_per_tok"),
    "mla": ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size",
            "max_position_embeddings", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank",
            "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"),
}
OPTIONAL = ("num_key_value_heads", "head_dim", "tie_word_embeddings", "attention_bias", "mlp_bias", "n_inner",
            "q_lora_rank", "n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers", "moe_layer_freq")


def check_model_invariants(spec: ModelSpec) -> None:
    """What every accepted config must give: positive, consistent counts and a JSON-able record."""
    assert spec.family == MODEL_TYPES[spec.model_type]
    for value in (spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.vocab_size):
        assert 1 <= value <= 2**31
    assert spec.num_heads % spec.num_kv_heads == 0
    assert 0 < spec.params_active <= spec.params_total
    assert spec.params_embedding <= spec.params_total
    assert spec.num_dense_layers + spec.num_moe_layers == spec.num_layers
    if spec.is_moe:
        assert 1 <= spec.num_experts_per_token <= spec.num_experts
    short, long = spec.flops_per_token(1), spec.flops_per_token(4096)
    assert 0 < short < long
    json.dumps(spec.to_dict(seq_len=4096), allow_nan=False)


@st.composite
def plausible_configs(draw: st.DrawFn) -> dict[str, Any]:
    """Configs of every supported model_type with small positive dimensions (mostly valid)."""
    model_type = draw(st.sampled_from(sorted(MODEL_TYPES)))
    small = st.integers(min_value=1, max_value=64)
    config: dict[str, Any] = {"model_type": model_type}
    for key in REQUIRED[MODEL_TYPES[model_type]]:
        config[key] = draw(small)
    for key in draw(st.lists(st.sampled_from(OPTIONAL), max_size=4, unique=True)):
        config[key] = draw(st.one_of(small, st.booleans(), st.none()))
    return config


@FAST
@given(plausible_configs())
def test_plausible_configs_give_a_consistent_spec_or_a_spec_error(config: dict[str, Any]) -> None:
    try:
        spec = from_hf_config(config, name="generated")
    except SpecError as exc:
        assert "\n" not in str(exc)
        return
    check_model_invariants(spec)


@st.composite
def corrupted_configs(draw: st.DrawFn) -> dict[str, Any]:
    """A plausible config with some fields replaced by arbitrary JSON values (wrong types, NaN, huge)."""
    config = draw(plausible_configs())
    keys = [*config, *OPTIONAL]
    for key in draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique=True)):
        config[key] = draw(JSON_VALUES)
    return config


@FAST
@given(st.one_of(corrupted_configs(), st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=6), JSON_VALUES))
def test_arbitrary_configs_never_crash(config: Any) -> None:
    try:
        spec = from_hf_config(config, name="fuzzed")
    except SpecError as exc:
        assert "\n" not in str(exc)
        return
    check_model_invariants(spec)


@FAST
@given(st.binary(max_size=200))
def test_read_json_object_on_arbitrary_bytes(tmp_path_factory: pytest.TempPathFactory, raw: bytes) -> None:
    path = tmp_path_factory.mktemp("bytes") / "config.json"
    path.write_bytes(raw)
    try:
        data = read_json_object(path, "config")
    except SpecError as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(data, dict)


# ---------------------------------------------------------------------- hardware
def _catalog_entry() -> dict[str, Any]:
    path = Path(__file__).resolve().parents[2] / "src" / "batchpilot" / "data" / "accelerators" / "h100-sxm.json"
    return json.loads(path.read_text())


HARDWARE_KEYS = ("display_name", "vendor", "memory_bytes", "peak_flops_per_s", "memory_bandwidth_bytes_per_s",
                 "intra_node_bandwidth_bytes_per_s", "intra_node_link", "notes")


@FAST
@given(st.lists(st.tuples(st.sampled_from((*HARDWARE_KEYS, "extra")), JSON_VALUES), max_size=3),
       st.dictionaries(st.sampled_from((*DTYPES, "int4")), st.one_of(EDGE_NUMBERS, JSON_VALUES), max_size=3))
def test_hardware_files_give_a_plausible_spec_or_a_spec_error(changes: list[tuple[str, Any]],
                                                              flops: dict[str, Any]) -> None:
    data = _catalog_entry()
    for key, value in changes:
        data[key] = value
    if flops:
        data["peak_flops_per_s"] = flops
    try:
        spec = accelerator_from_dict(data, name="fuzzed")
    except SpecError as exc:
        assert "\n" not in str(exc)
        return
    assert 2**20 <= spec.memory_bytes <= 2**44
    assert spec.peak_flops and all(1e9 <= v <= 1e18 for v in spec.peak_flops.values())
    assert math.isfinite(spec.memory_bandwidth_bytes_per_s) and math.isfinite(spec.intra_node_bandwidth_bytes_per_s)
    json.dumps(spec.to_dict(), allow_nan=False)


@FAST
@given(st.text(max_size=40))
def test_accelerator_names_never_crash(name: str) -> None:
    try:
        spec = load_accelerator(name)
    except BatchpilotError as exc:
        assert "\n" not in str(exc)
    else:
        assert spec.name in accelerator_names()


# ---------------------------------------------------------------------- the planner
PLAN_MODELS = ("tiny-llama-1m", "tiny-llama-15m", "tiny-llama-15m", "gpt2", "gpt2", "llama-3-8b", "mixtral-8x7b")


@st.composite
def plan_requests(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "model": draw(st.sampled_from(PLAN_MODELS)),
        "gpu": draw(st.sampled_from(accelerator_names())),
        "devices_per_node": draw(st.sampled_from([1, 2, 3, 4, 8])),
        "num_nodes": draw(st.sampled_from([1, 2, 4])),
        "seq_len": draw(st.sampled_from([1, 7, 128, 512, 2048, 8192, 32768])),
        "global": draw(st.integers(min_value=1, max_value=4096)),
        "in_tokens": draw(st.booleans()),
        "headroom": draw(st.sampled_from([0.0, 0.1, 0.3, 0.99])),  # 0.99: nothing fits, explain quickly
        "max_deviation": draw(st.sampled_from([0.0, 0.0, 0.05, 0.25])),
        "top": draw(st.integers(min_value=1, max_value=6)),
        "pins": {} if draw(st.integers(0, 3)) else draw(st.fixed_dictionaries({}, optional={
            "micro_batch": st.integers(min_value=1, max_value=64), "tp": st.sampled_from([1, 2, 3, 8]),
            "pp": st.sampled_from([1, 2, 5]), "vpp": st.sampled_from([1, 2, 3]),
            "zero_stage": st.integers(min_value=0, max_value=3),
            "recompute": st.sampled_from(["none", "selective", "full"])})),
    }


def _build_request(r: dict[str, Any]) -> Any:
    from batchpilot.plan.planner import Pins, PlanRequest
    from batchpilot.specs.model import load_model

    cluster = ClusterSpec(accelerator=load_accelerator(r["gpu"]), devices_per_node=r["devices_per_node"],
                          num_nodes=r["num_nodes"], inter_node_bandwidth_bytes_per_s=50e9)
    target = {"global_batch_tokens": r["global"] * r["seq_len"]} if r["in_tokens"] else \
        {"global_batch_sequences": r["global"]}
    return PlanRequest(model=load_model(r["model"]), cluster=cluster, seq_len=r["seq_len"], **target,
                       headroom=r["headroom"], max_deviation=r["max_deviation"], top=r["top"], pins=Pins(**r["pins"]))


@pytest.mark.timeout(240)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan_requests())
def test_every_plan_satisfies_its_invariants(r: dict[str, Any]) -> None:
    pytest.importorskip("batchpilot.plan.planner")
    from batchpilot.plan.planner import plan

    try:
        req = _build_request(r)
        result = plan(req)
    except BatchpilotError as exc:
        assert "\n" not in str(exc)
        event(f"refused: {type(exc).__name__}")
        return
    event("planned")
    gpus = req.cluster.total_devices
    target = result.target_sequences
    assert 1 <= len(result.plans) <= req.top
    speeds = [p.step.tokens_per_s for p in result.plans]
    assert speeds == sorted(speeds, reverse=True)
    for p in result.plans:
        t, s = p.triad, p.settings
        assert t.micro_batch_sequences * t.grad_accum_steps * t.data_parallel_ranks == t.global_batch_sequences
        assert t.global_batch_tokens == t.global_batch_sequences * req.seq_len
        assert t.data_parallel_ranks * s.tp * s.pp == gpus
        assert s.vpp == 1 or (s.pp > 1 and t.grad_accum_steps % s.pp == 0 and s.vpp <= -(-req.model.num_layers // s.pp))
        assert p.memory.total_bytes <= req.budget_bytes
        assert abs(p.deviation - (t.global_batch_sequences - target) / target) < 1e-9
        assert abs(p.deviation) <= req.max_deviation + 1e-12
        assert math.isfinite(p.step.tokens_per_s) and p.step.tokens_per_s > 0
        assert 0 < p.step.mfu <= 1
        for key, pinned in req.pins.pinned().items():
            actual = {"micro_batch": t.micro_batch_sequences, "grad_accum": t.grad_accum_steps}.get(key)
            assert (actual if actual is not None else getattr(s, key)) == pinned
    record = result.to_dict()
    json.dumps(record, allow_nan=False)
    assert record["plans"][0]["global_batch_sequences"] == result.plans[0].triad.global_batch_sequences


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=1, max_value=8), st.sampled_from([0.1, 0.5]))
def test_plans_fit_under_the_headroom_they_were_given(gpus: int, headroom: float) -> None:
    """Cross-check with the memory model directly: the chosen plan's memory is what analytic_memory says."""
    pytest.importorskip("batchpilot.plan.planner")
    from batchpilot.estimate.memory import analytic_memory
    from batchpilot.plan.planner import PlanRequest, plan
    from batchpilot.specs.model import load_model

    cluster = ClusterSpec(accelerator=load_accelerator("a100-40gb"), devices_per_node=gpus)
    req = PlanRequest(model=load_model("tiny-llama-15m"), cluster=cluster, seq_len=1024,
                      global_batch_sequences=64 * gpus, headroom=headroom)
    try:
        best = plan(req).plans[0]
    except BatchpilotError:
        assume(False)
        return
    again = analytic_memory(req.model, best.settings, micro_batch=best.triad.micro_batch_sequences,
                            seq_len=req.seq_len, dp=best.triad.data_parallel_ranks,
                            grad_accum=best.triad.grad_accum_steps, gpus_per_node=gpus)
    assert again.total_bytes == best.memory.total_bytes
    assert again.total_bytes <= int(40 * GIB * (1 - headroom))
