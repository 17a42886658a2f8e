"""The weights of a LoRA run as the exporters read them.

A LoRA run's checkpoints hold only its trainable tensors (adapters, a task head); the frozen base
is rebuilt from ``checkpoint.init_from`` (or the seed) by :func:`toolkit.checkpoint.load_megaforge_model`.
``--to hf`` writes the merged model (:func:`merged_lora_weights`); ``--to peft`` the adapters
(:mod:`toolkit.convert.peft_export`), whose ``base_model_name_or_path`` is recorded at training
time by :func:`record_lora_base`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import torch

from toolkit.checkpoint.run_dir import load_megaforge_model
from toolkit.config import RunConfig
from toolkit.convert.streaming import LazySource, meta_tensor
from toolkit.models.common.lora import merged_state_dict

logger = logging.getLogger(__name__)


def record_lora_base(cfg: RunConfig, init_from: str) -> None:
    """A LoRA run started from a Hugging Face folder or Hub id names it as its adapters' base
    (``peft.base_model_name_or_path``, unless set), so ``--to peft`` points at it instead of writing
    a copy of the base."""
    if cfg.peft.method != "lora" or cfg.peft.base_model_name_or_path:
        return
    path = Path(init_from).expanduser()
    if path.is_dir():  # an HF folder: config.json and safetensors, no megaforge config.yaml / checkpoints
        if (path / "config.json").is_file() and not (path / "config.yaml").is_file() and any(path.glob("*.safetensors")):
            cfg.peft.base_model_name_or_path = str(path.resolve())
    elif not path.exists() and not init_from.startswith((".", "/", "~")) and init_from.count("/") <= 1:
        cfg.peft.base_model_name_or_path = init_from  # a Hub id


def merged_lora_weights(step_dir: str | Path) -> dict[str, torch.Tensor]:
    """The single-device state dict of a LoRA run's checkpoint with every adapter folded into its base."""
    model, _, _ = load_megaforge_model(step_dir)
    logger.info(f"{step_dir}: LoRA adapters merged into the base for export")
    return merged_state_dict(model)


def tensor_dict_source(weights: Mapping[str, torch.Tensor]) -> LazySource:
    """A conversion source over tensors in memory."""
    metas = {n: meta_tensor(t.shape, t.dtype) for n, t in weights.items()}
    return LazySource(metas, lambda n: weights[n].detach())
