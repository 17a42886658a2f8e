"""Rotary position embeddings (RoPE) in the non-interleaved ("rotate half") convention.

This is the convention of Megatron-LM and Hugging Face Llama, so checkpoint conversion needs no
permutation of the query/key weights.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Holds cos/sin tables of shape ``[max_seq, head_dim]`` as non-persistent buffers."""

    def __init__(self, *, head_dim: int, max_seq: int, base: float = 10000.0):
        super().__init__()
        self.head_dim, self.max_seq, self.base = head_dim, max_seq, base
        self.register_buffer("cos", torch.empty(max_seq, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq, head_dim), persistent=False)
        if self.cos.device.type != "meta":
            self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        device = self.cos.device
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float64)
                                        / self.head_dim))
        t = torch.arange(self.max_seq, device=device, dtype=torch.float64)
        freqs = torch.outer(t, inv_freq)  # [max_seq, head_dim/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [max_seq, head_dim]
        self.cos.copy_(emb.cos())
        self.sin.copy_(emb.sin())

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for ``positions`` [s] → each [s, head_dim]; per-sample ``positions`` [b, s] (packed
        sequences) → each [b, 1, s, head_dim], broadcast over heads."""
        if positions.dim() == 2:
            return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        return self.cos[positions], self.sin[positions]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [b, heads, s, head_dim] by cos/sin [s, head_dim] or [b, 1, s, head_dim] (in fp32)."""
    dtype = x.dtype
    x = x.float()
    out = x * cos + _rotate_half(x) * sin
    return out.to(dtype)
