"""Checkpoints in megaforge's native format: sharded (torch.distributed.checkpoint), atomic save,
resume, reshard-on-load, and the run directory that holds them. Conversion to and from other formats
is :mod:`toolkit.convert`."""

from toolkit.checkpoint.native import CheckpointManager, load_model_weights
from toolkit.checkpoint.run_dir import load_megaforge_model, resolve_checkpoint

__all__ = ["CheckpointManager", "load_model_weights", "load_megaforge_model", "resolve_checkpoint"]
