"""Collective communication at ACHIEVED bus bandwidth: where a group's ranks sit, and how long a collective takes.

Ranks are placed as Megatron-Core places them: tensor-parallel ranks adjacent (stride 1), then context
parallel (stride t), then data parallel (stride t·cp; experts are spread over data-parallel ranks), then
pipeline stages (stride t·cp·d). A group of n ranks with stride r has ``local`` members per node
(n if n·r ≤ GPUs per node, else max(1, GPUs per node ÷ r)) and spans n / local nodes.

- Within one node (or one NVLink domain, e.g. 72 GPUs of a GB200 NVL72) a ring collective runs at the
  fabric's measured ring bus bandwidth (network catalog, :mod:`batchpilot.specs.network`: 82 % of
  NVLink 4 on H100/H200, 77 % of NVLink 3 on A100); an all-reduce at the NVLS figure where one was
  measured (NVLink SHARP reduces in the switch: 107 % on H100).
- Across nodes every ring of NCCL crosses the node boundary on another NIC, so a ring's bus bandwidth
  approaches ``local × per-GPU NIC bandwidth × achieved fraction`` (the network's measured all-reduce
  over its NIC sum: 94 % for 400 Gb/s InfiniBand), capped by the intra-node ring; see
  https://github.com/stas00/ml-engineering/blob/744d01e18b79512572f64a6bbd8b5f4a725203a7/network/README.md
  ("Inter-node speed depends on intra-node speed": 4 × 8 B200, 4 GiB all-reduce in 22.05 ms, within 6 %
  of 7.75 GiB over the node's 8 × 50 GB/s).
- Message size: bus bandwidth × P/(P + P_half), P_half fitted to published sweeps per generation
  (:class:`batchpilot.estimate.kernels.KernelProfile`); small collectives are latency-bound.
- Times (P = the full buffer, n ranks): all-reduce 2(n−1)/n·P ÷ busbw; all-gather and reduce-scatter
  (n−1)/n·P ÷ busbw (nccl-tests doc/PERFORMANCE.md); all-to-all: each rank sends (n − local)/n of its P
  through its own NIC and (local − 1)/n over NVLink, at DeepEP's measured fractions of link peak
  (:data:`ALL_TO_ALL_INTER_FRACTION`, :data:`ALL_TO_ALL_INTRA_FRACTION`), the slower of the two;
  point-to-point: :data:`P2P_LATENCY_S` + P ÷ the link at the ring fraction (one send is no collective:
  the collectives' message-size curve does not apply to it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from batchpilot.errors import SpecError
from batchpilot.estimate.kernels import KernelProfile
from batchpilot.specs.hardware import ClusterSpec
from batchpilot.specs.network import NetworkSpec, load_network

DEFAULT_SCALE_OUT = "ib-ndr"
"""The network whose measured achieved fraction applies when a cluster names none (400 Gb/s InfiniBand per
GPU, ring all-reduce at 94 % of the NIC sum: NVIDIA/nccl-tests issue 290)."""

P2P_LATENCY_S = 20e-6
"""Latency of one NCCL send/recv (an assumption of the order NCCL's small-message times show, not measured)."""

ALL_TO_ALL_INTRA_FRACTION = 153.0 / 160.0
"""DeepEP on H800 (docs/legacy.md at deepseek-ai/DeepEP dd758ca): intranode dispatch over EP 8 reaches
'153 GB/s (NVLink)' of '~160 GB/s NVLink maximum bandwidth'."""

ALL_TO_ALL_INTER_FRACTION = 43.0 / 50.0
"""DeepEP internode dispatch over EP 16: '43 GB/s (RDMA)' bottleneck bandwidth on 'CX7 InfiniBand 400 Gb/s
RDMA network card (~50 GB/s maximum bandwidth)' (51 GB/s at EP 64)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Fabric:
    """Achieved bandwidths between the GPUs of one cluster (bytes/s, one direction, per GPU)."""

    gpus_per_node: int
    """GPUs per node, or per NVLink domain."""
    intra_link_bytes_per_s: float
    """The accelerator's intra-node link peak."""
    intra_ring_bytes_per_s: float
    """Measured ring bus bandwidth inside a node (all-gather, reduce-scatter, ring all-reduce)."""
    intra_all_reduce_bytes_per_s: float
    """Measured all-reduce bus bandwidth inside a node (NVLS where published, else the ring's)."""
    inter_link_bytes_per_s: float
    """Per-GPU network link peak (0 on one node)."""
    inter_fraction: float
    """Achieved ring bus bandwidth ÷ the node's NIC sum (the network's measured fraction)."""
    intra_half_bytes: float
    inter_half_bytes: float
    network: str
    """The scale-out network the fraction comes from."""

    @classmethod
    def of(cls, cluster: ClusterSpec, profile: KernelProfile, network: NetworkSpec | None = None) -> Fabric:
        link = cluster.accelerator.intra_node_bandwidth_bytes_per_s
        if profile.intra_node_network is not None:
            ring, reduce = _measured_fractions(load_network(profile.intra_node_network))
        else:
            ring = reduce = profile.intra_node_bus_efficiency or 0.0
        scale_out = network or cluster.network or load_network(DEFAULT_SCALE_OUT)
        fraction = scale_out.achieved_fraction
        if fraction is None:
            fraction = load_network(DEFAULT_SCALE_OUT).achieved_fraction or 1.0
        return cls(gpus_per_node=cluster.devices_per_node, intra_link_bytes_per_s=link,
                   intra_ring_bytes_per_s=ring * link, intra_all_reduce_bytes_per_s=max(ring, reduce) * link,
                   inter_link_bytes_per_s=cluster.inter_node_bandwidth_bytes_per_s or 0.0, inter_fraction=fraction,
                   intra_half_bytes=profile.intra_node_half_bytes, inter_half_bytes=profile.inter_node_half_bytes,
                   network=scale_out.name)

    def placement(self, ranks: int, stride: int) -> tuple[int, int]:
        """(members per node, nodes spanned) of a group of ``ranks`` ranks ``stride`` apart (module docstring)."""
        if ranks * stride <= self.gpus_per_node:
            return ranks, 1
        local = max(1, min(ranks, self.gpus_per_node // stride))
        return local, math.ceil(ranks / local)

    def bus_bytes_per_s(self, ranks: int, stride: int, message_bytes: float, *, all_reduce: bool = False) -> float:
        """Achieved bus bandwidth of a ring collective of ``message_bytes`` over this group."""
        local, nodes = self.placement(ranks, stride)
        if nodes == 1:
            peak = self.intra_all_reduce_bytes_per_s if all_reduce else self.intra_ring_bytes_per_s
            half = self.intra_half_bytes
        else:
            peak = min(self.intra_ring_bytes_per_s, local * self.inter_link_bytes_per_s * self.inter_fraction)
            half = self.inter_half_bytes
        return peak * message_bytes / (message_bytes + half)

    def all_reduce_s(self, message_bytes: float, ranks: int, stride: int) -> float:
        if ranks <= 1 or message_bytes <= 0:
            return 0.0
        bus = self.bus_bytes_per_s(ranks, stride, message_bytes, all_reduce=True)
        return 2.0 * (ranks - 1) / ranks * message_bytes / bus

    def gather_s(self, message_bytes: float, ranks: int, stride: int) -> float:
        """All-gather (or reduce-scatter) of a ``message_bytes`` buffer (the gathered size)."""
        if ranks <= 1 or message_bytes <= 0:
            return 0.0
        return (ranks - 1) / ranks * message_bytes / self.bus_bytes_per_s(ranks, stride, message_bytes)

    def all_to_all_s(self, message_bytes: float, ranks: int, stride: int, *, remote_bytes: float | None = None) -> float:
        """All-to-all where each rank sends ``message_bytes`` in total, spread evenly over the ranks; what leaves the
        node is (n − local)/n of it, or ``remote_bytes`` where the dispatcher sends each token once per node."""
        if ranks <= 1 or message_bytes <= 0:
            return 0.0
        local, nodes = self.placement(ranks, stride)
        intra = message_bytes * (local - 1) / ranks / (self.intra_link_bytes_per_s * ALL_TO_ALL_INTRA_FRACTION)
        if nodes == 1:
            size = message_bytes / (message_bytes + self.intra_half_bytes)
            return intra / size
        remote = message_bytes * (ranks - local) / ranks if remote_bytes is None else remote_bytes
        inter = remote / (self.inter_link_bytes_per_s * ALL_TO_ALL_INTER_FRACTION)
        return max(intra, inter) * (message_bytes + self.inter_half_bytes) / message_bytes

    def p2p_s(self, message_bytes: float, stride: int) -> float:
        """One send between ranks ``stride`` apart (pipeline stages)."""
        if message_bytes <= 0:
            return 0.0
        if stride < self.gpus_per_node:
            bw = self.intra_ring_bytes_per_s
        else:
            bw = self.inter_link_bytes_per_s * self.inter_fraction
        return P2P_LATENCY_S + message_bytes / bw


def _measured_fractions(network: NetworkSpec) -> tuple[float, float]:
    """(ring, all-reduce) measured busbw ÷ one GPU's link for a scale-up network: the ring entry (or the first),
    and the best all-reduce entry (NVLS where published)."""
    entries = network.measured_all_reduce
    if not entries:
        raise SpecError(f"network {network.name} has no measured all-reduce; a kernel profile's "
                        "intra_node_network must name one that has")
    link = network.nic_bandwidth_bytes_per_s
    ring = next((m for m in entries if m.algorithm == "ring"), entries[0]).bus_bandwidth_bytes_per_s / link
    best = max(m.bus_bandwidth_bytes_per_s for m in entries) / link
    return ring, best
