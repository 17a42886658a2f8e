"""Activation recompute per transformer layer (``model.recompute_granularity``).

* ``full``: the whole layer is recomputed in backward (only its input is kept);
* ``selective``: the outputs of the linear projections (matmuls) are kept; the attention core
  (``scaled_dot_product_attention``) and the cheap elementwise ops (norms, activations, RoPE) are
  recomputed — Megatron's selective recompute in spirit, via a selective-checkpoint policy. (Saving
  every non-attention op instead trips autograd's mutation check on some in-place kernels.)

Uses the composable ``torch.distributed._composable.checkpoint`` (hooks, no wrapper module), so
parameter names — and checkpoints — are unchanged.
"""

from __future__ import annotations

from functools import partial
from typing import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

_SAVED_MATMULS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
}


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_MATMULS else CheckpointPolicy.PREFER_RECOMPUTE


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer layers of any family: every module held in an ``nn.ModuleDict`` attribute
    named ``layers`` (GPT/BERT ``model.layers``, T5 ``encoder.layers`` and ``decoder.layers``, and
    the same on a pipeline stage). They are the units of activation recompute and FSDP wrapping."""
    return [block for name, module in model.named_modules() if name.rsplit(".", 1)[-1] == "layers"
            and isinstance(module, nn.ModuleDict) for block in module.values()]


def apply_recompute(blocks: Iterable[nn.Module], granularity: str) -> None:
    if granularity == "none":
        return
    from torch.distributed._composable import checkpoint

    if granularity not in ("full", "selective"):
        raise ValueError(f"unknown recompute granularity {granularity!r}")
    for block in blocks:
        if granularity == "full":
            checkpoint(block)
        else:
            checkpoint(block, context_fn=partial(create_selective_checkpoint_contexts, _selective_policy))
