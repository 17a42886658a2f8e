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


def _bert_tp(model: nn.Module, tp_mesh, *, sequence_parallel: bool) -> nn.Module:
    from toolkit.models.bert.parallelize import parallelize_bert

    return parallelize_bert(model, tp_mesh, sequence_parallel=sequence_parallel)


def _t5_tp(model: nn.Module, tp_mesh, *, sequence_parallel: bool) -> nn.Module:
    from toolkit.models.t5.parallelize import parallelize_t5

    return parallelize_t5(model, tp_mesh, sequence_parallel=sequence_parallel)


TENSOR_PARALLEL_PLANS: dict[str, TensorParallelPlan] = {
    "gpt": _gpt_tp,
    "bert": _bert_tp,
    "t5": _t5_tp,
}


def tensor_parallel_plan(family: str) -> TensorParallelPlan | None:
    """The family's tensor-parallel plan, or None when it has none."""
    return TENSOR_PARALLEL_PLANS.get(family)


# family → its pipeline split: ``(model, layer_ids, *, first, last) -> stage module``. The stage keeps
# the layers ``layer_ids`` of the model's ``layers`` ModuleDict (keyed by global index, so names stay
# single-device), the embedding when ``first``, the final norm / output heads when ``last`` — and on a
# last stage that is not first, a copy of a tied word embedding under its own name (kept in sync by
# ``toolkit.parallel.pipeline``). Functions live in ``toolkit/models/<family>/parallelize.py``.
PipelineSplit = Callable[..., nn.Module]


def _gpt_pp(model: nn.Module, layer_ids, *, first: bool, last: bool) -> nn.Module:
    from toolkit.models.gpt.parallelize import pipeline_split_gpt

    return pipeline_split_gpt(model, layer_ids, first=first, last=last)


def _bert_pp(model: nn.Module, layer_ids, *, first: bool, last: bool) -> nn.Module:
    from toolkit.models.bert.parallelize import pipeline_split_bert

    return pipeline_split_bert(model, layer_ids, first=first, last=last)


PIPELINE_SPLITS: dict[str, PipelineSplit] = {
    "gpt": _gpt_pp,
    "bert": _bert_pp,
}


def pipeline_split(family: str) -> PipelineSplit | None:
    """The family's pipeline split, or None when it has none (pipeline parallelism is then refused)."""
    return PIPELINE_SPLITS.get(family)


def build_model(cfg: ModelConfig, *, tensor_parallel_size: int = 1) -> nn.Module:
    """Build the family's single-device module on the current default device (use ``torch.device('meta')``)."""
    return model_builder(cfg.family)(cfg, tensor_parallel_size=tensor_parallel_size)
