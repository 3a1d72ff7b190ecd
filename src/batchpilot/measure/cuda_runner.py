"""CUDA trials: in this process, on the current device (``LOCAL_RANK`` under torchrun).

The trial body (:func:`batchpilot.measure._trial.run_cuda_trial`) caps the caching allocator at the
budget, catches ``torch.OutOfMemoryError`` and frees everything; under torchrun every rank runs the same
trial and all agree on its outcome.
"""

from __future__ import annotations

import os
import time

from batchpilot.measure.probe_types import ProbeRequest, trial_spec
from batchpilot.records.probe import ProbeTrial


class CudaTrialRunner:
    """Trials in this process on the current CUDA device (``LOCAL_RANK`` under torchrun).

    Under torchrun (``WORLD_SIZE`` > 1) it joins the NCCL process group, so every trial's outcome is
    agreed by all ranks (``_trial.agree_across_ranks``) and all ranks take the same search path.
    """

    def __init__(self, request: ProbeRequest) -> None:
        self.request = request
        self._owns_group = False
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch
            import torch.distributed as dist

            if not dist.is_initialized():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
                dist.init_process_group("nccl")
                self._owns_group = True

    def close(self) -> None:
        if self._owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owns_group = False

    def __call__(self, micro_batch: int) -> ProbeTrial:
        from batchpilot.measure._trial import TrialSpec, run_cuda_trial

        start = time.perf_counter()
        r = run_cuda_trial(TrialSpec(**trial_spec(self.request, micro_batch)))
        return ProbeTrial(micro_batch=micro_batch, fits=r.fits, peak_bytes=r.peak_bytes,
                          tokens_per_s=r.tokens_per_s, seconds=time.perf_counter() - start, error=r.error,
                          peak_source=r.peak_source if r.fits else None)
