"""Embedding helpers: vocabulary padding."""

from __future__ import annotations


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int = 1) -> int:
    """Round ``vocab_size`` up to a multiple of ``divisible_by × tensor_parallel`` (Megatron's rule)."""
    multiple = max(1, divisible_by) * max(1, tensor_parallel)
    return ((vocab_size + multiple - 1) // multiple) * multiple
