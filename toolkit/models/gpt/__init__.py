"""Decoder-only language models: GPT-2 style and Llama style. ``SPEC`` declares the family."""

from __future__ import annotations

from toolkit.config import RunConfig
from toolkit.data.gpt_dataset import build_gpt_datasets
from toolkit.models.gpt.hf import ADAPTER
from toolkit.models.gpt.model import GPTModel
from toolkit.models.gpt.objective import CAUSAL_LM_PIPELINE, causal_lm, masked_causal_lm
from toolkit.models.gpt.parallelize import parallelize_gpt, pipeline_split_gpt
from toolkit.registry import ModelSpec


def _datasets(cfg: RunConfig, tokenizer, prefixes: list, num_samples: tuple[int, int, int]):
    return build_gpt_datasets(prefixes, splits_string=cfg.data.splits_string, seq_length=cfg.model.seq_length,
                              seed=cfg.trainer.seed, num_samples=num_samples, cache_dir=cfg.data.index_cache_dir)


SPEC = ModelSpec(
    name="gpt",
    build=GPTModel,
    objective=causal_lm,
    datasets=_datasets,
    default_tokenizer="english-bpe",
    tokens_per_sample=lambda cfg: cfg.model.seq_length,
    tensor_parallel=parallelize_gpt,
    pipeline_split=pipeline_split_gpt,
    pipeline_objective=CAUSAL_LM_PIPELINE,
    hf_adapter=ADAPTER,
    build_task=lambda cfg, task, *, tensor_parallel_size=1: GPTModel(cfg, tensor_parallel_size=tensor_parallel_size),
    task_objectives={"sft": masked_causal_lm},  # supervised fine-tuning: the LM itself, loss on the answers
)

__all__ = ["GPTModel", "SPEC"]
