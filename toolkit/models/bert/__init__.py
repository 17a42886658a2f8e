"""Bidirectional encoders: BERT (post-LN) and Megatron-BERT / GatorTron (pre-LN)."""

from toolkit.models.bert.model import BertModel

__all__ = ["BertModel"]
