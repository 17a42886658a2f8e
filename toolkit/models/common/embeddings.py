"""Embedding helpers: vocabulary padding."""

from __future__ import annotations

import torch


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int = 1) -> int:
    """Round ``vocab_size`` up to a multiple of ``divisible_by × tensor_parallel`` (Megatron's rule)."""
    multiple = max(1, divisible_by) * max(1, tensor_parallel)
    return ((vocab_size + multiple - 1) // multiple) * multiple


def model_vocab_sizes(cfg, tensor_parallel_size: int = 1) -> tuple[int, int]:
    """(vocabulary, padded vocabulary) of a ``ModelConfig`` built for ``tensor_parallel_size``."""
    if cfg.vocab_size is None:
        raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) before building the model")
    return cfg.vocab_size, padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tensor_parallel_size)


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits ``[..., padded_vocab]`` with the padding ids' columns set to -inf, so no loss or sample
    ever sees them (vocab-parallel DTensor logits under tensor parallelism are masked shard-wise)."""
    if logits.shape[-1] == vocab_size:
        return logits
    if hasattr(logits, "device_mesh"):
        from toolkit.parallel.tensor import mask_vocab_columns

        return mask_vocab_columns(logits, vocab_size)
    pad = torch.arange(logits.shape[-1], device=logits.device) >= vocab_size
    return logits.masked_fill(pad, float("-inf"))
