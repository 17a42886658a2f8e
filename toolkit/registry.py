"""Model families: the :class:`ModelSpec` each one declares, and the loader that finds them.

A family is declared in exactly one place, its own package: ``toolkit/models/<family>/__init__.py``
defines ``SPEC = ModelSpec(...)`` — how to build the model, its tensor-parallel plan, pipeline split,
Hugging Face adapter, pretraining objective and datasets, default tokenizer and config checks.
The built-in families are every package under ``toolkit/models/`` that defines ``SPEC``; other
distributions add families through the ``megaforge.models`` entry-point group (an entry point names
a ``ModelSpec``, or a callable returning one)::

    [project.entry-points."megaforge.models"]
    toy = "my_package.toy:SPEC"

Nothing here imports a family: specs are loaded by module name when first asked for, so the layers
below (config, parallel) can ask about families without depending on any of them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from toolkit.errors import ConfigError, closest

ENTRY_POINT_GROUP = "megaforge.models"
_MODELS_DIR = Path(__file__).resolve().parent / "models"  # the built-in family packages live here


@dataclass(frozen=True, kw_only=True)
class PipelineObjective:
    """A family objective split for pipeline parallelism: the first stage receives ``inputs``, the
    last stage's output goes to ``loss`` with the target (see ``toolkit.parallel.pipeline``)."""

    inputs: Callable[[dict], tuple[tuple, dict, Any]]  # batch on device -> (args, kwargs, target)
    loss: Callable[[Any, Any], Any]  # (last stage output, target) -> mean loss


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Everything megaforge needs to know about one model family."""

    name: str  # the model.family value recipes use
    build: Callable[..., Any]  # (ModelConfig, *, tensor_parallel_size) -> single-device nn.Module (build on meta)
    objective: Callable[[Any, dict], Any]  # (model, batch on device) -> mean pretraining loss
    datasets: Callable[..., tuple]  # (cfg, tokenizer, prefixes, (n_train, n_valid, n_test)) -> (train, valid, test)
    default_tokenizer: str  # shipped tokenizer used when tokenizer.path is unset
    tokens_per_sample: Callable[[Any], int]  # RunConfig -> tokens one sample trains on (tokens/s, MFU)
    tensor_parallel: Callable[..., Any] | None = None  # (model, tp_mesh, *, sequence_parallel) -> model; None: no TP
    pipeline_split: Callable[..., Any] | None = None  # (model, layer_ids, *, first, last) -> stage; None: no PP
    pipeline_objective: PipelineObjective | None = None  # the objective split for PP (needed with pipeline_split)
    hf_adapter: Any = None  # toolkit.mapping.FamilyAdapter: Hugging Face targets and legacy Megatron-LM table
    build_task: Callable[..., Any] | None = None  # (ModelConfig, TaskConfig, *, tensor_parallel_size) -> model
    # with a task head (fine-tuning); None: the family cannot be fine-tuned for a task
    task_objectives: dict[str, Callable[[Any, dict], Any]] | None = None  # task.type -> (model, batch) -> loss
    validate: Callable[[Any], None] | None = None  # RunConfig -> None: family config checks (config.validate)
    validate_parallel: Callable[[Any], None] | None = None  # RunConfig -> None: family layout checks, before any
    # collective (parallel.validate_parallel); raise ParallelConfigError

    def __post_init__(self) -> None:
        if (self.pipeline_split is None) != (self.pipeline_objective is None):
            raise ValueError(f"model family {self.name!r}: pipeline_split and pipeline_objective go together")
        if (self.build_task is None) != (self.task_objectives is None):
            raise ValueError(f"model family {self.name!r}: build_task and task_objectives go together")


def _builtin_names() -> list[str]:
    return sorted(p.name for p in _MODELS_DIR.iterdir() if (p / "__init__.py").is_file() and p.name != "common")


def _as_spec(obj: Any, where: str) -> ModelSpec:
    spec = obj() if callable(obj) and not isinstance(obj, ModelSpec) else obj
    if not isinstance(spec, ModelSpec):
        raise ConfigError(f"{where} is not a toolkit.registry.ModelSpec (got {type(spec).__name__})")
    return spec


@lru_cache(maxsize=None)
def _specs() -> dict[str, ModelSpec]:
    from importlib.metadata import entry_points

    specs: dict[str, ModelSpec] = {}
    for name in _builtin_names():
        module = importlib.import_module(f"toolkit.models.{name}")
        if hasattr(module, "SPEC"):
            specs[module.SPEC.name] = _as_spec(module.SPEC, f"toolkit.models.{name}.SPEC")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in specs:
            continue  # a built-in family keeps its name
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin names itself instead of failing every command
            raise ConfigError(f"entry point {ENTRY_POINT_GROUP}:{ep.name} ({ep.value}) cannot be loaded: "
                              f"{type(e).__name__}: {e}") from None
        spec = _as_spec(obj, f"entry point {ENTRY_POINT_GROUP}:{ep.name} ({ep.value})")
        specs[ep.name] = spec
    return specs


def families() -> list[str]:
    """Names of every registered model family (built-in first, then plugins)."""
    return list(_specs())


def get_spec(family: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``family``; a one-line :class:`ConfigError` naming the closest one."""
    specs = _specs()
    if family not in specs:
        hint = closest(str(family), list(specs))
        raise ConfigError(f"model.family={family!r} is not one of {', '.join(specs)}"
                          + (f"; did you mean '{hint}'?" if hint else ""))
    return specs[family]
