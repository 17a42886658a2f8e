"""The T5 pretraining objective: span corruption."""

from __future__ import annotations

import torch
from torch import nn

from toolkit.models.common.loss import lm_cross_entropy


def t5_span_corruption(model: nn.Module, batch: dict) -> torch.Tensor:
    """T5 span corruption: predict ``batch["labels"]`` [b, s_dec] (-100 on padding) from the corrupted
    ``encoder_tokens`` [b, s_enc] and the right-shifted ``decoder_tokens`` [b, s_dec]."""
    logits = model(batch["encoder_tokens"], batch["decoder_tokens"], batch.get("encoder_padding_mask"),
                   batch.get("decoder_padding_mask"))  # [b, s_dec, padded_vocab]
    return lm_cross_entropy(logits, batch["labels"])


def seq2seq_lm(model: nn.Module, batch: dict) -> torch.Tensor:
    """Sequence-to-sequence fine-tuning (``task.type: seq2seq``): the mean cross-entropy of the target
    tokens and their EOS, ``batch["labels"]`` [b, s_dec] (-100 on padding), from the padded
    ``encoder_tokens`` [b, s_enc] (``encoder_padding_mask``) and the right-shifted ``decoder_tokens``."""
    logits = model(batch["encoder_tokens"], batch["decoder_tokens"], batch["encoder_padding_mask"])  # [b, s_dec, V]
    return lm_cross_entropy(logits, batch["labels"])
