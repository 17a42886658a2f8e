"""The megaforge end of a conversion: a run directory (``config.yaml``, ``tokenizer/``,
``checkpoints/step_N`` + ``latest``) read by exports and written by imports.

* :func:`resolve_checkpoint` — a run directory or a ``step_N`` folder → both;
* :func:`load_megaforge_model` — its model (fp32, eval), config and tokenizer, for verification;
* :func:`write_megaforge_folder` — a new run directory from a conversion plan, one step at a time
  (what the Hugging Face and legacy Megatron-LM importers write).
"""

from __future__ import annotations

from pathlib import Path

import torch

from toolkit.checkpoint.hf_mapping import MappingContext, Step
from toolkit.checkpoint.native import LATEST, CheckpointManager, is_complete
from toolkit.checkpoint.plan_runner import StepCache, parse_dtype, plan_metas
from toolkit.checkpoint.streaming import TensorSource, write_dcp_checkpoint
from toolkit.config import ModelConfig, ParallelConfig, RunConfig, load_config, save_config, validate
from toolkit.errors import CheckpointError, MegaforgeError


def resolve_checkpoint(src: str | Path) -> tuple[Path, Path]:
    """A run directory or a ``step_N`` folder → (run directory, checkpoint folder)."""
    src = Path(src)
    if is_complete(src):
        run_dir = src.parent.parent
    elif (src / "config.yaml").is_file():
        run_dir = src
        step = CheckpointManager(src / "checkpoints").latest()
        if step is None:
            raise CheckpointError(f"{src} has no complete checkpoint ({src / 'checkpoints' / LATEST} is missing)")
        src = step
    else:
        raise CheckpointError(f"{src} is neither a megaforge run directory (config.yaml + checkpoints/) nor a "
                              "complete step_N checkpoint folder")
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"checkpoint {src} has no config.yaml two folders up ({run_dir}); export the run "
                              "directory it belongs to")
    return run_dir, src


def expected_shapes(cfg: ModelConfig, tensor_parallel_size: int = 1) -> dict[str, torch.Size]:
    """Our parameter shapes for ``cfg``, from the model built on ``meta`` (no memory used)."""
    from toolkit.registry import build_model

    with torch.device("meta"):
        model = build_model(cfg, tensor_parallel_size=tensor_parallel_size)
    return {k: v.shape for k, v in model.state_dict().items()}


def load_megaforge_model(src: str | Path, *, device: str = "cpu"):
    """Model (fp32, eval mode), run config and tokenizer (or None) of a run dir or step folder."""
    from toolkit.checkpoint.native import load_model_weights
    from toolkit.training.run import build_initialized_model

    run_dir, step = resolve_checkpoint(src)
    cfg = load_config(str(run_dir / "config.yaml"))
    model = build_initialized_model(cfg, torch.device(device))
    load_model_weights(step, model)
    return model.float().eval(), cfg, load_run_tokenizer(run_dir)


def load_run_tokenizer(run_dir: Path):
    """The tokenizer saved in ``run_dir/tokenizer``, or None when the run has none."""
    from toolkit.tokenization import load_tokenizer

    folder = run_dir / "tokenizer"
    return load_tokenizer(str(folder)) if folder.is_dir() else None


def write_megaforge_folder(out: str | Path, mcfg: ModelConfig, steps: list[Step], source: TensorSource,
                           ctx: MappingContext, *, tokenizer, dtype: str | torch.dtype | None, trainer_state: dict,
                           where: str, name: str = "imported", description: str = "",
                           tensor_parallel_size: int = 1) -> Path:
    """Write ``out/config.yaml``, ``out/tokenizer/`` and ``out/checkpoints/step_0`` (+ ``latest``),
    producing our tensors from ``source`` through ``steps`` one at a time. ``ctx.padded_vocab_size``
    must be the padding for ``tensor_parallel_size``."""
    if tensor_parallel_size < 1:
        raise CheckpointError(f"tensor_parallel_size must be at least 1, got {tensor_parallel_size}")
    cfg = RunConfig(name=name or "imported", description=description, model=mcfg,
                    parallel=ParallelConfig(tensor_model_parallel_size=tensor_parallel_size))
    out = Path(out)
    if tokenizer is not None and tokenizer.vocab_size > mcfg.vocab_size:
        raise CheckpointError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary is "
                              f"{mcfg.vocab_size}; they do not belong together")
    try:
        validate(cfg)
    except MegaforgeError as e:
        raise CheckpointError(f"{where}: its config is not a valid megaforge model: {e}") from None
    items = plan_metas(steps, source, ctx, dtype=parse_dtype(dtype), expected_src=None,
                       expected_dst=expected_shapes(mcfg, tensor_parallel_size), where=where)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        tokenizer.save(out / "tokenizer")
        cfg.tokenizer.path = str((out / "tokenizer").resolve())
    write_dcp_checkpoint(out / "checkpoints", 0, dict(items), StepCache(steps, source, ctx), trainer_state)
    save_config(cfg, out / "config.yaml")
    return out
