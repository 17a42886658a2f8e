"""T5's bucketed relative position bias (Raffel et al. 2020, section 2.1; Mesh TensorFlow's scheme).

Every attention logit of a self-attention layer gets a learned scalar per head that depends only on
the bucket of ``key_position - query_position``. Distances below ``max_exact`` (half the buckets of
one direction) each get their own bucket; larger distances share logarithmically wider buckets up
to ``max_distance``, beyond which all distances share the last bucket. The encoder is bidirectional
(half the buckets for keys after the query, half for keys before it); the decoder is causal (only
keys at or before the query, so all buckets describe the past).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def relative_position_bucket(relative_position: torch.Tensor, *, bidirectional: bool, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    """Bucket ids (int64, same shape, values in ``[0, num_buckets)``) of ``key - query`` distances."""
    rel = relative_position.long()
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).long() * num_buckets  # keys after the query use the upper half
        dist = rel.abs()
    else:
        dist = (-rel).clamp(min=0)  # future keys (rel > 0) collapse onto distance 0
    max_exact = num_buckets // 2
    is_small = dist < max_exact
    # log-spaced buckets for max_exact <= dist < max_distance; clamp(min=1) only avoids log(0) in unused lanes
    log_ratio = torch.log(dist.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, dist, large)


class RelativePositionBias(nn.Module):
    """Learned bias table ``weight`` [num_buckets, num_heads] → additive attention bias.

    One instance lives in the first layer of each T5 stack and its output is shared by every layer
    of that stack (as in Hugging Face's ``T5Attention.relative_attention_bias``).
    """

    def __init__(self, *, num_heads: int, num_buckets: int, max_distance: int, bidirectional: bool):
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.weight = nn.Parameter(torch.empty(num_buckets, num_heads))

    def forward(self, query_length: int, key_length: int, *, query_offset: int = 0) -> torch.Tensor:
        """Bias [1, heads, query_length, key_length] for queries at positions ``query_offset + i``
        and keys at positions ``0 … key_length - 1``."""
        device = self.weight.device
        q = torch.arange(query_offset, query_offset + query_length, device=device)[:, None]  # [sq, 1]
        k = torch.arange(key_length, device=device)[None, :]  # [1, sk]
        buckets = relative_position_bucket(k - q, bidirectional=self.bidirectional, num_buckets=self.num_buckets,
                                           max_distance=self.max_distance)  # [sq, sk]
        weight = self.weight  # [buckets, heads]
        if hasattr(weight, "device_mesh"):  # tensor-parallel DTensor sharded over heads: this rank's columns
            weight = weight.to_local()  # [buckets, heads / tp]
        values = F.embedding(buckets, weight)  # [sq, sk, heads]
        return values.permute(2, 0, 1).unsqueeze(0)  # [1, heads, sq, sk]

    def extra_repr(self) -> str:
        kind = "bidirectional" if self.bidirectional else "causal"
        return f"buckets={self.num_buckets}, heads={self.weight.shape[1]}, max_distance={self.max_distance}, {kind}"
