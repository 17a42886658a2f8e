"""Embedding helpers: vocabulary padding (the sizes themselves are :func:`toolkit.config.padded_vocab_size`)."""

from __future__ import annotations

import torch

from toolkit.config import model_vocab_sizes, padded_vocab_size
from toolkit.parallel.tensor import mask_vocab_columns

__all__ = ["mask_padded_vocab", "model_vocab_sizes", "padded_vocab_size"]


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits ``[..., padded_vocab]`` with the padding ids' columns set to -inf, so no loss or sample
    ever sees them (vocab-parallel DTensor logits under tensor parallelism are masked shard-wise)."""
    if logits.shape[-1] == vocab_size:
        return logits
    if hasattr(logits, "device_mesh"):
        return mask_vocab_columns(logits, vocab_size)
    pad = torch.arange(logits.shape[-1], device=logits.device) >= vocab_size
    return logits.masked_fill(pad, float("-inf"))
