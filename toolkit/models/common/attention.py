"""Multi-head attention: self or cross, causal or bidirectional, grouped-query, with a KV cache.

Separate ``q``, ``k``, ``v`` projections (not one fused matrix) so that tensor parallelism can
shard each by heads with ``ColwiseParallel`` even when key/value heads are fewer than query heads.
Reshapes use ``-1`` for the head count, so the same code runs on tensor-parallel local shards.

``fused_qkv`` (``model.fused_qkv``) computes self-attention's three projections as one matmul over
the concatenated weights, made anew each forward (Megatron's ``linear_qkv`` computed, the parameters
and their names unchanged, so checkpoints, converters and LoRA targets are the same): one larger
GEMM instead of three, and under autocast one cast of the input instead of three (and one input
gradient instead of three summed — under tensor parallelism one all-reduce of it instead of three).
It applies where the three are plain ``nn.Linear`` with local weights (one process, data parallelism,
FSDP2's unsharded parameters) or column-parallel DTensor weights (tensor parallelism: each rank
multiplies its own heads' columns); with LoRA adapters, for cross-attention and for cached decoding
the separate path runs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.models.common.rotary import apply_rotary

#: ``model.attention_backend`` → the ``scaled_dot_product_attention`` kernels allowed (None: PyTorch picks)
ATTENTION_BACKENDS = {"auto": None, "flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                      "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
CUDA_ONLY_BACKENDS = ("cudnn", "efficient")


def sdpa_backend(name: str):
    """A context in which attention runs on the kernel ``model.attention_backend`` names (``auto``:
    PyTorch's own choice, no constraint). On a GPU ``flash`` is FlashAttention-2, ``cudnn`` cuDNN's
    fused attention (Hopper), ``efficient`` the memory-efficient kernel; on a CPU ``flash`` is the
    CPU flash kernel; ``math`` is the unfused reference everywhere. Under ``torch.compile`` the
    choice is made when the graph is traced, inside this context."""
    if ATTENTION_BACKENDS[name] is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, ATTENTION_BACKENDS[name])])


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
                 dropout: float, kv_input_size: int | None = None, softmax_scale: float | None = None,
                 fused_qkv: bool = False):
        super().__init__()
        self.fused_qkv = fused_qkv and kv_input_size is None  # one matmul for q, k, v (self-attention only)
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
        if kv_input is None and cache is None and self._fusable():
            q, k, v = self._fused_projections(x)
            if rope is not None:
                q = apply_rotary(q, *rope)
                k = apply_rotary(k, *rope)
            return self._attend(q, k, v, b, sq, attn_mask, is_causal)
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
        return self._attend(q, k, v, b, sq, attn_mask, is_causal)

    def _fusable(self) -> bool:
        """``fused_qkv`` applies: the three projections are plain ``nn.Linear``, their weights local tensors
        or all column-parallel (``Shard(0)`` DTensors on one mesh, as the tensor-parallel plan makes them)."""
        linears = (self.q, self.k, self.v)
        if not self.fused_qkv or any(type(m) is not nn.Linear for m in linears):
            return False
        meshes = [getattr(m.weight, "device_mesh", None) for m in linears]
        if all(mesh is None for mesh in meshes):
            return True
        from torch.distributed.tensor import Shard

        return all(mesh is meshes[0] and tuple(m.weight.placements) == (Shard(0),) for m, mesh in zip(linears, meshes))

    def _fused_projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [b, h, s, d], k and v [b, kvh, s, d] from one matmul over the concatenated weights (this rank's
        heads under tensor parallelism)."""
        b, s, _ = x.shape
        linears = (self.q, self.k, self.v)
        if hasattr(self.q.weight, "device_mesh"):
            qkv = self._column_parallel_qkv(x)
        else:
            weight = torch.cat([m.weight for m in linears])  # [(h + 2·kvh)·d, hidden]
            bias = None if self.q.bias is None else torch.cat([m.bias for m in linears])
            qkv = F.linear(x, weight, bias)  # [b, s, (h + 2·kvh)·d]
        sizes = [m.weight.to_local().shape[0] if hasattr(m.weight, "to_local") else m.out_features for m in linears]
        q, k, v = qkv.split(sizes, dim=-1)
        q = q.view(b, s, -1, self.head_dim).transpose(1, 2)  # [b, h, s, d]
        k = k.view(b, s, -1, self.head_dim).transpose(1, 2)  # [b, kvh, s, d]
        v = v.view(b, s, -1, self.head_dim).transpose(1, 2)  # [b, kvh, s, d]
        return q, k, v

    def _column_parallel_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """Tensor parallelism: this rank's q, k, v columns [b, s, (h + 2·kvh)·d / tp] from one matmul. The
        local shards are concatenated and the product taken as DTensors (``x`` replicated, the weight
        ``Shard(0)``), as ``ColwiseParallel`` does for each projection, so backward all-reduces the input
        gradient once instead of three times."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        linears = (self.q, self.k, self.v)
        mesh = self.q.weight.device_mesh
        weight = DTensor.from_local(torch.cat([m.weight.to_local() for m in linears]), mesh, [Shard(0)],
                                    run_check=False)  # this rank's [(h + 2·kvh)·d / tp, hidden]
        bias = None if self.q.bias is None else DTensor.from_local(
            torch.cat([m.bias.to_local() for m in linears]), mesh, [Shard(0)], run_check=False)
        x = x if isinstance(x, DTensor) else DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        return F.linear(x.redistribute(mesh, [Replicate()]), weight, bias).to_local()  # [b, s, local columns]

    def _attend(self, q, k, v, b: int, sq: int, attn_mask, is_causal: bool) -> torch.Tensor:
        """Scaled dot-product attention of q [b, h, sq, d] over k, v [b, kvh, sk, d], then ``out``."""
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
