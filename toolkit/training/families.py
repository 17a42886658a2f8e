"""What the trainer needs per model family: objective, datasets and default tokenizer.

Each family adds one :class:`FamilySpec` to ``FAMILIES``; the trainer and ``run.py`` stay generic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from toolkit.config import RunConfig
from toolkit.tokenization import Tokenizer
from toolkit.training.objectives import (BERT_PIPELINE, CAUSAL_LM_PIPELINE, PipelineObjective, bert_pretraining,
                                         causal_lm, t5_span_corruption)


def _gpt_datasets(cfg: RunConfig, tokenizer: Tokenizer, prefixes: list, num_samples: tuple[int, int, int]):
    from toolkit.data.gpt_dataset import build_gpt_datasets

    return build_gpt_datasets(prefixes, splits_string=cfg.data.splits_string, seq_length=cfg.model.seq_length,
                              seed=cfg.trainer.seed, num_samples=num_samples, cache_dir=cfg.data.index_cache_dir)


def _t5_datasets(cfg: RunConfig, tokenizer: Tokenizer, prefixes: list, num_samples: tuple[int, int, int]):
    from toolkit.data.t5_dataset import build_t5_datasets

    return build_t5_datasets(cfg, tokenizer, prefixes, num_samples)


def _bert_datasets(cfg: RunConfig, tokenizer: Tokenizer, prefixes: list, num_samples: tuple[int, int, int]):
    from toolkit.data.bert_dataset import bert_datasets_for_run

    return bert_datasets_for_run(cfg, tokenizer, prefixes, num_samples)


@dataclass(frozen=True)
class FamilySpec:
    objective: Callable  # (model, batch on device) -> mean loss
    datasets: Callable  # (cfg, tokenizer, prefixes, (n_train, n_valid, n_test)) -> (train, valid, test)
    default_tokenizer: str  # shipped tokenizer used when tokenizer.path is unset
    tokens_per_sample: Callable[[RunConfig], int]  # tokens one sample trains on (for tokens/s)
    pipeline: PipelineObjective | None = None  # the objective split for pipeline parallelism


FAMILIES: dict[str, FamilySpec] = {
    "gpt": FamilySpec(objective=causal_lm, datasets=_gpt_datasets, default_tokenizer="english-bpe",
                      tokens_per_sample=lambda cfg: cfg.model.seq_length, pipeline=CAUSAL_LM_PIPELINE),
    "bert": FamilySpec(objective=bert_pretraining, datasets=_bert_datasets, default_tokenizer="english-wordpiece",
                       tokens_per_sample=lambda cfg: cfg.model.seq_length, pipeline=BERT_PIPELINE),
    "t5": FamilySpec(objective=t5_span_corruption, datasets=_t5_datasets, default_tokenizer="english-t5-spm",
                     tokens_per_sample=lambda cfg: cfg.model.seq_length + cfg.model.decoder_seq_length),
}


def family(name: str) -> FamilySpec:
    from toolkit.errors import ConfigError, closest

    if name not in FAMILIES:
        hint = closest(name, FAMILIES)
        raise ConfigError(f"model.family={name!r} has no training support" + (f"; did you mean '{hint}'?" if hint else ""))
    return FAMILIES[name]
