"""Transformer building blocks shared by every family: attention, MLP, norms, embeddings, rotary."""

from toolkit.models.common.attention import Attention, KVCache
from toolkit.models.common.embeddings import padded_vocab_size
from toolkit.models.common.layer import TransformerLayer
from toolkit.models.common.mlp import MLP
from toolkit.models.common.norms import build_norm
from toolkit.models.common.rotary import RotaryEmbedding, apply_rotary

__all__ = [
    "Attention", "KVCache", "MLP", "TransformerLayer", "RotaryEmbedding", "apply_rotary",
    "build_norm", "padded_vocab_size",
]
