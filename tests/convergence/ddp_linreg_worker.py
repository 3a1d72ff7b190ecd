"""torchrun worker: B_simple of the synthetic linear regression from local vs all-reduced gradients.

Run by test_noise_estimator.py as ``torchrun --nproc-per-node 2 ddp_linreg_worker.py OUT.json STEPS``.
Each rank draws its own examples; the DDP communication hook records |g_local|² before and
|g_global|² after the all-reduce (B_small = local batch, B_big = local batch × world size). With
accumulation (``no_sync`` on all but the last micro-step) the local batch is micro × accum.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from linreg import LinReg, loss_sum

from batchpilot.estimate.noise import NoiseSample, NoiseScaleEstimator
from batchpilot.train.grad_norms import DDPNoiseState, noise_allreduce_hook

PROBLEM = LinReg(dim=16, noise_var=4.0, delta_sq=1.0)
MICRO, ACCUM = 8, 2


def main(out_path: str, steps: int) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, w_star = PROBLEM.make(seed=0)  # identical parameters on every rank
    ddp = DistributedDataParallel(model)
    hook = DDPNoiseState()
    ddp.register_comm_hook(state=hook, hook=noise_allreduce_hook)
    gen = torch.Generator().manual_seed(1000 + rank)
    local_batch = MICRO * ACCUM
    estimator = NoiseScaleEstimator(ema_decay=1.0)
    for _ in range(steps):
        ddp.zero_grad()
        for micro in range(ACCUM):
            x, y = PROBLEM.batch(w_star, MICRO, gen)
            # no_sync must wrap the forward too: DDP decides at forward time whether to all-reduce
            sync = contextlib.nullcontext() if micro == ACCUM - 1 else ddp.no_sync()
            with sync:
                (loss_sum(ddp, x, y) / local_batch).backward()  # local mean; the hook averages over ranks
        local_sq, global_sq = hook.pop()
        estimator.update(NoiseSample(b_small=local_batch, b_big=local_batch * world, sq_norm_small=local_sq,
                                     sq_norm_big=global_sq, tokens_per_sequence=1.0))
    if rank == 0:
        record = estimator.estimate().to_dict()
        record.update(world_size=world, true_b_simple=PROBLEM.b_simple)
        with open(out_path, "w") as fh:
            json.dump(record, fh)
    # Release DDP before the process group, after a barrier: destroying gloo with the reducer still
    # alive intermittently aborted at exit ("terminate called without an active exception").
    del ddp
    dist.barrier()
    dist.destroy_process_group()
    # Gloo's worker threads may still hold finished futures (our comm hook's ``then`` callbacks) whose
    # release during interpreter finalisation intermittently aborts (SIGABRT, "terminate called without
    # an active exception"; cf. pytorch/pytorch PR #179291). The result is written; skip finalisation.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
