"""Global gradient-norm clipping across every parallel dim, for DTensor and plain gradients.

Each rank adds the squared norm of its local gradient shards, weighted so that a tensor held in
``k`` identical copies across the ranks of its pipeline stage counts once; one all-reduce over
the world gives the squared norm of the full model (all pipeline stages included). A parameter
that several pipeline stages hold (a tied word embedding copied onto the last stage) is left out
of the norm on all but one stage (``exclude_from_norm``) and clipped everywhere.
"""

from __future__ import annotations

import math
from typing import Collection

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

# FSDP2 over a tensor-parallel dim shards with _StridedShard, which is not a Shard subclass
_SHARDS = (Shard, _StridedShard)


def _materialize(grad: torch.Tensor) -> torch.Tensor:
    """Reduce any pending ``Partial`` placements so the local shard is final."""
    if isinstance(grad, DTensor) and any(isinstance(p, Partial) for p in grad.placements):
        return grad.redistribute(placements=[Replicate() if isinstance(p, Partial) else p for p in grad.placements])
    return grad


def _distinct_shards(t: torch.Tensor) -> int:
    if not isinstance(t, DTensor):
        return 1
    mesh = t.device_mesh
    return math.prod(mesh.size(i) for i, p in enumerate(t.placements) if isinstance(p, _SHARDS))


@torch.no_grad()
def clip_grad_norm_(params: list[torch.nn.Parameter], max_norm: float, *, stage_size: int,
                    group: dist.ProcessGroup | None = None,
                    exclude_from_norm: Collection[int] = ()) -> torch.Tensor:
    """Clip in place to global L2 norm ``max_norm`` (``inf`` → only measure); returns the norm.

    ``stage_size``: ranks holding one pipeline stage (world / pp); ``group``: all ranks (default);
    ``exclude_from_norm``: ``id`` of parameters another pipeline stage counts (clipped, not counted).
    """
    device = None
    total = None
    for p in params:
        if p.grad is None:
            continue
        grad = _materialize(p.grad)
        if grad is not p.grad:
            p.grad = grad
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        device = local.device
        if id(p) in exclude_from_norm:
            continue
        sq = local.detach().double().pow(2).sum() * _distinct_shards(grad)
        total = sq if total is None else total + sq
    if total is None:
        total = torch.zeros((), dtype=torch.float64, device=device or "cpu")
    if dist.is_initialized():
        dist.all_reduce(total, group=group)
        total = total / stage_size
    norm = total.sqrt().float()
    if math.isfinite(max_norm):
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in params:
            if p.grad is not None:
                g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                g.mul_(coef.to(g.device, g.dtype))
    return norm
