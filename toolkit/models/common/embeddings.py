"""Embedding helpers: vocabulary padding (the sizes themselves are :func:`toolkit.config.padded_vocab_size`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from toolkit.config import model_vocab_sizes, padded_vocab_size
from toolkit.parallel.tensor import mask_vocab_columns

__all__ = ["mask_padded_vocab", "model_vocab_sizes", "padded_vocab_size", "vocab_logits"]


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits ``[..., padded_vocab]`` with the padding ids' columns set to -inf, so no loss or sample
    ever sees them (vocab-parallel DTensor logits under tensor parallelism are masked shard-wise)."""
    if logits.shape[-1] == vocab_size:
        return logits
    if hasattr(logits, "device_mesh"):
        return mask_vocab_columns(logits, vocab_size)
    pad = torch.arange(logits.shape[-1], device=logits.device) >= vocab_size
    return logits.masked_fill(pad, float("-inf"))


def vocab_logits(h: torch.Tensor, weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits ``h @ weight.T`` [..., padded_vocab] with the padding ids' columns at -inf.

    On plain tensors the -inf comes in as the matmul's bias (0 on real ids, -inf on padding ids:
    ``addmm`` adds it inside the GEMM), so no second pass over the logits and no masked copy of
    them is kept for backward; real columns are bitwise what ``F.linear(h, weight)`` gives. Under
    tensor parallelism (DTensor weight) the vocab-parallel logits are masked shard-wise."""
    if weight.shape[0] == vocab_size:
        return F.linear(h, weight)
    if hasattr(weight, "device_mesh"):
        return mask_padded_vocab(F.linear(h, weight), vocab_size)
    pad = torch.arange(weight.shape[0], device=weight.device) >= vocab_size  # [padded_vocab]
    bias = torch.zeros(weight.shape[0], device=weight.device, dtype=weight.dtype).masked_fill_(pad, float("-inf"))
    return F.linear(h, weight, bias)
