"""A run directory as the other commands read it: ``config.yaml``, ``tokenizer/`` and
``checkpoints/step_N`` + ``latest`` (what training writes and an import produces).

* :func:`resolve_checkpoint` — a run directory or a ``step_N`` folder → both;
* :func:`load_megaforge_model` — its model (fp32, eval mode, latest weights), config and tokenizer,
  for generation, evaluation, export and verification.
"""

from __future__ import annotations

from pathlib import Path

import torch

from toolkit.checkpoint.native import LATEST, CheckpointManager, has_frozen, is_complete, load_model_weights
from toolkit.config import RunConfig, load_config
from toolkit.errors import CheckpointError
from toolkit.models.build import build_initialized_model
from toolkit.tokenization import Tokenizer, load_tokenizer


def resolve_checkpoint(src: str | Path) -> tuple[Path, Path]:
    """A run directory or a ``step_N`` folder → (run directory, checkpoint folder)."""
    src = Path(src)
    if is_complete(src):
        run_dir = src.parent.parent
    elif (src / "config.yaml").is_file():
        run_dir = src
        step = CheckpointManager(src / "checkpoints").latest()
        if step is None:
            raise CheckpointError(f"{src} has no complete checkpoint yet ({src / 'checkpoints' / LATEST} is "
                                  "missing); train it first (megaforge train ...)")
        src = step
    else:
        raise CheckpointError(f"{src} is neither a megaforge run directory (config.yaml + checkpoints/) nor a "
                              "complete step_N checkpoint folder; pass the folder given as trainer.run_dir")
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"checkpoint {src} has no config.yaml two folders up ({run_dir}); export the run "
                              "directory it belongs to")
    return run_dir, src


def load_run_tokenizer(run_dir: Path) -> Tokenizer | None:
    """The tokenizer saved in ``run_dir/tokenizer``, or None when the run has none."""
    folder = run_dir / "tokenizer"
    return load_tokenizer(str(folder)) if folder.is_dir() else None


def load_megaforge_model(src: str | Path, *, device: str = "cpu") -> tuple[torch.nn.Module, RunConfig,
                                                                            Tokenizer | None]:
    """Model (fp32, eval mode), run config and tokenizer (or None) of a run directory or step folder."""
    run_dir, step = resolve_checkpoint(src)
    cfg = load_config(str(run_dir / "config.yaml"))
    model = build_initialized_model(cfg, torch.device(device))
    if has_frozen(model) and cfg.checkpoint.init_from:  # a LoRA run: its base first, then its adapters
        if not Path(cfg.checkpoint.init_from).exists():
            raise CheckpointError(f"{run_dir} is a LoRA run whose checkpoints hold only its adapters; its base "
                                  f"{cfg.checkpoint.init_from} (checkpoint.init_from) is gone; restore it, or import "
                                  "the base again there (megaforge convert BASE ... --to megaforge)")
        _, base_step = resolve_checkpoint(cfg.checkpoint.init_from)
        CheckpointManager(base_step.parent).load(base_step, model, None, partial=True, frozen=True)
    load_model_weights(step, model)
    return model.float().eval(), cfg, load_run_tokenizer(run_dir)
