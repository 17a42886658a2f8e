"""Tokenizers: one interface over SentencePiece and Hugging Face ``tokenizers``, loading from files,
folders or shipped names, and training from YAML specs."""

from toolkit.tokenization.base import SPECIAL_NAMES, Tokenizer, detect_special_ids
from toolkit.tokenization.hf_tokenizers import HFTokenizer
from toolkit.tokenization.loading import load_tokenizer, shipped_specs, shipped_tokenizers
from toolkit.tokenization.spm import SentencePieceTokenizer
from toolkit.tokenization.training import TokenizerSpec, load_spec, train_from_spec, train_tokenizer

__all__ = [
    "SPECIAL_NAMES",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TokenizerSpec",
    "detect_special_ids",
    "load_spec",
    "load_tokenizer",
    "shipped_specs",
    "shipped_tokenizers",
    "train_from_spec",
    "train_tokenizer",
]
