"""Task heads on the BERT family (post-LN BERT, pre-LN Megatron-BERT, GatorTron), as Hugging Face's
``{Bert,MegatronBert}For{Token,Sequence}Classification``: the encoder, dropout, one linear layer.

* ``token_classification`` — ``classifier`` on every position's final hidden state → ``[b, s, labels]``
  (no pooler, as HF's ``add_pooling_layer=False``);
* ``sequence_classification`` — ``classifier`` on the pooler (tanh dense on ``[CLS]``) → ``[b, labels]``;
* ``regression`` — the same with one output → ``[b]`` (HF ``num_labels=1``, ``problem_type="regression"``).

Parameter names are the encoder's (``embed.*``, ``layers.*``, ``final_norm.*``, ``pooler.*``) plus
``classifier.{weight,bias}``, so a pretraining checkpoint loads into it by name (its MLM and pair
heads are simply not read) and a fine-tuned one exports to HF's task classes.
"""

from __future__ import annotations

import torch
from torch import nn

from toolkit.config import ModelConfig, TaskConfig
from toolkit.models.bert.model import BertModel, BertPooler

TASK_TYPES = ("token_classification", "sequence_classification", "regression")


class BertForTask(BertModel):
    """The encoder with one task head; ``forward`` returns the logits (regression: the scores)."""

    #: parameter-name prefixes of the task head: left out when the starting model's head belongs to
    #: another task or label set (the trainer's ``checkpoint.init_from`` load)
    HEAD_PREFIXES = ("classifier.",)

    def __init__(self, cfg: ModelConfig, task: TaskConfig, *, tensor_parallel_size: int = 1):
        super().__init__(cfg, tensor_parallel_size=tensor_parallel_size)
        if task.type not in TASK_TYPES:
            raise ValueError(f"task.type {task.type!r} is not one of {', '.join(TASK_TYPES)}")
        self.task_type = task.type
        self.lm_head = None
        self.binary_head = None
        self.pooler = BertPooler(cfg.hidden_size) if task.type != "token_classification" else None
        self.num_labels = 1 if task.type == "regression" else len(task.labels)
        dropout = cfg.hidden_dropout if task.classifier_dropout is None else task.classifier_dropout
        self.classifier_dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(cfg.hidden_size, self.num_labels)

    def forward(
        self,
        tokens: torch.Tensor,  # [b, s] token ids
        token_types: torch.Tensor | None = None,  # [b, s] segment ids; None → all 0
        padding_mask: torch.Tensor | None = None,  # [b, s] 1 = real token; None → no padding
    ) -> torch.Tensor:
        h = self.encode(tokens, token_types, padding_mask)  # [b, s, hidden]
        if self.pooler is None:
            return self.classifier(self.classifier_dropout(h))  # [b, s, labels]
        logits = self.classifier(self.classifier_dropout(self.pooler(h)))  # [b, labels]
        return logits.squeeze(-1) if self.task_type == "regression" else logits  # regression: [b]
