"""Building a registered family's model: on ``meta``, then materialized and initialized."""

from __future__ import annotations

import torch
from torch import nn

from toolkit.config import ModelConfig, RunConfig, TaskConfig
from toolkit.errors import ConfigError
from toolkit.registry import get_spec


def build_model(cfg: ModelConfig, *, tensor_parallel_size: int = 1, task: TaskConfig | None = None) -> nn.Module:
    """The family's single-device module on the current default device (use ``torch.device('meta')``);
    with a ``task`` (``task.type`` not none), the encoder with that task's head."""
    spec = get_spec(cfg.family)
    if task is not None and task.type != "none":
        if spec.build_task is None:
            raise ConfigError(f"model.family={cfg.family} has no task heads (task.type={task.type}); fine-tune an "
                              "encoder family (bert)")
        return spec.build_task(cfg, task, tensor_parallel_size=tensor_parallel_size)
    return spec.build(cfg, tensor_parallel_size=tensor_parallel_size)


def build_initialized_model(cfg: RunConfig, device: torch.device) -> nn.Module:
    """Build on ``meta``, materialize on ``device``, initialize from ``trainer.seed``.

    The vocabulary is padded for ``parallel.tensor_model_parallel_size`` so a run's checkpoints
    load into the single-device model whatever layout wrote them.
    """
    with torch.device("meta"):
        model = build_model(cfg.model, tensor_parallel_size=cfg.parallel.tensor_model_parallel_size, task=cfg.task)
    model.to_empty(device=device)
    model.init_weights(cfg.trainer.seed)
    return model
