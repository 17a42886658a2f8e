"""Decoder-only language models: GPT-2 style and Llama style."""

from toolkit.models.gpt.model import GPTModel

__all__ = ["GPTModel"]
