"""Offline resharding: ``megaforge convert RUN OUT --to megaforge --tensor-parallel N``.

DCP itself needs no offline step to change tp/pp/dp (any layout loads any checkpoint, see
:mod:`toolkit.checkpoint.reshard`); this lays a checkpoint out for a target layout ahead of time —
vocabulary padding and the recorded layout — as Megatron's checkpoint tool does.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from toolkit.checkpoint.native import CheckpointManager
from toolkit.checkpoint.reshard import has_optimizer_state
from toolkit.checkpoint.run_dir import resolve_checkpoint
from toolkit.config import load_config, save_config
from toolkit.errors import CheckpointError
from toolkit.models.build import build_model
from toolkit.optim import build_optimizer
from toolkit.parallel.validate import validate_parallel

logger = logging.getLogger(__name__)


def reshard_offline(src: str | Path, out: str | Path, *, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                    virtual_pipeline: int | None = None) -> Path:
    """``megaforge convert SRC OUT --to megaforge --tensor-parallel N --pipeline-parallel M``.

    Writes a run directory ``out`` (config.yaml with the new layout, tokenizer/, checkpoints/step_K)
    whose checkpoint — model and, when saved, optimizer state — is laid out for tp=N: the
    vocabulary is re-padded to ``make_vocab_size_divisible_by × N``. Continue it with
    ``torchrun --nproc-per-node (N × M × dp) -m toolkit train OUT/config.yaml trainer.run_dir=OUT``.
    Runs in one process and holds the model (and optimizer state) in memory once; DCP itself needs
    no offline step to change tp/pp/dp (any layout loads any checkpoint), this makes the vocabulary
    padding and the recorded layout match the target ahead of time, as Megatron's checkpoint tool does.
    """
    run_dir, step = resolve_checkpoint(src)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; choose a new output folder")
    cfg = load_config(str(run_dir / "config.yaml"))
    p = cfg.parallel
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size = tensor_parallel, pipeline_parallel
    p.virtual_pipeline_model_parallel_size = virtual_pipeline if pipeline_parallel > 1 else None
    p.sequence_parallel = p.sequence_parallel and tensor_parallel > 1
    validate_parallel(cfg, tensor_parallel * pipeline_parallel)
    with torch.device("meta"):
        model = build_model(cfg.model, tensor_parallel_size=tensor_parallel)
    model.to_empty(device="cpu")
    optimizer = build_optimizer(model, cfg.optim) if has_optimizer_state(step) else None
    manager = CheckpointManager(step.parent)
    state = manager.load(step, model, optimizer)
    repadded = state.pop("repadded", [])
    state.pop("not_loaded", None)
    layout = {"tp": tensor_parallel, "pp": pipeline_parallel, "dp": 1}
    if p.virtual_pipeline_model_parallel_size:
        layout["vpp"] = p.virtual_pipeline_model_parallel_size
    state.update(layout=layout, resharded_from=str(step))
    out.mkdir(parents=True, exist_ok=True)
    cfg.trainer.run_dir = str(out)
    if (run_dir / "tokenizer").is_dir():
        shutil.copytree(run_dir / "tokenizer", out / "tokenizer")
        cfg.tokenizer.path = str((out / "tokenizer").resolve())
    save_config(cfg, out / "config.yaml")
    CheckpointManager(out / "checkpoints").save(int(state["step"]), model, optimizer, state)
    what = "model and optimizer state" if optimizer is not None else "model weights"
    logger.info(f"resharded {step} ({what}) for tp={tensor_parallel}, pp={pipeline_parallel}"
                + (f", vpp={virtual_pipeline}" if layout.get("vpp") else "")
                + (f"; vocabulary padding re-laid in {len(repadded)} tensors" if repadded else "")
                + f" → {out}")
    return out
