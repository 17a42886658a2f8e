"""Loading torch pickles written by other programs (legacy Megatron-LM ``.pt`` files) safely.

``torch.load(weights_only=True)`` plus an explicit allow-list (:data:`SAFE_GLOBALS`):
``argparse.Namespace`` (Megatron's ``args``), numpy arrays and dtypes (the saved RNG state) and
``io.BytesIO`` (Transformer Engine's ``_extra_state``). Classes of Megatron, Transformer Engine or
Apex themselves (enums inside ``args``) are replaced by inert :class:`Placeholder` objects, so those
packages are never imported; any other global is refused with a one-line
:class:`~toolkit.errors.CheckpointError` naming it. Nothing in a file can run code.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit.errors import CheckpointError, first_line

#: module prefixes whose classes are replaced by inert placeholders instead of being imported
PLACEHOLDER_PREFIXES = ("megatron.", "transformer_engine.", "apex.")


def _numpy_globals() -> list:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    dtypes = [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.float32, np.int32, np.uint8, np.bool_)]
    return [_reconstruct, np.ndarray, np.dtype, *dtypes]


#: globals a Megatron checkpoint may need beyond torch's own weights_only allow-list
SAFE_GLOBALS: list = [argparse.Namespace, io.BytesIO, *_numpy_globals()]


class Placeholder:
    """Stands in for a Megatron/TE/Apex class (e.g. an enum in ``args``); keeps its arguments, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"Placeholder{self.args!r}"


def _allowed_names() -> set[str]:
    return {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS} | {"_io.BytesIO"}


def safe_load(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True, mmap=True)`` with :data:`SAFE_GLOBALS`; refuses any other global."""
    path = Path(path)
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({first_line(e)})") from None
    allowed = _allowed_names()
    extra: list = []
    for name in needed:
        if name in allowed:
            continue
        if name.startswith(PLACEHOLDER_PREFIXES):
            extra.append((Placeholder, name))
        else:
            raise CheckpointError(f"{path}: refusing to unpickle '{name}', which is not on megaforge's allow-list "
                                  "(legacy checkpoints load with weights_only=True); re-save it without that object")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS + extra):
            try:  # memory-mapped: tensors are read from disk only when a merge touches them
                return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # pre-zipfile torch.save files cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load safely ({first_line(e)})") from None

