"""The one table of element sizes: bytes of a stored element and of a saved activation, by dtype name.

    >>> DTYPE_BYTES["bf16"], ACTIVATION_BYTES["fp8"]
    (2, 2)
"""

from __future__ import annotations

#: Bytes of one element by dtype name (the one dtype-size table of batchpilot).
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "bool": 1}


#: Bytes per element of saved activations by precision. fp8 recipes (Transformer Engine) keep bf16
#: copies of most saved tensors for backward, so fp8 is counted like bf16 (an overestimate of ≤ ~25 %
#: of the matmul-input terms).
ACTIVATION_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 2}
