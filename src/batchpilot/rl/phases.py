"""Memory and time of the phases of one RL step besides the rollout: log-prob passes, update, sync.

Example (the most reported out-of-memory of RL post-training, by hand: 24.5K tokens × 152,064 vocab × 4 B)::

    >>> from batchpilot.specs.model import load_model
    >>> t = logits_terms(load_model("qwen2.5-7b"), tokens=24_500, tp=1, entropy=True)
    >>> round(t["logits_fp32"] / 2**30, 1), round(t["entropy_softmax_fp32"] / 2**30, 1)
    (13.9, 13.9)

Log-prob passes (the actor's "old" log-probabilities, the reference model's, PPO's critic values) run
forward only, micro-batch by micro-batch, with the token budget ``log_prob_max_token_len_per_gpu``. What
one GPU holds at the peak: the resident model states, one layer's working set, and over every token of
the micro-batch the vocabulary-wide tensors of the log-prob (verl ``verl/utils/torch_functional.py``
``logprobs_from_logits`` and ``verl/workers/actor/dp_actor.py`` ``_forward_micro_batch`` at 0.9.1):
the 16-bit logits (2·V bytes), their fp32 copy (4·V) and, when the entropy is computed (the actor's
pass: ``calculate_entropy``), the fp32 softmax ``entropy_from_logits`` builds (4·V). The vocabulary is
split by tensor parallelism; sequence parallelism splits the tokens.

Update: the planner's layout for the update (``batchpilot.plan``): memory per GPU from the analytic
model, time per optimizer step from the step-time model at the longest sequence, scaled by the mean
sequence over the longest (dynamic batching packs micro-batches by tokens).

Forward time: 2 FLOPs per weight and token plus causal attention over the sequence ÷ (GPUs × dense peak ×
the matmul efficiency at M = the micro-batch's tokens). Weight sync (colocated): every rollout GPU
gathers its TP shard of the updated weights over NVLink. Offload (colocated, verl ``param_offload`` /
``optimizer_offload``): model states go to host memory and back once per step over PCIe.
"""

from __future__ import annotations

from batchpilot.estimate.calibration import MatmulShape, default_efficiency
from batchpilot.estimate.dtypes import DTYPE_BYTES
from batchpilot.estimate.steptime import PCIE_BANDWIDTH_BYTES_PER_S
from batchpilot.specs.hardware import AcceleratorSpec
from batchpilot.specs.model import ModelSpec


def logits_terms(model: ModelSpec, *, tokens: float, tp: int, entropy: bool) -> dict[str, float]:
    """Vocabulary-wide tensors of a log-prob pass over ``tokens`` on one GPU (bytes, by name)."""
    v = model.vocab_size / tp
    terms = {"logits_bf16": tokens * v * 2, "logits_fp32": tokens * v * 4}
    if entropy:
        terms["entropy_softmax_fp32"] = tokens * v * 4
    return terms


def forward_layer_bytes(model: ModelSpec, *, tokens: float, tp: int) -> float:
    """One layer's forward working set (no autograd): residual in/out, attention in/out, the MLP's
    gate, up and product (16-bit), the widest MoE expert FFN for MoE layers."""
    width = max(model.intermediate_size, model.moe_intermediate_size * max(1, model.num_experts_per_token)) / tp
    qkv = (model.num_heads * model.head_dim_qk + 2 * model.num_kv_heads * model.head_dim_qk) / tp
    return tokens * (2 * model.hidden_size + qkv + 3 * width) * 2


def log_prob_pass_bytes(model: ModelSpec, *, tokens: float, tp: int, sp: int, resident_bytes: float,
                        entropy: bool) -> dict[str, float]:
    """One GPU at the peak of a log-prob pass of ``tokens`` per micro-batch (split over ``sp``)."""
    local = tokens / sp
    terms = {"resident_states": resident_bytes, "layer_working_set": forward_layer_bytes(model, tokens=local, tp=tp)}
    terms.update(logits_terms(model, tokens=local, tp=tp, entropy=entropy))
    return terms


def forward_time_s(model: ModelSpec, gpu: AcceleratorSpec, *, total_tokens: float, seq_len: int, gpus: int,
                   micro_tokens: float, tp: int) -> float:
    """Forward-only time of ``total_tokens`` tokens (sequences of ``seq_len``) spread over ``gpus`` GPUs."""
    flops = total_tokens * (2 * model.matmul_params_per_token
                            + model.attention_flops_per_token(seq_len) / 3 / 2)  # forward, causal half
    peak = gpu.peak_flops_per_s("bf16")
    shape = MatmulShape(tokens=max(1.0, micro_tokens), width=model.hidden_size / tp,
                        flops_per_byte=peak / gpu.memory_bandwidth_bytes_per_s)
    return flops / (gpus * peak * default_efficiency(shape))


def weight_sync_s(model: ModelSpec, gpu: AcceleratorSpec, *, rollout_tp: int) -> float:
    """Updated bf16 weights into each rollout GPU's TP shard over the intra-node links."""
    return model.params_total * DTYPE_BYTES["bf16"] / rollout_tp / gpu.intra_node_bandwidth_bytes_per_s


def offload_s(states_bytes: float) -> float:
    """Model states to host memory and back once per step over PCIe
    (:data:`batchpilot.estimate.steptime.PCIE_BANDWIDTH_BYTES_PER_S`, an assumption)."""
    return 2 * states_bytes / PCIE_BANDWIDTH_BYTES_PER_S
