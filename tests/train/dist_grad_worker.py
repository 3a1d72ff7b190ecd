"""torchrun worker for the distributed gradient tests: each rank saves its accumulated gradients.

    torchrun --nproc-per-node 2 tests/train/dist_grad_worker.py CONFIG.json OUT.pt [local]

With ``local``, a hook asks for rank-local gradients (``requires_local_gradients``): the loop skips
DDP's sync, hands the hook the local accumulation, then all-reduces by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from batchpilot.train.config import TrainConfig
from batchpilot.train.distributed import init_distributed, shutdown, unwrap
from batchpilot.train.hooks import BaseHook, StepInfo
from batchpilot.train.loop import Trainer


class LocalGradients(BaseHook):
    requires_local_gradients = True

    def __init__(self) -> None:
        self.local: dict[str, torch.Tensor] = {}

    def on_local_gradients(self, model: torch.nn.Module, info: StepInfo) -> None:
        # ∇ of this rank's loss sum (see batchpilot.train.hooks)
        self.local = {n: p.grad * info.grad_to_sum_factor for n, p in unwrap(model).named_parameters()}
        self.global_targets = info.global_target_tokens


def main() -> None:
    config = TrainConfig.from_dict(json.loads(Path(sys.argv[1]).read_text()))
    env = init_distributed(expected_world_size=2, device="cpu")
    hook = LocalGradients() if sys.argv[3:] == ["local"] else None
    trainer = Trainer(config, env, hooks=[hook] if hook else [])
    layout = trainer._layout(config.batch.global_batch_sequences)
    trainer._accumulate(layout, lr=1e-3)
    grads = {n: p.grad.clone() for n, p in unwrap(trainer.model).named_parameters()}
    extra = {"local": hook.local, "global_targets": hook.global_targets} if hook else {}
    torch.save({"grads": grads, "accum": layout.grad_accum_steps, "world": env.world_size, **extra},
               f"{sys.argv[2]}.rank{env.rank}")
    shutdown()


if __name__ == "__main__":
    main()
