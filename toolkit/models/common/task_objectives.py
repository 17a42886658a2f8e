"""Fine-tuning objectives of encoder task heads: (model, batch) → mean loss, as Hugging Face's
``*ForTokenClassification`` (cross-entropy, ``-100`` ignored), ``*ForSequenceClassification``
(cross-entropy; MSE for ``problem_type="regression"``). Batches hold ``tokens``, ``token_types``,
``padding_mask`` and ``labels``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.models.common.loss import IGNORE_INDEX


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(batch["tokens"], token_types=batch.get("token_types"), padding_mask=batch.get("padding_mask"))


def token_classification(model: nn.Module, batch: dict) -> torch.Tensor:
    logits = _logits(model, batch)  # [b, s, labels]
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)


def sequence_classification(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(_logits(model, batch).float(), batch["labels"])  # logits [b, labels]


def regression(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.mse_loss(_logits(model, batch).float(), batch["labels"].float())  # scores [b]


TASK_OBJECTIVES = {"token_classification": token_classification,
                   "sequence_classification": sequence_classification, "regression": regression}
