"""Pretraining objectives: (model, batch) → mean loss. One per family."""

from __future__ import annotations

import torch
from torch import nn

from toolkit.training.loss import lm_cross_entropy


def causal_lm(model: nn.Module, batch: dict) -> torch.Tensor:
    """Next-token prediction on packed windows ``batch["tokens"]`` [b, seq_length + 1]."""
    tokens = batch["tokens"]
    logits = model(tokens[:, :-1])  # [b, s, padded_vocab]
    return lm_cross_entropy(logits, tokens[:, 1:])

