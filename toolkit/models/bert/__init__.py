"""Encoder models: post-LN BERT, pre-LN Megatron-BERT and the GatorTron-style clinical BERT.
``SPEC`` declares the family."""

from __future__ import annotations

from toolkit.data.bert_dataset import bert_datasets_for_run
from toolkit.models.bert.hf import ADAPTER
from toolkit.models.bert.model import BertModel
from toolkit.models.bert.objective import BERT_PIPELINE, bert_pretraining
from toolkit.models.bert.parallelize import parallelize_bert, pipeline_split_bert
from toolkit.models.bert.task import BertForTask
from toolkit.models.common.task_objectives import TASK_OBJECTIVES
from toolkit.registry import ModelSpec

SPEC = ModelSpec(
    name="bert",
    build=BertModel,
    objective=bert_pretraining,
    datasets=bert_datasets_for_run,
    default_tokenizer="english-wordpiece",
    tokens_per_sample=lambda cfg: cfg.model.seq_length,
    tensor_parallel=parallelize_bert,
    pipeline_split=pipeline_split_bert,
    pipeline_objective=BERT_PIPELINE,
    hf_adapter=ADAPTER,
    build_task=BertForTask,
    task_objectives=TASK_OBJECTIVES,
)

__all__ = ["BertModel", "BertForTask", "SPEC"]
