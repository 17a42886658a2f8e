"""The GPT pretraining objective: next-token prediction, whole and split for pipeline parallelism."""

from __future__ import annotations

import torch
from torch import nn

from toolkit.models.common.loss import IGNORE_INDEX, lm_cross_entropy
from toolkit.registry import PipelineObjective


def causal_lm(model: nn.Module, batch: dict) -> torch.Tensor:
    """Next-token prediction on packed windows ``batch["tokens"]`` [b, seq_length + 1]."""
    tokens = batch["tokens"]
    return _lm_loss(model, tokens[:, :-1], tokens[:, 1:])


def masked_causal_lm(model: nn.Module, batch: dict) -> torch.Tensor:
    """Supervised fine-tuning: next-token prediction on ``batch["tokens"]`` [b, s + 1] counted only
    where ``batch["loss_mask"]`` [b, s] marks a trained target (answers and their end token). Packed
    rows carry ``positions`` and ``segments`` [b, s + 1] (see :func:`GPTModel.forward`)."""
    tokens = batch["tokens"]
    packed = {k: batch[k][:, :-1] for k in ("positions", "segments") if k in batch}  # [b, s] each (packing)
    return _lm_loss(model, tokens[:, :-1], tokens[:, 1:].masked_fill(~batch["loss_mask"], IGNORE_INDEX), **packed)


def _lm_loss(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
    """Mean token cross-entropy of the logits, or the model's own fused loss when it has one switched on
    (``GPTModel`` with ``model.fused_cross_entropy``: the logits are never whole). The logits path keeps
    the loss outside the model's forward, where FSDP2's backward prefetch was measured for the planner."""
    if getattr(model, "fuses_loss", False):
        return model(inputs, labels=labels, **kwargs)
    return lm_cross_entropy(model(inputs, **kwargs), labels)  # logits [b, s, padded_vocab]


# causal_lm, split: the first stage reads tokens[:, :-1], the last stage's logits meet tokens[:, 1:]
CAUSAL_LM_PIPELINE = PipelineObjective(inputs=lambda batch: ((batch["tokens"][:, :-1],), {}, batch["tokens"][:, 1:]),
                                       loss=lm_cross_entropy)
