"""Multi-head attention: self or cross, causal or bidirectional, grouped-query, with a KV cache.

Separate ``q``, ``k``, ``v`` projections (not one fused matrix) so that tensor parallelism can
shard each by heads with ``ColwiseParallel`` even when key/value heads are fewer than query heads.
Reshapes use ``-1`` for the head count, so the same code runs on tensor-parallel local shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.models.common.rotary import apply_rotary


@dataclass
class KVCache:
    """Keys and values of one attention layer for incremental decoding."""

    k: torch.Tensor  # [b, kv_heads, max_len, head_dim]
    v: torch.Tensor  # [b, kv_heads, max_len, head_dim]
    length: int = 0  # positions filled so far

    @classmethod
    def empty(cls, batch: int, kv_heads: int, max_len: int, head_dim: int, *, device, dtype) -> "KVCache":
        shape = (batch, kv_heads, max_len, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` [b, kv_heads, s, head_dim] after what is cached; return all keys and values."""
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; asked for {end}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, *, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool,
                 dropout: float, kv_input_size: int | None = None, softmax_scale: float | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.dropout = dropout
        self.softmax_scale = softmax_scale  # None → 1/sqrt(head_dim); T5 uses 1.0
        kv_in = kv_input_size or hidden_size
        self.q = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k = nn.Linear(kv_in, num_kv_heads * head_dim, bias=bias)
        self.v = nn.Linear(kv_in, num_kv_heads * head_dim, bias=bias)
        self.out = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)

    def forward(
        self,
        x: torch.Tensor,  # [b, sq, hidden]
        *,
        kv_input: torch.Tensor | None = None,  # [b, sk, kv_in] for cross-attention; None → self-attention
        attn_mask: torch.Tensor | None = None,  # bool (True = attend) or additive float, broadcast to [b, h, sq, sk]
        is_causal: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,  # cos, sin [sq, head_dim]
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        b, sq, _ = x.shape
        src = x if kv_input is None else kv_input
        q = self.q(x).view(b, sq, -1, self.head_dim).transpose(1, 2)  # [b, h, sq, d]
        if cache is not None and kv_input is not None and cache.length > 0:
            k, v = cache.k[:, :, : cache.length], cache.v[:, :, : cache.length]  # cross-attn: encoder keys cached
        else:
            sk = src.shape[1]
            k = self.k(src).view(b, sk, -1, self.head_dim).transpose(1, 2)  # [b, kvh, sk, d]
            v = self.v(src).view(b, sk, -1, self.head_dim).transpose(1, 2)  # [b, kvh, sk, d]
            if rope is not None:
                q = apply_rotary(q, *rope)
                k = apply_rotary(k, *rope)
            if cache is not None:
                past = cache.length
                k, v = cache.append(k, v)
                if is_causal and sq > 1 and past > 0:
                    # queries at positions past..past+sq-1 see keys 0..their own position
                    attn_mask = torch.ones(sq, k.shape[2], dtype=torch.bool, device=x.device).tril(past)
                    is_causal = False
                elif past > 0:
                    is_causal = False  # a single new query sees every cached key
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal and attn_mask is None,
            scale=self.softmax_scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )  # [b, h, sq, d]
        out = out.transpose(1, 2).reshape(b, sq, -1)  # [b, sq, h*d]
        return self.out(out)
