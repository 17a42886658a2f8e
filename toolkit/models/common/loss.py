"""Language-model losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def lm_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of ``logits`` [b, s, V] against ``labels`` [b, s] (``-100`` ignored).

    Computed in fp32. Padded vocabulary columns arrive as -inf from the model, so they add nothing
    to the softmax and get no gradient.
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
