"""The BERT pretraining objective: masked LM plus the sentence-pair head (NSP or sentence order),
whole and split for pipeline parallelism."""

from __future__ import annotations

import torch
from torch import nn

from toolkit.models.common.loss import lm_cross_entropy
from toolkit.parallel.tensor import local_value
from toolkit.registry import PipelineObjective


def bert_pretraining(model: nn.Module, batch: dict) -> torch.Tensor:
    """BERT: masked-LM cross-entropy over the masked positions (``batch["labels"]`` [b, s], -100
    elsewhere) plus, with a binary head, the sentence-pair cross-entropy on ``batch["is_random"]`` [b]."""
    out = model(batch["tokens"], token_types=batch.get("token_types"), padding_mask=batch.get("padding_mask"))
    return bert_loss(out["mlm_logits"], out.get("binary_logits"), batch["labels"], batch.get("is_random"))


def bert_loss(mlm_logits: torch.Tensor, binary_logits: torch.Tensor | None, labels: torch.Tensor,
              is_random: torch.Tensor | None) -> torch.Tensor:
    """MLM cross-entropy of ``mlm_logits`` [b, s, padded_vocab] against ``labels`` [b, s] (-100 off the
    masked positions), plus the sentence-pair cross-entropy of ``binary_logits`` [b, 2] on ``is_random`` [b]."""
    loss = lm_cross_entropy(mlm_logits, labels)
    if binary_logits is not None:
        # under tensor parallelism the vocab-parallel MLM loss is a replicated DTensor while the pair
        # logits are plain (whole on every rank): add in plain tensors so each backward stays in its kind
        loss = local_value(loss) + torch.nn.functional.cross_entropy(binary_logits.float(), is_random)
    return loss


def _bert_pipeline_inputs(batch: dict) -> tuple[tuple, dict, torch.Tensor]:
    """tokens to the first stage; token types and the padding mask to every stage (each layer masks
    padding); labels and ``is_random`` packed as one target [b, s + 1] (the schedule splits one tensor)."""
    kwargs = {k: batch[k] for k in ("token_types", "padding_mask") if batch.get(k) is not None}
    labels = batch["labels"]  # [b, s]
    is_random = batch.get("is_random", torch.zeros(labels.shape[0], dtype=labels.dtype, device=labels.device))
    target = torch.cat([labels, is_random.to(labels.dtype)[:, None]], dim=1)  # [b, s + 1]
    return (batch["tokens"],), kwargs, target


def _bert_pipeline_loss(output: tuple[torch.Tensor, ...], target: torch.Tensor) -> torch.Tensor:
    """``bert_loss`` on the last stage's ``(mlm_logits, [binary_logits])`` and the packed target."""
    mlm_logits, *pair = output
    return bert_loss(mlm_logits, pair[0] if pair else None, target[:, :-1], target[:, -1])


# bert_pretraining, split: the stages of ``pipeline_split_bert`` return tensors, not the model's dict
BERT_PIPELINE = PipelineObjective(inputs=_bert_pipeline_inputs, loss=_bert_pipeline_loss)
