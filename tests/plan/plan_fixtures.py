"""Shared helpers for tests/plan (hand-built hardware with datasheet figures, GPT shapes)."""

from __future__ import annotations

from types import MappingProxyType

from batchpilot.specs.hardware import AcceleratorSpec, ClusterSpec
from batchpilot.specs.model import ModelSpec, from_hf_config

# NVIDIA A100 SXM4 80GB datasheet (https://www.nvidia.com/en-us/data-center/a100/): 312 TFLOP/s dense
# BF16/FP16, 19.5 TFLOP/s FP32, 2,039 GB/s HBM2e, NVLink 600 GB/s bidirectional (300 GB/s each way).
A100 = AcceleratorSpec(
    name="a100-test", display_name="NVIDIA A100 SXM4 80GB", vendor="NVIDIA", memory_bytes=80 * 2**30,
    peak_flops=MappingProxyType({"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    memory_bandwidth_bytes_per_s=2.039e12, intra_node_bandwidth_bytes_per_s=300e9, intra_node_link="NVLink 3",
)


def a100_cluster(nodes: int, per_node: int = 8) -> ClusterSpec:
    """DGX A100-like nodes: one 200 Gb/s HDR NIC per GPU = 25e9 B/s each way (Narayanan et al. 2021 §5)."""
    return ClusterSpec(accelerator=A100, devices_per_node=per_node, num_nodes=nodes,
                       inter_node_bandwidth_bytes_per_s=25e9)


def gpt(*, layers: int, hidden: int, heads: int, vocab: int = 51200, seq: int = 2048) -> ModelSpec:
    """A GPT block as in Narayanan et al. 2021 (GPT-2 architecture, vocabulary 51,200, sequence 2,048)."""
    config = {"model_type": "gpt2", "n_layer": layers, "n_embd": hidden, "n_head": heads,
              "vocab_size": vocab, "n_positions": seq}
    return from_hf_config(config, name=f"gpt-{layers}x{hidden}")
