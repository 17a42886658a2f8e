"""Checkpoints: native sharded checkpoints (torch.distributed.checkpoint) with atomic save and resume."""

from toolkit.checkpoint.native import CheckpointManager, load_model_weights

__all__ = ["CheckpointManager", "load_model_weights"]
