"""Loading a checkpoint into a different parallel layout.

DCP already reshards every tensor whose global shape is the same in both layouts (any tp/pp/dp/FSDP
split of it). What it cannot do alone is the vocabulary padding: the word embedding, an untied
output layer and a vocabulary bias are padded to a multiple of ``make_vocab_size_divisible_by × tp``
(as Megatron does), so a checkpoint written at tp=2 has more (or fewer) padding rows than a model
built for tp=1. For those tensors — model weights and their optimizer state alike — the saved
tensor is read whole into a temporary buffer, its first rows copied into the new shape (padding
rows zeroed: no token id ever reaches them) and the result laid out like the live tensor
(plain, tensor-parallel or FSDP-sharded DTensor) without any communication.

Only a difference along dim 0 between two sizes that both hold the whole vocabulary is accepted;
any other shape difference is a one-line :class:`~toolkit.errors.CheckpointError` naming the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from toolkit.checkpoint.safe_dcp import read_metadata
from toolkit.errors import CheckpointError


def saved_tensor_shapes(path: str | Path) -> dict[str, torch.Size]:
    """Global shape of every tensor in the DCP checkpoint at ``path``, by flattened key
    (``model.embed.tokens.weight``, ``optim.state.embed.tokens.weight.exp_avg``, …)."""
    metadata = read_metadata(path)
    return {k: torch.Size(v.size) for k, v in metadata.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def has_optimizer_state(path: str | Path) -> bool:
    metadata = read_metadata(path)
    return any(k.startswith("optim.") for k in metadata.state_dict_metadata)


@dataclass
class PaddingFix:
    """One tensor whose saved vocabulary padding differs from the live tensor's."""

    key: str  # flattened DCP key
    parent: dict  # the nested state-dict level that holds it
    name: str  # its name at that level
    live: torch.Tensor  # the model's (or optimizer's) tensor, plain or DTensor
    buffer: torch.Tensor  # plain tensor of the saved shape that DCP loads into


def _walk(state: dict, prefix: str = "") -> Iterator[tuple[str, dict, str, Any]]:
    for name, value in state.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            yield from _walk(value, key + ".")
        else:
            yield key, state, name, value


def prepare_padding_fixes(state: dict, saved: dict[str, torch.Size], *, vocab_size: int | None,
                          where: str) -> list[PaddingFix]:
    """Swap each vocabulary-padded tensor of ``state`` whose saved padding differs for a buffer of the
    saved shape (in place); return the fixes to apply after ``dcp.load``."""
    fixes = []
    for key, parent, name, value in _walk(state):
        if not torch.is_tensor(value) or key not in saved:
            continue
        have, want = saved[key], value.shape
        if have == want:
            continue
        same_rest = len(have) == len(want) and have[1:] == want[1:]
        if not same_rest or vocab_size is None or min(have[0], want[0]) < vocab_size:
            raise CheckpointError(f"{where}: tensor {key} has shape {tuple(have)} in the checkpoint but "
                                  f"{tuple(want)} in the model; it was written by a different model configuration")
        local = value.to_local() if hasattr(value, "to_local") else value
        buffer = torch.empty(have, dtype=local.dtype, device="cpu")
        parent[name] = buffer
        fixes.append(PaddingFix(key=key, parent=parent, name=name, live=value, buffer=buffer))
    return fixes


@torch.no_grad()
def apply_padding_fixes(fixes: list[PaddingFix]) -> list[str]:
    """Copy the loaded rows into the live tensors (zeroing extra padding rows) and put the live
    tensors back into the state dict. Returns the flattened keys that were re-padded."""
    for fix in fixes:
        full = torch.zeros(fix.live.shape, dtype=fix.buffer.dtype)  # [new_padded, ...] global shape
        rows = min(full.shape[0], fix.buffer.shape[0])
        full[:rows] = fix.buffer[:rows]
        if hasattr(fix.live, "device_mesh"):  # DTensor: lay the full tensor out like the live one, locally
            from torch.distributed.tensor import distribute_tensor

            local = distribute_tensor(full, fix.live.device_mesh, fix.live.placements, src_data_rank=None).to_local()
            fix.live.to_local().copy_(local)
        else:
            fix.live.copy_(full)
        fix.parent[fix.name] = fix.live
    return [fix.key for fix in fixes]
