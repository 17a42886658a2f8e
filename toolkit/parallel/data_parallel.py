"""Data parallelism on the ``dp`` mesh dim: FSDP2 ``fully_shard`` or replicated (FSDP2-style replicate).

``data_parallel_sharding``:

* ``full``: parameters, gradients and optimizer state sharded; parameters re-gathered for backward
  (ZeRO-3 / Megatron's ``--use-torch-fsdp2``);
* ``optimizer_and_grads``: as ``full`` but parameters stay gathered between forward and backward
  (``reshard_after_forward=False``, ZeRO-2-like; Megatron's distributed optimizer);
* ``none``: every dp rank holds everything; gradients are all-reduced (DDP semantics).

Gradient accumulation: :func:`set_grad_sync` turns the reduction off for all but the last micro-batch.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn
from torch.distributed.device_mesh import DeviceMesh


def apply_data_parallel(model: nn.Module, dp_mesh: DeviceMesh, sharding: str, blocks: Iterable[nn.Module]) -> nn.Module:
    """Wrap each unit (transformer layers, inner units first) and then the root in place; returns ``model``."""
    if sharding == "none":
        from torch.distributed._composable.replicate_with_fsdp import replicate

        for block in blocks:
            replicate(block, mesh=dp_mesh)
        replicate(model, mesh=dp_mesh)
        return model
    from torch.distributed.fsdp import fully_shard

    reshard = sharding == "full"
    for block in blocks:
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard)
    return model


def set_grad_sync(model: nn.Module, enabled: bool) -> None:
    """Reduce gradients across dp after this backward (``True``) or just accumulate them (``False``)."""
    fn = getattr(model, "set_requires_gradient_sync", None)
    if fn is not None:
        fn(enabled)
