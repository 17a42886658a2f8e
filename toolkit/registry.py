"""Name → builder registries for model families. Entries are explicit and greppable.

Third-party packages can add families through the ``megaforge.models`` entry-point group; each entry
point names a callable ``(ModelConfig, *, tensor_parallel_size) -> nn.Module``.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from toolkit.config import ModelConfig
from toolkit.errors import ConfigError, closest

ModelBuilder = Callable[..., nn.Module]


def _gpt(cfg: ModelConfig, *, tensor_parallel_size: int = 1) -> nn.Module:
    from toolkit.models.gpt import GPTModel

    return GPTModel(cfg, tensor_parallel_size=tensor_parallel_size)


def _bert(cfg: ModelConfig, *, tensor_parallel_size: int = 1) -> nn.Module:
    from toolkit.models.bert import BertModel

    return BertModel(cfg, tensor_parallel_size=tensor_parallel_size)


def _t5(cfg: ModelConfig, *, tensor_parallel_size: int = 1) -> nn.Module:
    from toolkit.models.t5 import T5Model

    return T5Model(cfg, tensor_parallel_size=tensor_parallel_size)


MODELS: dict[str, ModelBuilder] = {
    "gpt": _gpt,
    "bert": _bert,
    "t5": _t5,
}


def _plugins() -> dict[str, ModelBuilder]:
    from importlib.metadata import entry_points

    return {ep.name: ep.load() for ep in entry_points(group="megaforge.models")}


def model_builder(family: str) -> ModelBuilder:
    if family in MODELS:
        return MODELS[family]
    plugins = _plugins()
    if family in plugins:
        return plugins[family]
    hint = closest(family, list(MODELS) + list(plugins))
    raise ConfigError(f"model.family={family!r} is not registered" + (f"; did you mean '{hint}'?" if hint else ""))


# family → its tensor/sequence-parallel plan: ``(model, tp_mesh, *, sequence_parallel) -> model``.
# The plan functions live in ``toolkit/models/<family>/parallelize.py``; ``toolkit.parallel`` receives
# the function and never imports a family itself.
TensorParallelPlan = Callable[..., nn.Module]


def _gpt_tp(model: nn.Module, tp_mesh, *, sequence_parallel: bool) -> nn.Module:
    from toolkit.models.gpt.parallelize import parallelize_gpt

    return parallelize_gpt(model, tp_mesh, sequence_parallel=sequence_parallel)


TENSOR_PARALLEL_PLANS: dict[str, TensorParallelPlan] = {
    "gpt": _gpt_tp,
}


def tensor_parallel_plan(family: str) -> TensorParallelPlan | None:
    """The family's tensor-parallel plan, or None when it has none."""
    return TENSOR_PARALLEL_PLANS.get(family)


def build_model(cfg: ModelConfig, *, tensor_parallel_size: int = 1) -> nn.Module:
    """Build the family's single-device module on the current default device (use ``torch.device('meta')``)."""
    return model_builder(cfg.family)(cfg, tensor_parallel_size=tensor_parallel_size)
