"""The caches that make planning fast return exactly what an uncached evaluation returns.

The step-time model caches per-layer op times by (shape, implementation) and one micro-batch's compute and
TP/CP/EP communication by every run setting except :data:`~batchpilot.estimate.steptime.MICRO_IGNORED_SETTINGS`;
the memory model caches a layer's activation bytes and a stage's bytes per token by every setting except
:data:`~batchpilot.estimate.memory.LAYER_IGNORED_SETTINGS`. These tests check that the ignored settings really
leave those unchanged, that warm caches answer as cold ones do, and that
:class:`~batchpilot.estimate.layer_time.Parts`' written-out arithmetic covers every field."""

from __future__ import annotations

import dataclasses

import pytest

from batchpilot.estimate import memory
from batchpilot.estimate.activations import layer_bytes
from batchpilot.estimate.layer_time import _PARTS_FIELDS, OP_CLASSES, Parts, dense_layer, head, moe_layer
from batchpilot.estimate.memory import LAYER_IGNORED_SETTINGS, analytic_memory
from batchpilot.estimate.overhead import OverheadModel
from batchpilot.estimate.steptime import MICRO_IGNORED_SETTINGS, StepTimeModel
from batchpilot.specs.batch import BatchTriad
from batchpilot.specs.hardware import ClusterSpec, load_accelerator
from batchpilot.specs.model import load_model
from batchpilot.specs.settings import RunSettings

MOE = RunSettings(engine="megatron", precision="fp8", tp=2, pp=4, ep=8, sp=True, recompute="selective", zero_stage=1)
DENSE = RunSettings(engine="fsdp2", precision="fp8", tp=2, pp=2, cp=2, recompute="op", zero_stage=3, compile=True)
OTHER_VALUES = {"zero_stage": {"zero_stage": 0}, "vpp": {"vpp": 2}, "hybrid_shard": {"hybrid_shard": True},
                "optimizer": {"optimizer": "sgd-momentum"}, "offload": {"offload": True},
                "fp8_all_gather": {"fp8_all_gather": True}, "reshard_after_forward": {"reshard_after_forward": "never"},
                "param_dtype": {"param_dtype": "bf16", "precision": "bf16"}}
"""Other values of each ignored setting (bf16 parameters need bf16 compute: compared with a bf16 base)."""


def _model(name: str, gpus: int) -> StepTimeModel:
    cluster = ClusterSpec(accelerator=load_accelerator("h800"), devices_per_node=8, num_nodes=gpus // 8,
                          inter_node_bandwidth_bytes_per_s=50e9)
    return StepTimeModel(load_model(name), cluster, seq_len=4096)


def test_parts_fields_are_written_out_in_declaration_order():
    assert tuple(f.name for f in dataclasses.fields(Parts)) == _PARTS_FIELDS
    assert _PARTS_FIELDS[:len(OP_CLASSES)] == OP_CLASSES
    values = {name: float(i + 1) / 7 for i, name in enumerate(_PARTS_FIELDS)}
    total = Parts(**values).add(Parts(**values), 3.0)
    assert dataclasses.asdict(total) == {k: v + 3.0 * v for k, v in values.items()}
    assert Parts(**values).total_s == sum(values[c] for c in OP_CLASSES)


@pytest.mark.parametrize(("name", "base"), [("deepseek-v3", MOE), ("llama-3-8b", DENSE)])
def test_settings_the_micro_batch_cache_ignores_do_not_change_a_micro_batch(name, base):
    steps = _model(name, 256)
    assert set(OTHER_VALUES) == MICRO_IGNORED_SETTINGS
    for field, change in OTHER_VALUES.items():
        if field == "fp8_all_gather" and base.engine != "fsdp2":
            continue  # tensorwise fp8 only; Megatron's default recipe is delayed
        reference = dataclasses.replace(base, **{k: v for k, v in change.items() if k != field})
        changed = dataclasses.replace(base, **change)
        assert getattr(changed, field) != getattr(reference, field)
        assert steps._compute_micro(changed, 2) == steps._compute_micro(reference, 2), field


