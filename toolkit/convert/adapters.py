"""Finding a model family's conversion adapter: its ``ModelSpec.hf_adapter`` (a
:class:`~toolkit.mapping.tables.FamilyAdapter` from ``models/<family>/hf.py``)."""

from __future__ import annotations

import dataclasses

from toolkit.config import ModelConfig, padded_vocab_size
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
    targets sharing a model_type share its table and config mapping."""
    known = []
    for family in families():
        adapter = get_spec(family).hf_adapter
        if adapter is None:
            continue
        target = adapter.target(model_type)
        if target is not None:
            return adapter, target
        known += [t.model_type for t in adapter.targets if t.model_type not in known]
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
