"""Finding a model family's conversion adapter: its ``ModelSpec.hf_adapter`` (a
:class:`~toolkit.mapping.tables.FamilyAdapter` from ``models/<family>/hf.py``)."""

from __future__ import annotations

import dataclasses

from toolkit.config import ModelConfig, RunConfig, TaskConfig, padded_vocab_size
from toolkit.errors import CheckpointError
from toolkit.mapping.tables import FamilyAdapter, HFTarget, MappingContext
from toolkit.registry import families, get_spec


def family_adapter(family: str) -> FamilyAdapter:
    """The family's Hugging Face adapter (``ModelSpec.hf_adapter``)."""
    adapter = get_spec(family).hf_adapter
    if adapter is None:
        have = [f for f in families() if get_spec(f).hf_adapter is not None]
        raise CheckpointError(f"model family {family!r} has no Hugging Face converter (available: {', '.join(have)})")
    return adapter


def adapter_for_model_type(model_type: str) -> tuple[FamilyAdapter, HFTarget]:
    """The family adapter and the (first) target reading HF ``model_type`` (e.g. ``gpt2``, ``bert``);
    targets sharing a model_type share its table and config mapping (``FamilyAdapter.import_target``
    may then pick another once the checkpoint's tensor names are known)."""
    known = []
    for family in families():
        adapter = get_spec(family).hf_adapter
        if adapter is None:
            continue
        target = adapter.target(model_type)
        if target is not None:
            return adapter, target
        known += [t.model_type for t in adapter.targets]
    known = list(dict.fromkeys(known))  # targets sharing a model_type (BERT's classes) name it once
    raise CheckpointError(f"Hugging Face model_type {model_type!r} is not supported (supported: {', '.join(known)})")


def padded_context(adapter: FamilyAdapter, mcfg: ModelConfig, tensor_parallel_size: int) -> MappingContext:
    """The adapter's context with the vocabulary padded for ``tensor_parallel_size`` (as the model is)."""
    padded = padded_vocab_size(mcfg.vocab_size, mcfg.make_vocab_size_divisible_by, tensor_parallel_size)
    return dataclasses.replace(adapter.context(mcfg), padded_vocab_size=padded)


def architecture_of(adapter: FamilyAdapter, mcfg: ModelConfig, fallback: HFTarget) -> str:
    """The transformers class our imported model exports back to (e.g. BertForMaskedLM for a model
    imported without NSP head), else the class the model_type first names."""
    try:
        return adapter.select(mcfg).architecture
    except CheckpointError:
        return fallback.architecture


def export_target(cfg: RunConfig) -> HFTarget:
    """The target a run exports to: the pretraining class, or with a task head (``task.type``) the
    family's task class (``FamilyAdapter.select_task``)."""
    adapter = family_adapter(cfg.model.family)
    if cfg.task.type in ("none", "sft", "seq2seq"):  # generative fine-tuning keeps the language model itself
        return adapter.select(cfg.model)
    if adapter.select_task is None:
        raise CheckpointError(f"model family {cfg.model.family!r} has no Hugging Face task class for "
                              f"task.type={cfg.task.type}")
    return adapter.select_task(cfg.model, cfg.task)


def task_from_hf(hf_config: dict, task_type: str, *, where: str) -> TaskConfig | None:
    """The ``task`` section of an imported Hugging Face task model (``task_type`` from its target:
    token_classification, sequence_classification, regression; anything else → None): labels in id
    order from ``id2label``, the inverse of :func:`task_config`."""
    if task_type not in ("token_classification", "sequence_classification", "regression"):
        return None
    if task_type == "regression":
        return TaskConfig(type=task_type)
    id2label = hf_config.get("id2label") or {}
    if not isinstance(id2label, dict):
        raise CheckpointError(f"{where}: id2label must map label ids to names, got a {type(id2label).__name__}")
    keys = list(id2label)
    if not all(isinstance(k, int) or (isinstance(k, str) and k.isdigit()) for k in keys):
        raise CheckpointError(f"{where}: id2label keys must be integers, got {[str(k) for k in keys[:5]]!r}")
    ids = sorted(int(k) for k in keys)
    if ids != list(range(len(ids))) or len(ids) < 2:
        raise CheckpointError(f"{where}: id2label must name labels 0..n-1 (n >= 2), got ids {ids[:10]}")
    labels = [str(id2label.get(str(i), id2label.get(i))) for i in ids]
    if len(set(labels)) != len(labels):
        raise CheckpointError(f"{where}: id2label names a label twice: {labels}")
    return TaskConfig(type=task_type, labels=labels)


def task_config(task: TaskConfig) -> dict:
    """config.json keys of a task head: labels (``id2label``/``label2id``) and, for sequence tasks,
    ``problem_type``; empty for a pretraining run."""
    if task.type in ("none", "sft", "seq2seq"):
        return {}
    if task.type == "regression":
        return {"num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
                "problem_type": "regression"}
    out = {"num_labels": len(task.labels), "id2label": {str(i): label for i, label in enumerate(task.labels)},
           "label2id": {label: i for i, label in enumerate(task.labels)}}
    if task.type == "sequence_classification":
        out["problem_type"] = "single_label_classification"
    return out
