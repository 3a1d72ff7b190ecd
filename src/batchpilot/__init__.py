"""batchpilot — pick, prove and run the batch size for LLM training.

Quick start (CPU-sized)::

    batchpilot model show llama-3-8b --seq-len 8192
    batchpilot plan --model llama-3-8b --gpu h100-sxm --gpus 64 --seq-len 8192 --global-batch-tokens 4M

The library never prints and raises :class:`batchpilot.errors.BatchpilotError` subclasses for bad input.
"""

__version__ = "0.1.0"
