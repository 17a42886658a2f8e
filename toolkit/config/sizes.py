"""Sizes derived from a :class:`~toolkit.config.schema.ModelConfig`, shared by the models and the
checkpoint mappings."""

from __future__ import annotations

from toolkit.config.schema import ModelConfig


def head_dim(cfg: ModelConfig) -> int:
    """Per-head width: ``kv_channels`` or hidden / heads."""
    return cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads


def ffn_size(cfg: ModelConfig) -> int:
    """MLP inner width: ``ffn_hidden_size`` or 4 × hidden."""
    return cfg.ffn_hidden_size or 4 * cfg.hidden_size


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int = 1) -> int:
    """Round ``vocab_size`` up to a multiple of ``divisible_by × tensor_parallel`` (Megatron's rule)."""
    multiple = max(1, divisible_by) * max(1, tensor_parallel)
    return ((vocab_size + multiple - 1) // multiple) * multiple


def model_vocab_sizes(cfg: ModelConfig, tensor_parallel_size: int = 1) -> tuple[int, int]:
    """(vocabulary, padded vocabulary) of a ``ModelConfig`` built for ``tensor_parallel_size``."""
    if cfg.vocab_size is None:
        raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) before building the model")
    return cfg.vocab_size, padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tensor_parallel_size)
