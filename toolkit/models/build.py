"""Building a registered family's model: on ``meta``, then materialized and initialized."""

from __future__ import annotations

import torch
from torch import nn

from toolkit.config import ModelConfig, RunConfig
from toolkit.registry import get_spec


def build_model(cfg: ModelConfig, *, tensor_parallel_size: int = 1) -> nn.Module:
    """The family's single-device module on the current default device (use ``torch.device('meta')``)."""
    return get_spec(cfg.family).build(cfg, tensor_parallel_size=tensor_parallel_size)


def build_initialized_model(cfg: RunConfig, device: torch.device) -> nn.Module:
    """Build on ``meta``, materialize on ``device``, initialize from ``trainer.seed``.

    The vocabulary is padded for ``parallel.tensor_model_parallel_size`` so a run's checkpoints
    load into the single-device model whatever layout wrote them.
    """
    with torch.device("meta"):
        model = build_model(cfg.model, tensor_parallel_size=cfg.parallel.tensor_model_parallel_size)
    model.to_empty(device=device)
    model.init_weights(cfg.trainer.seed)
    return model
