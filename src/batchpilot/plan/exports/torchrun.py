"""The ``torchrun`` launch command, from a plan.

The launch command (``--nnodes``, ``--nproc-per-node``): ``batchpilot train`` with the triad (``--global-
batch``, ``--micro-batch``; the runner derives the accumulation from the world size it checks with ``--expect-
world-size``) for data-parallel plans, FSDP2 (``--fsdp``) for ZeRO-2/3; Megatron-LM's ``pretrain_gpt.py`` with
the ``megatron`` arguments for tensor/pipeline/expert plans.
"""

from __future__ import annotations

from batchpilot.plan.exports.megatron import megatron_args
from batchpilot.plan.request import Plan, PlanRequest


def torchrun_command(plan: Plan, request: PlanRequest) -> list[str]:
    """``torchrun`` argv for ``plan``: ``batchpilot train`` (DDP, or FSDP2 for ZeRO-2/3) when the plan is
    purely data-parallel, Megatron-LM's ``pretrain_gpt.py`` with :func:`megatron_args` otherwise."""
    t, s = plan.triad, plan.settings
    world = t.data_parallel_ranks * s.tp * s.pp
    per_node = min(world, request.cluster.devices_per_node)
    nodes = world // per_node
    cmd = ["torchrun", "--nnodes", str(nodes), "--nproc-per-node", str(per_node)]
    if nodes > 1:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", "$MASTER_ADDR:29500", "--rdzv-id", "batchpilot"]
    if s.tp > 1 or s.pp > 1 or s.ep > 1:
        return [*cmd, "pretrain_gpt.py", *megatron_args(plan, request)]
    precision = "bf16" if s.precision == "fp8" else s.precision
    cmd += ["-m", "batchpilot.cli", "train", "--model", request.model.name, "--seq-len", str(t.seq_len_tokens),
            "--global-batch", str(t.global_batch_sequences), "--micro-batch", str(t.micro_batch_sequences),
            "--precision", precision, "--expect-world-size", str(world)]
    if s.zero_stage >= 2:
        cmd.append("--fsdp")
    return cmd
