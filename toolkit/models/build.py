"""Building a registered family's model: on ``meta``, then materialized and initialized.

Sharded initialization: a model is built on ``meta`` (no memory), the parallel plan is applied
there (TP/SP, pipeline split, FSDP2), and only then is each part materialized and initialized —
so a rank allocates only what it holds. Each parameter is drawn from a generator keyed by its name
and ``trainer.seed`` (``toolkit.models.common.init``), so every layout starts bitwise equal to one
process. A family gives its rules as ``model.init_rules()``; one without (a plugin that only has
``init_weights(seed)``) is materialized whole and initialized before the plan is applied.
"""

from __future__ import annotations

import torch
from torch import nn

from toolkit.config import ModelConfig, RunConfig, TaskConfig
from toolkit.errors import ConfigError
from toolkit.models.common.init import InitRules, init_parameters
from toolkit.models.common.lora import apply_lora, has_lora, init_lora, lora_init_rules
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


def build_meta_model(cfg: RunConfig) -> nn.Module:
    """The whole model on ``meta`` (its vocabulary padded for ``parallel.tensor_model_parallel_size``),
    with LoRA adapters on a frozen base when ``peft.method`` is lora."""
    with torch.device("meta"):
        model = build_model(cfg.model, tensor_parallel_size=cfg.parallel.tensor_model_parallel_size, task=cfg.task)
    if cfg.peft.method == "lora":
        apply_lora(model, cfg.peft)
    return model


def init_rules(model: nn.Module) -> InitRules | None:
    """The family's per-parameter init rules (``model.init_rules()``), or None if it has none."""
    fn = getattr(model, "init_rules", None)
    if fn is None:
        return None
    rules = dict(fn())
    if has_lora(model):  # the family's rules see the adapters as plain linears: theirs replace them
        rules.update(lora_init_rules(model))
    return rules


def materialize(part: nn.Module, rules: InitRules, seed: int, device: torch.device) -> nn.Module:
    """Allocate what ``part`` holds (a model, a stage, TP/FSDP shards) on ``device`` and initialize it
    from ``rules`` and ``seed``: one full parameter at a time, keeping this rank's slice."""
    part.to_empty(device=device)
    init_parameters(part, rules, seed)
    return part


def build_initialized_model(cfg: RunConfig, device: torch.device) -> nn.Module:
    """Build on ``meta``, materialize on ``device``, initialize from ``trainer.seed``.

    The vocabulary is padded for ``parallel.tensor_model_parallel_size`` so a run's checkpoints
    load into the single-device model whatever layout wrote them.
    """
    model = build_meta_model(cfg)
    rules = init_rules(model)
    if rules is None:
        model.to_empty(device=device)
        model.init_weights(cfg.trainer.seed)
        if has_lora(model):
            init_lora(model, cfg.trainer.seed)
        return model
    return materialize(model, rules, cfg.trainer.seed, device)
