"""Pretraining objectives: (model, batch) → mean loss. One per family."""

from __future__ import annotations

import torch
from torch import nn

from toolkit.training.loss import lm_cross_entropy


def causal_lm(model: nn.Module, batch: dict) -> torch.Tensor:
    """Next-token prediction on packed windows ``batch["tokens"]`` [b, seq_length + 1]."""
    tokens = batch["tokens"]
    logits = model(tokens[:, :-1])  # [b, s, padded_vocab]
    return lm_cross_entropy(logits, tokens[:, 1:])


def t5_span_corruption(model: nn.Module, batch: dict) -> torch.Tensor:
    """T5 span corruption: predict ``batch["labels"]`` [b, s_dec] (-100 on padding) from the corrupted
    ``encoder_tokens`` [b, s_enc] and the right-shifted ``decoder_tokens`` [b, s_dec]."""
    logits = model(batch["encoder_tokens"], batch["decoder_tokens"], batch.get("encoder_padding_mask"),
                   batch.get("decoder_padding_mask"))  # [b, s_dec, padded_vocab]
    return lm_cross_entropy(logits, batch["labels"])


def bert_pretraining(model: nn.Module, batch: dict) -> torch.Tensor:
    """BERT: masked-LM cross-entropy over the masked positions (``batch["labels"]`` [b, s], -100
    elsewhere) plus, with a binary head, the sentence-pair cross-entropy on ``batch["is_random"]`` [b]."""
    out = model(batch["tokens"], token_types=batch.get("token_types"), padding_mask=batch.get("padding_mask"))
    loss = lm_cross_entropy(out["mlm_logits"], batch["labels"])  # mlm_logits [b, s, padded_vocab]
    if out.get("binary_logits") is not None:
        loss = loss + torch.nn.functional.cross_entropy(out["binary_logits"].float(), batch["is_random"])
    return loss
