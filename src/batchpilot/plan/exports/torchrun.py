"""The ``torchrun`` launch command, from a plan.

``torchrun --nnodes N --nproc-per-node P`` (multi-node: c10d rendezvous on ``$MASTER_ADDR``) starting either
batchpilot's runner — ``batchpilot train`` with the triad (``--global-batch``, ``--micro-batch``; the runner
derives the accumulation from the world size it checks with ``--expect-world-size``), ``--seq-len``,
``--precision``, ``--data`` and the layout and policies: ``--zero``, ``--reshard-after-forward``, ``--tp``,
``--recompute``, ``--recompute-every``, ``--compile``, ``--fp8-recipe`` — for plans the runner runs
(:data:`batchpilot.plan.engines.BATCHPILOT`), or Megatron-LM's ``pretrain_gpt.py`` with the ``megatron``
arguments, prefixed with ``CUDA_DEVICE_MAX_CONNECTIONS=1`` where Megatron-LM asserts it, for Megatron plans.
Other plans are refused with the export that carries them.
"""

from __future__ import annotations

from batchpilot.plan.engines import BATCHPILOT, MEGATRON, plan_problems
from batchpilot.plan.exports._common import Exported, ExportError, ExportOptions, launch_shape, render_shell
from batchpilot.plan.exports.megatron import megatron_args, needs_single_connection
from batchpilot.plan.request import Plan, PlanRequest
from batchpilot.specs.finetune import FULL, format_finetune


def torchrun_command(plan: Plan, request: PlanRequest, data: str | None = None) -> list[str]:
    """``torchrun`` argv for ``plan``: ``batchpilot train`` (DDP, or FSDP2) when the runner runs the plan,
    Megatron-LM's ``pretrain_gpt.py`` with :func:`megatron_args` for Megatron plans."""
    t, s = plan.triad, plan.settings
    nodes, per_node = launch_shape(plan, request)
    cmd = ["torchrun", "--nnodes", str(nodes), "--nproc-per-node", str(per_node)]
    if nodes > 1:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", "$MASTER_ADDR:29500", "--rdzv-id", "batchpilot"]
    runner = plan_problems(BATCHPILOT, s, dp=t.data_parallel_ranks, accum=t.grad_accum_steps, seq_len=request.seq_len)
    if not runner:
        cmd += ["-m", "batchpilot.cli", "train", "--model", request.model.name, "--seq-len", str(t.seq_len_tokens),
                "--global-batch", str(t.global_batch_sequences), "--micro-batch", str(t.micro_batch_sequences),
                "--precision", s.precision, "--expect-world-size", str(nodes * per_node)]
        if data is not None:
            cmd += ["--data", data]
        cmd += _runner_settings(plan)
        return cmd
    if s.engine == "megatron" and not plan_problems(MEGATRON, s, dp=t.data_parallel_ranks, accum=t.grad_accum_steps,
                                                          seq_len=request.seq_len):
        env = ["CUDA_DEVICE_MAX_CONNECTIONS=1"] if needs_single_connection(plan) else []
        return [*env, *cmd, "pretrain_gpt.py", *megatron_args(plan, request, data)]
    raise ExportError(f"--export torchrun launches batchpilot train or Megatron-LM; {runner[0]}")


def _runner_settings(plan: Plan) -> list[str]:
    """``batchpilot train``'s layout and policy flags for the plan's settings (the defaults left out)."""
    s, out = plan.settings, []
    if s.zero_stage:
        out += ["--zero", str(s.zero_stage)]
    if s.reshard_after_forward != "default":
        out += ["--reshard-after-forward", s.reshard_after_forward]
    if s.tp > 1:
        out += ["--tp", str(s.tp)]
    if s.recompute != "none":
        out += ["--recompute", s.recompute]
    if s.recompute_every > 1:
        out += ["--recompute-every", str(s.recompute_every)]
    if s.compile:
        out.append("--compile")
    if s.precision == "fp8":
        out += ["--fp8-recipe", s.resolved_fp8_recipe or "tensorwise"]
    if s.finetune != FULL:
        out += ["--finetune", format_finetune(s.finetune)]
    return out


def torchrun_export(plan: Plan, request: PlanRequest, options: ExportOptions) -> Exported:
    argv = torchrun_command(plan, request, options.data)
    notes = () if options.data is not None or "pretrain_gpt.py" in argv else (
        "the runner trains on its built-in demo corpus (--data stdlib) unless you add --data",)
    return Exported(text=render_shell(argv), notes=notes)
