"""Normalization layers: LayerNorm (GPT-2, BERT) and RMSNorm (Llama, T5)."""

from __future__ import annotations

import torch
from torch import nn


def build_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """``LayerNorm`` (weight and bias) or ``RMSNorm`` (weight only)."""
    if kind == "LayerNorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "RMSNorm":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown normalization {kind!r}")


def reset_norm(norm: nn.Module) -> None:
    with torch.no_grad():
        norm.weight.fill_(1.0)
        if getattr(norm, "bias", None) is not None:
            norm.bias.zero_()
