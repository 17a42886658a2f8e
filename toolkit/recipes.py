"""The recipe table: every registered recipe with its family, size and description."""

from __future__ import annotations

import torch

from toolkit.config import RunConfig, list_recipes, load_config
from toolkit.models.build import build_model
from toolkit.training.run import setup_tokenizer


def recipe_model_on_meta(cfg: RunConfig) -> torch.nn.Module:
    """The recipe's model on the meta device (vocabulary from the recipe or its default tokenizer)."""
    if cfg.model.vocab_size is None:
        setup_tokenizer(cfg)
    with torch.device("meta"):
        return build_model(cfg.model)


def recipe_table() -> list[tuple[str, str, str, str, str]]:
    """One row per recipe: name, family, task (``pretrain`` or ``task.type``), parameters of the
    pretraining-shaped model, description."""
    rows = [("NAME", "FAMILY", "TASK", "PARAMS", "DESCRIPTION")]
    for name in list_recipes():
        cfg = load_config(name)
        n = sum(p.numel() for p in recipe_model_on_meta(cfg).parameters())
        size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
        task = "pretrain" if cfg.task.type == "none" else cfg.task.type
        rows.append((name, cfg.model.family, task, size, cfg.description))
    return rows