@pytest.mark.parametrize("name", ["deepseek-v3", "llama-3-8b"])
def test_a_warm_model_estimates_as_a_fresh_one(name):
    base = MOE if name == "deepseek-v3" else DENSE
    variants = [base, dataclasses.replace(base, recompute="full"), dataclasses.replace(base, zero_stage=0),
                dataclasses.replace(base, tp=4), dataclasses.replace(base, recompute="none", recompute_every=1)]
    warm = _model(name, 256)
    for settings in variants:  # fill every cache first
        for b in (1, 2, 4):
            warm.estimate(settings, BatchTriad(micro_batch_sequences=b, grad_accum_steps=8 // b * 4,
                                               data_parallel_ranks=256 // settings.model_parallel_size,
                                               seq_len_tokens=4096))
    for settings in reversed(variants):
        for b in (4, 2, 1):
            triad = BatchTriad(micro_batch_sequences=b, grad_accum_steps=8 // b * 4,
                               data_parallel_ranks=256 // settings.model_parallel_size, seq_len_tokens=4096)
            assert warm.estimate(settings, triad) == _model(name, 256).estimate(settings, triad)


LAYER_OTHER_VALUES = {**OTHER_VALUES, "pp": {"pp": 8}, "optimizer": {"optimizer": "adafactor"}}
"""Other values of each setting the activation caches ignore."""


@pytest.mark.parametrize(("name", "base"), [("deepseek-v3", MOE), ("llama-3-8b", DENSE),
                                            ("llama-3-8b", RunSettings(engine="torch", recompute="full"))])
def test_settings_the_activation_caches_ignore_do_not_change_activations(name, base):
    model = load_model(name)
    assert set(LAYER_OTHER_VALUES) >= LAYER_IGNORED_SETTINGS
    for field in LAYER_IGNORED_SETTINGS:
        change = LAYER_OTHER_VALUES[field]
        if field == "fp8_all_gather" and base.engine != "fsdp2":
            continue
        if field == "offload" and base.zero_stage == 0:
            change = {"offload": True, "zero_stage": 1}
        if field == "zero_stage" and base.zero_stage == 0:
            change = {"zero_stage": 1}
        if field == "vpp" and base.pp == 1:
            change = {"vpp": 2, "pp": 4}
        reference = dataclasses.replace(base, **{k: v for k, v in change.items() if k != field})
        changed = dataclasses.replace(base, **change)
        assert getattr(changed, field) != getattr(reference, field)
        for moe in (False, True) if model.is_moe else (False,):
            for policy in ("none", "selective", "op", "full"):
                assert (layer_bytes(model, changed, seq_len=4096, moe_layer=moe, policy=policy, imbalance=1.0)
                        == layer_bytes(model, reference, seq_len=4096, moe_layer=moe, policy=policy,
                                       imbalance=1.0)), (field, policy)
        for first, last in ((True, True), (True, False), (False, True)):
            stage = []
            for settings in (changed, reference):
                memory._STAGE_TOKENS.clear()
                stage.append(memory._stage_tokens(model, memory._config_key(model), settings, 8, OverheadModel(), 4096,
                                                  first, last))
            assert stage[0] == stage[1], (field, first, last)


@pytest.mark.parametrize(("name", "settings", "dp"), [
    ("deepseek-v3", MOE, 32), ("llama-3-8b", dataclasses.replace(DENSE, pp=1), 16),
    ("llama-3-8b", RunSettings(engine="deepspeed", zero_stage=2, recompute="selective"), 64),
])
def test_warm_memory_caches_answer_as_cold_ones(name, settings, dp):
    model = load_model(name)
    pairs = [(1, 8), (2, 4), (4, 8), (2, 4), (1, 8)]
    warm = [analytic_memory(model, settings, micro_batch=b, seq_len=4096, dp=dp, grad_accum=m) for b, m in pairs]
    for (b, m), remembered in zip(pairs, warm, strict=True):
        memory._LAYER_CACHE.clear()
        memory._STAGE_TOKENS.clear()
        memory._stage_fixed.cache_clear()
        assert analytic_memory(model, settings, micro_batch=b, seq_len=4096, dp=dp, grad_accum=m) == remembered


def test_a_dense_layer_and_the_head_do_not_depend_on_the_expert_parallel_size():
    """The layer cache keys :func:`dense_layer` and :func:`head` without ``ep`` (only MoE layers run experts)."""
    steps = _model("deepseek-v3", 256)
    impl = steps.implementation_for(MOE)
    for kind in (dense_layer, head):
        times = [kind(steps.cluster.accelerator, steps.profile, impl, steps.model,
                      dataclasses.replace(steps._shape(MOE, 2), ep=ep)) for ep in (1, 8, 64)]
        assert times[0] == times[1] == times[2]
    moe = [moe_layer(steps.cluster.accelerator, steps.profile, impl, steps.model,
                     dataclasses.replace(steps._shape(MOE, 2), ep=ep)) for ep in (1, 8)]
    assert moe[0] != moe[1]
