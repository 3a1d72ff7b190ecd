"""torchrun worker for the distributed gradient test: each rank saves its accumulated gradients.

    torchrun --nproc-per-node 2 tests/train/dist_grad_worker.py CONFIG.json OUT.pt
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from batchpilot.train.config import TrainConfig
from batchpilot.train.distributed import init_distributed, shutdown, unwrap
from batchpilot.train.loop import Trainer


def main() -> None:
    config = TrainConfig.from_dict(json.loads(Path(sys.argv[1]).read_text()))
    env = init_distributed(expected_world_size=2, device="cpu")
    trainer = Trainer(config, env)
    layout = trainer._layout(config.batch.global_batch_sequences)
    trainer._accumulate(layout, lr=1e-3)
    grads = {n: p.grad.clone() for n, p in unwrap(trainer.model).named_parameters()}
    torch.save({"grads": grads, "accum": layout.grad_accum_steps, "world": env.world_size},
               f"{sys.argv[2]}.rank{env.rank}")
    shutdown()


if __name__ == "__main__":
    main()
