"""Reading DCP checkpoints without running code a checkpoint carries.

``torch.distributed.checkpoint`` reads a checkpoint's ``.metadata`` with a plain ``pickle.load``
(``FileSystemReader.read_metadata``) and its non-tensor entries (in a megaforge checkpoint: the
optimizer's parameter-group values ``lr``, ``betas``, …) with ``torch.load(weights_only=False)``
(``DefaultLoadPlanner.load_bytes``): a crafted checkpoint folder would run code when it is loaded.
Every megaforge read of a DCP checkpoint goes through this module instead:

* :class:`SafeFileSystemReader` — a ``FileSystemReader`` whose ``read_metadata`` unpickles with
  :class:`MetadataUnpickler`, which resolves only the globals a ``.metadata`` holds
  (:data:`METADATA_GLOBALS`, plus torch's dtype, layout and memory-format constants), and checks
  that every shard it names is a plain file name inside the checkpoint folder;
* :class:`SafeLoadPlanner` — a ``DefaultLoadPlanner`` whose ``load_bytes`` uses
  ``torch.load(weights_only=True)``;
* :func:`read_metadata`, :func:`load` — the two calls the rest of megaforge makes.

Anything else is a one-line :class:`~toolkit.errors.CheckpointError`, before any of it runs.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import ReadItem

from toolkit.errors import CheckpointError, first_line

_DCP = "torch.distributed.checkpoint.metadata"

# What a ``.metadata`` written by torch 2.13 holds (found by unpickling those of a model + AdamW
# checkpoint, a bf16 model-only one and an FSDP2-sharded one; tests/reliability/test_security_fixes.py).
METADATA_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    (_DCP, "Metadata"),
    (_DCP, "StorageMeta"),
    (_DCP, "MetadataIndex"),
    (_DCP, "TensorStorageMetadata"),
    (_DCP, "BytesStorageMetadata"),
    (_DCP, "ChunkStorageMetadata"),
    (_DCP, "TensorProperties"),
    (_DCP, "_MEM_FORMAT_ENCODING"),  # an Enum: TensorProperties pickles its memory format as one
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # torch.strided & co. pickle as _get_layout("torch.strided")
    ("torch", "Size"),
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
    ("pathlib", "PurePosixPath"),
})

_TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)


def _allowed(module: str, name: str) -> bool:
    if (module, name) in METADATA_GLOBALS:
        return True
    # torch.float32, torch.bfloat16, …: constants, resolved by name
    return module == "torch" and isinstance(getattr(torch, name, None), _TORCH_CONSTANTS)


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a global that DCP metadata never holds."""


class MetadataUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that resolves only the globals of DCP metadata."""

    def find_class(self, module: str, name: str) -> Any:
        if not _allowed(module, name):
            raise RefusedGlobal(f"global '{module}.{name}' is not allowed in DCP metadata")
        return super().find_class(module, name)


def _plain_name(relative_path: Any) -> bool:
    text = str(relative_path)
    return text not in ("", ".", "..") and Path(text).name == text and "\\" not in text


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose metadata is unpickled with :class:`MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as fh:
                metadata = MetadataUnpickler(fh).load()
        except RefusedGlobal as e:
            raise CheckpointError(f"{path} was not loaded: {first_line(e)}; a megaforge checkpoint never holds it, "
                                  "so the file is damaged or crafted — load only checkpoints you or someone you "
                                  "trust wrote") from None
        except Exception as e:  # missing, truncated or not a pickle at all
            raise CheckpointError(f"cannot read DCP metadata {path} ({first_line(e)}); "
                                  "is it a complete megaforge checkpoint?") from None
        if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
            raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP metadata; "
                                  "is it a complete megaforge checkpoint?")
        for info in (metadata.storage_data or {}).values():
            relative = getattr(info, "relative_path", None)
            if not _plain_name(relative):
                raise CheckpointError(f"{path} names the shard file {relative!r}, which is not a file of "
                                      f"{self.path}; the metadata is damaged or crafted")
        # what FileSystemReader.read_metadata does after unpickling
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _weights_only_reason(e: Exception) -> str:
    """The line of torch's weights-only refusal that names what was refused (its first line only
    suggests loading with ``weights_only=False``)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), first_line(e))


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` whose non-tensor entries are read with ``torch.load(weights_only=True)``
    (plain Python values and tensors only)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"checkpoint entry {fqn} was not loaded: {_weights_only_reason(e)}; a megaforge "
                                  "checkpoint holds only plain values there, so it is damaged or crafted") from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def read_metadata(path: str | Path) -> Metadata:
    """The metadata of the DCP checkpoint folder ``path``, read with :class:`SafeFileSystemReader`."""
    return SafeFileSystemReader(str(path)).read_metadata()


def load(state: dict[str, Any], path: str | Path, **kwargs: Any) -> None:
    """``dcp.load`` of ``state`` from the checkpoint folder ``path`` through the safe reader and planner
    (``kwargs``: ``process_group``, ``no_dist``)."""
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner(), **kwargs)
    except CheckpointException as e:  # a refusal of ours, wrapped by DCP with its traceback: raise it as it is
        for failure in e.failures.values():
            exc = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(exc, CheckpointError):
                raise exc from None
        raise
