"""Schema and provenance checks of ``benchmarks/data/published_runs.json`` and of its mapping onto batchpilot.

Every row must say where its numbers come from (document with URL and commit or date, the quoted cell), carry
units and metrics, sit in the split its id's hash assigns, name a resolvable model and GPU (or a GPU the file
lists as needed), and multiply out (``global = micro × accum × dp``, ``GPUs = dp × tp × pp × cp``) wherever all
factors are known. ``row_to_inputs`` must build complete inputs for every row it does not report as not
expressible, and must reproduce ``benchmarks/steptime_vs_published.py``'s Megatron-LM runs exactly.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter, defaultdict

import pytest
from benchmarks import published_runs as pr
from benchmarks.steptime_vs_published import megatron_runs

from batchpilot.specs.hardware import accelerator_names
from batchpilot.specs.model import preset_names

DATA = pr.load_data()
ROWS = DATA["rows"]
IDS = [r["id"] for r in ROWS]
ROW_KEYS = {
    "id", "source", "document", "locator", "says", "model", "model_overrides", "model_shape", "workload", "gpu",
    "gpu_as_published", "gpus_per_node", "num_gpus", "inter_node_gbit_per_s_per_gpu", "precision",
    "precision_as_published", "fp8_recipe", "param_dtype", "seq_len", "micro_batch", "grad_accum",
    "global_batch_sequences", "global_batch_tokens", "dp", "tp", "pp", "vpp", "pp_schedule", "cp", "ep", "etp", "sp",
    "framework", "sharding", "activation_checkpointing", "compile", "other_settings", "measured", "derived",
    "assumed", "notes", "split",
}
SHAPE_KEYS = {"name", "hf_model_type", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "ffn_hidden_size",
              "vocab_size", "tied_embeddings", "mlp", "source"}
POSITIVE_INTS = ("gpus_per_node", "num_gpus", "seq_len", "micro_batch", "grad_accum", "global_batch_sequences",
                 "global_batch_tokens", "dp", "tp", "pp", "vpp", "cp", "ep", "etp")


def test_header_states_rule_sources_and_needs():
    assert DATA["schema"] == "batchpilot.published_runs/1"
    assert "sha256" in DATA["split_rule"] and "k % 3 == 0" in DATA["split_rule"]
    assert len(ROWS) >= 40 and len(set(IDS)) == len(IDS)
    assert len({r["source"] for r in ROWS}) >= 4
    for key, doc in DATA["documents"].items():
        assert doc["url"].startswith("https://"), key
        assert doc["date"], key
        if doc["repo"] and doc["commit"]:
            assert re.fullmatch(r"[0-9a-f]{40}", doc["commit"]), key
            assert doc["commit"] in doc["url"], key


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_row_schema_and_provenance(row):
    assert set(row) == ROW_KEYS
    assert re.fullmatch(r"[a-z0-9][a-z0-9.\-]*", row["id"])
    assert row["source"] in DATA["sources"] and row["document"] in DATA["documents"]
    assert row["says"].strip() and row["locator"]
    assert row["precision"] in ("bf16", "fp16", "fp8", "mxfp8", "nvfp4")
    assert row["activation_checkpointing"]["policy"] in (None, "none", "full", "selective-op", "selective-layer",
                                                         "selective-attention")
    assert pr.value(row, "seq_len"), "sequence length neither published nor assumed"
    for key in POSITIVE_INTS:
        assert row[key] is None or (isinstance(row[key], int) and row[key] > 0), key
    for name, entry in row["derived"].items():
        assert set(entry) == {"value", "formula"} and entry["formula"], name
    for name, entry in row["assumed"].items():
        assert set(entry) == {"value", "reason"} and len(entry["reason"]) > 10, name
        assert pr.value({**row, "assumed": {}, "derived": {}}, name) is None, f"{name} is published: no assumption"


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_measured_values_carry_units_and_are_positive(row):
    m = row["measured"]
    peak = m["peak_memory"]
    if peak is not None:
        assert peak["unit"] in pr.UNIT_BYTES and peak["value"] > 0
        assert peak["metric"] in ("reserved", "allocated", "active", "unstated") and peak["over"]
    for key in ("tokens_per_s_per_gpu", "model_tflops_per_gpu", "tflops_per_gpu", "step_time_s"):
        assert m[key] is None or m[key] > 0, key
    if m["mfu"] is not None:
        assert 0 < m["mfu"]["value_percent"] < 100 and m["mfu"]["peak_basis"]
    published = [peak, m["tokens_per_s_per_gpu"], m["tflops_per_gpu"], m["model_tflops_per_gpu"], m["step_time_s"]]
    assert any(v is not None for v in published) or m["oom"] or m["other"], "no measured value"


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_model_and_gpu_resolve(row):
    if row["model"] is not None:
        assert row["model"] in preset_names()
        assert row["model_shape"] is None
    elif row["model_shape"]:
        assert set(row["model_shape"]) >= SHAPE_KEYS
        assert pr.value(row, "model_shape.vocab_size")
    else:
        assert row["model_shape"] == {} and "not expressible" in row["notes"]
    assert row["gpu"] in accelerator_names() or row["gpu"] in DATA["gpus_needed"]


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_layout_multiplies_out(row):
    if "inconsistent-as-published" in row["other_settings"]:
        assert "Inconsistent as published" in row["notes"]
        return
    micro, accum, dp, glob = (pr.value(row, k) for k in ("micro_batch", "grad_accum", "dp", "global_batch_sequences"))
    if None not in (micro, accum, dp, glob):
        assert micro * accum * dp == glob
    if glob is not None and row["global_batch_tokens"] is not None:
        assert glob * pr.value(row, "seq_len") == row["global_batch_tokens"]
    if dp is not None:
        assert dp * row["tp"] * row["pp"] * row["cp"] == row["num_gpus"]


def test_split_follows_the_stated_rule():
    by_source = defaultdict(list)
    for row in ROWS:
        by_source[row["source"]].append(row)
    for source, rows in by_source.items():
        ordered = sorted(rows, key=lambda r: hashlib.sha256(r["id"].encode()).hexdigest())
        assert [r["split"] for r in ordered] == ["fit" if k % 3 == 0 else "heldout" for k in range(len(ordered))]
        if len(rows) >= 6:
            assert Counter(r["split"] for r in rows)["fit"] == math.ceil(len(rows) / 3), source


def test_memory_rows_come_from_more_than_one_framework_family():
    families = {DATA["sources"][r["source"]]["framework_family"] for r in ROWS if r["measured"]["peak_memory"]}
    assert len(families) >= 3


def test_published_memory_converts_from_its_unit():
    row = next(r for r in ROWS if r["id"] == "tt-h100-202412-1-8b-8gpu-fsdp")
    assert pr.published_memory_bytes(row) == pytest.approx(82.4 * 2**30)  # torchtitan logs GiB
    swift = next(r for r in ROWS if r["id"] == "msswift-qwen25-14b-zero3-8gpu")
    assert pr.published_memory_bytes(swift) == pytest.approx(58e9)  # '8*58GB' as written


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_row_to_inputs_builds_every_expressible_row(row):
    inputs = pr.row_to_inputs(row)
    if not inputs.not_expressible_throughput:
        assert inputs.model and inputs.settings and inputs.triad and inputs.cluster
        assert inputs.triad.data_parallel_ranks * inputs.settings.tp * inputs.settings.pp * row["cp"] == row["num_gpus"]
        assert inputs.triad.seq_len_tokens == pr.value(row, "seq_len")
    if not inputs.not_expressible_memory:
        assert inputs.model and inputs.settings and inputs.triad
    if row["cp"] > 1 and "cp" not in pr.RunSettings.__dataclass_fields__:
        assert any("context parallelism" in r for r in inputs.not_expressible_memory)
    if row["gpu"] not in accelerator_names():
        assert any(row["gpu"] in r for r in inputs.not_expressible_throughput)


def test_row_to_inputs_reproduces_the_megatron_runs_of_steptime_vs_published():
    expected = {run.label.split(",")[0]: run for run in megatron_runs()}
    rows = [r for r in ROWS if r["source"] == "megatron-lm-paper"]
    assert len(rows) == len(expected) == 10
    for row in rows:
        inputs = pr.row_to_inputs(row)
        run = expected[f"GPT {row['id'].removeprefix('narayanan2021-t1-gpt').removesuffix('b')}B"]
        assert inputs.settings == run.settings and inputs.triad == run.triad
        assert inputs.cluster is not None and inputs.cluster.to_dict() == run.cluster.to_dict()
        assert inputs.model is not None and inputs.model.params_total == run.model.params_total
        assert inputs.model.flops_per_token(2048) == run.model.flops_per_token(2048)


def test_mpt_shapes_reproduce_the_published_parameter_counts():
    """llm-foundry publishes NumParams per run: the transcribed MPT shapes (GPT-2 blocks with learned positions
    of seq_len rows) must give exactly that count — an independent check of the shape and of the mapping."""
    rows = [r for r in ROWS if "num_params" in r["measured"]["other"]]
    assert len(rows) >= 80
    for row in rows:
        model = pr.row_to_inputs(row).model
        assert model is not None and model.params_total == row["measured"]["other"]["num_params"], row["id"]
