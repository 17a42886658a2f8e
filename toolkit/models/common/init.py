"""Megatron-style initialization shared by every family."""

from __future__ import annotations

import math

import torch
from torch import nn

# Output projections of residual branches: their std is scaled by 1/sqrt(2 × num_layers).
RESIDUAL_OUTPUTS = ("attn.out", "mlp.fc2", "cross_attn.out")


@torch.no_grad()
def init_weights(model: nn.Module, *, std: float, num_layers: int, generator: torch.Generator | None = None) -> None:
    """Normal(0, std) for linears and embeddings, zero biases, unit norms; residual outputs scaled.

    Parameters are visited in ``named_modules`` order, so a fixed generator seed gives the same
    weights whatever device the model was materialized on.
    """
    scaled = std / math.sqrt(2.0 * num_layers)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            s = scaled if name.endswith(RESIDUAL_OUTPUTS) else std
            _normal_(module.weight, s, generator)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            if module.weight is not None:
                module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        if hasattr(module, "reset_buffers") and module is not model:
            module.reset_buffers()


def _normal_(t: torch.Tensor, std: float, generator: torch.Generator | None) -> None:
    if generator is None or t.device == generator.device:
        t.normal_(0.0, std, generator=generator)
    else:  # draw on the generator's device, then copy (keeps CPU and GPU inits identical)
        t.copy_(torch.empty(t.shape, dtype=t.dtype, device=generator.device).normal_(0.0, std, generator=generator))
