"""Tensor-at-a-time reading and writing for the converters, so memory stays bounded by the largest
conversion step (a layer's q/k/v), never the whole model.

Sources (``names()``, ``meta(name)`` without reading data, ``load(names)``):

* :class:`DCPSource` — the model entries of a native DCP checkpoint, read through
  ``torch.distributed.checkpoint``'s metadata and a ``FileSystemReader`` for just the tensors asked,
  both through :mod:`toolkit.checkpoint.safe_dcp` (no free unpickling).
* :class:`SafetensorsSource` — a Hugging Face folder (one file or an index of shards): headers
  checked with ``safe_open``, each tensor read with ``readinto`` into a buffer of its own. Not
  through a memory map: every mapped page read stays resident (RSS grew to the model size on a
  1.3B import, benchmarks/convert_memory.py), while a read buffer is freed with its tensor.
* :class:`LazySource` — any ``name → meta`` table with a loader function (legacy Megatron merges).
* :class:`AliasedSource` — another source plus tied names its file leaves out (T5's ``lm_head``).

Sinks:

* :func:`write_safetensors` — shards planned from the output shapes up front, then each file's
  header is written and tensors are streamed into it as they are produced.
* :func:`write_dcp_checkpoint` — a native ``step_N`` checkpoint written through DCP with a planner
  that produces each tensor only when DCP asks for it (one file per tensor).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable, Iterator, Mapping, Protocol, Sequence

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from toolkit.checkpoint.native import LATEST, TRAINER_STATE
from toolkit.checkpoint.safe_dcp import load as load_dcp
from toolkit.checkpoint.safe_dcp import read_metadata
from toolkit.errors import CheckpointError, first_line
from toolkit.mapping.tables import MappingContext, Step, check_shapes

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_FROM_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class TensorSource(Protocol):
    def names(self) -> list[str]: ...

    def meta(self, name: str) -> torch.Tensor: ...

    def load(self, names: Sequence[str]) -> list[torch.Tensor]: ...


def meta_tensor(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device="meta")


# ---------------------------------------------------------------------------- sources


class DCPSource:
    """Tensors under ``prefix`` (default the ``model`` entry) of a DCP checkpoint folder."""

    def __init__(self, path: str | Path, prefix: str = "model."):
        self.path, self.prefix = Path(path), prefix
        try:
            md = read_metadata(self.path)
        except CheckpointError:
            raise
        except Exception as e:  # missing or corrupt .metadata
            raise CheckpointError(f"cannot read DCP metadata of {self.path} ({first_line(e)}); "
                                  "is it a complete megaforge checkpoint?") from None
        self._meta = {k[len(prefix):]: meta_tensor(v.size, v.properties.dtype)
                      for k, v in md.state_dict_metadata.items()
                      if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)}

    def names(self) -> list[str]:
        return list(self._meta)

    def meta(self, name: str) -> torch.Tensor:
        return self._meta[name]

    def load(self, names: Sequence[str]) -> list[torch.Tensor]:
        state = {self.prefix + n: torch.empty(self._meta[n].shape, dtype=self._meta[n].dtype) for n in names}
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                load_dcp(state, self.path, no_dist=True)
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as e:
            raise CheckpointError(f"cannot read {', '.join(names)} from {self.path}: {first_line(e)}") from None
        return [state[self.prefix + n] for n in names]


class SafetensorsSource:
    """The weights of a Hugging Face folder: ``model.safetensors`` or an index of shards."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({first_line(e)}); it must map "
                                      "tensor names to shard file names under 'weight_map'") from None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise CheckpointError(f"{index} is not a valid safetensors index: 'weight_map' must map tensor names "
                                      "to shard file names")
            files = sorted(set(weight_map.values()), key=str)
            for f in files:  # shards are files of this folder: never ../x, an absolute path or a subfolder
                if not isinstance(f, str) or f in ("", ".", "..") or Path(f).name != f or "\\" in f:
                    raise CheckpointError(f"{index} names the shard {f!r}, which is not a file name in {self.folder}; "
                                          "fix the index so that it lists only file names of that folder")
        elif (self.folder / SINGLE_FILE).is_file():
            files, weight_map = [SINGLE_FILE], {}
        else:
            pickles = [p.name for p in self.folder.glob("*.bin")] + [p.name for p in self.folder.glob("*.pt")]
            hint = (f" (found {pickles[0]}: pickle weights are not loaded; re-save the model with "
                    "save_pretrained(..., safe_serialization=True))") if pickles else ""
            raise CheckpointError(f"{self.folder} has no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        self._tensors: dict[str, tuple[Path, int, torch.Tensor]] = {}  # name → (file, byte offset, meta)
        for f in files:
            path = self.folder / f
            try:
                with safe_open(str(path), framework="pt") as h:  # validates the header and its offsets
                    names = list(h.keys())
                data_start, entries = _safetensors_header(path)
                for name in names:
                    e = entries[name]
                    self._tensors[name] = (path, data_start + e["data_offsets"][0],
                                           meta_tensor(e["shape"], _FROM_SAFETENSORS[e["dtype"]]))
            except Exception as e:
                raise CheckpointError(f"cannot open {path}: {first_line(e)}") from None
        missing = sorted(set(weight_map) - set(self._tensors))
        if missing:
            raise CheckpointError(f"{index} lists {missing[0]!r} but no shard holds it; the download is incomplete")

    def names(self) -> list[str]:
        return list(self._tensors)

    def meta(self, name: str) -> torch.Tensor:
        return self._tensors[name][2]

    def load(self, names: Sequence[str]) -> list[torch.Tensor]:
        return [self._read(n) for n in names]

    def _read(self, name: str) -> torch.Tensor:
        path, offset, meta = self._tensors[name]
        buf = torch.empty(meta.numel() * meta.element_size(), dtype=torch.uint8)
        view, got = memoryview(buf.numpy()), 0
        with open(path, "rb", buffering=0) as fh:
            fh.seek(offset)
            while got < len(view):
                n = fh.readinto(view[got:])
                if not n:
                    raise CheckpointError(f"{path} ends inside tensor '{name}'; the file is truncated")
                got += n
        return buf.view(meta.dtype).reshape(meta.shape)  # safetensors data is little-endian, as torch's


def _safetensors_header(path: Path) -> tuple[int, dict]:
    """(byte offset where the data starts, the header's name → {dtype, shape, data_offsets} entries)."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


class LazySource:
    """A source given as ``name → meta tensor`` and a function that loads one tensor."""

    def __init__(self, metas: Mapping[str, torch.Tensor], loader: Callable[[str], torch.Tensor]):
        self._metas, self._loader = dict(metas), loader

    def names(self) -> list[str]:
        return list(self._metas)

    def meta(self, name: str) -> torch.Tensor:
        return self._metas[name]

    def load(self, names: Sequence[str]) -> list[torch.Tensor]:
        return [self._loader(n) for n in names]


class AliasedSource:
    """``source`` plus names it lacks that read another of its tensors: the weights transformers
    ties and leaves out of a file (``aliases``: missing name → the name read in its place)."""

    def __init__(self, source: TensorSource, aliases: Mapping[str, str]):
        have = set(source.names())
        self._source = source
        self._aliases = {k: v for k, v in aliases.items() if k not in have and v in have}

    def names(self) -> list[str]:
        return self._source.names() + list(self._aliases)

    def meta(self, name: str) -> torch.Tensor:
        return self._source.meta(self._aliases.get(name, name))

    def load(self, names: Sequence[str]) -> list[torch.Tensor]:
        return self._source.load([self._aliases.get(n, n) for n in names])


# ---------------------------------------------------------------------------- safetensors writer


def parse_size(size: int | str) -> int:
    """``"2GB"`` (10^9), ``"500MiB"`` (2^20), ``"10KB"`` or a byte count → bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise CheckpointError(f"cannot read size {size!r}; write it like 2GB, 500MB or 1048576")
    unit = m.group(2).upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_shards(items: Sequence[tuple[str, torch.Tensor]], max_shard_size: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Greedy split in order: a shard closes before the tensor that would push it past the limit."""
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, meta in items:
        n = _nbytes(meta)
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, meta))
        size += n
    return shards


def _header(items: Sequence[tuple[str, torch.Tensor]]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, meta in items:
        n = _nbytes(meta)
        header[name] = {"dtype": SAFETENSORS_DTYPES[meta.dtype], "shape": list(meta.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors(folder: str | Path, items: Sequence[tuple[str, torch.Tensor]],
                      tensors: Iterator[tuple[str, torch.Tensor]], *, max_shard_size: int | str = "2GB") -> list[Path]:
    """Write ``tensors`` (produced in the order of ``items``, whose metas give shapes and dtypes) as
    ``model.safetensors``, or as shards + ``model.safetensors.index.json`` above ``max_shard_size``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(items, parse_size(max_shard_size))
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for stale in list(folder.glob("model*.safetensors")) + [folder / INDEX_FILE]:
        if stale.name not in names and stale.exists():
            stale.unlink()
    weight_map: dict[str, str] = {}
    total = 0
    for shard, fname in zip(shards, names):
        tmp = folder / (fname + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(_header(shard))
            for name, meta in shard:
                got_name, t = next(tensors)
                if got_name != name or tuple(t.shape) != tuple(meta.shape) or t.dtype != meta.dtype:
                    raise RuntimeError(f"expected {name} {tuple(meta.shape)} {meta.dtype}, got {got_name} "
                                       f"{tuple(t.shape)} {t.dtype}")
                data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)  # raw little-endian bytes
                fh.write(memoryview(data.numpy()))
                weight_map[name] = fname
                total += _nbytes(meta)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder / fname)
    written = [folder / f for f in names]
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        written.append(folder / INDEX_FILE)
    return written


# ---------------------------------------------------------------------------- DCP writer


class _LazySavePlanner(DefaultSavePlanner):
    """Plans from ``meta`` tensors; the data of each entry is produced when DCP writes it."""

    def __init__(self, produce: Callable[[str], torch.Tensor]):
        super().__init__()
        self._produce = produce

    def lookup_object(self, index):
        return self._produce(index.fqn)


def write_dcp_checkpoint(checkpoints: str | Path, step: int, metas: Mapping[str, torch.Tensor],
                         produce: Callable[[str], torch.Tensor], trainer_state: dict) -> Path:
    """Write ``checkpoints/step_<step>`` holding ``{"model": ...}`` and point ``latest`` at it.

    ``produce(name)`` returns our tensor ``name`` (shape and dtype as in ``metas``); it is called
    once per tensor while DCP writes, so only one tensor (one conversion step) is in memory.
    """
    checkpoints = Path(checkpoints)
    checkpoints.mkdir(parents=True, exist_ok=True)
    final, tmp = checkpoints / f"step_{step}", checkpoints / f"step_{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = {"model": dict(metas)}

    def produce_flat(fqn: str) -> torch.Tensor:
        name = fqn[len("model."):]
        t = produce(name)
        meta = metas[name]
        if tuple(t.shape) != tuple(meta.shape):
            raise RuntimeError(f"{name}: produced shape {tuple(t.shape)}, planned {tuple(meta.shape)}")
        return t.to(meta.dtype).contiguous()

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, storage_writer=FileSystemWriter(str(tmp), single_file_per_rank=False),
                 planner=_LazySavePlanner(produce_flat), no_dist=True)
    (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = checkpoints / (LATEST + ".tmp")
    pointer.write_text(final.name)
    os.replace(pointer, checkpoints / LATEST)
    return final


# ---------------------------------------------------------------------------- running a conversion plan
# The steps of ``TemplateTable.plan`` run on a TensorSource without holding more than one step's
# tensors: ``plan_metas`` on ``meta`` tensors first (every output name, shape and dtype, checked
# against the model, before any data is read — what a writer lays out), then ``stream_steps`` in plan
# order (safetensors writer) or ``StepCache`` by name in whatever order a writer asks (DCP writer).

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """fp32 | bf16 | fp16 (or a torch dtype) → the dtype outputs are cast to; None keeps the source's."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not one of fp32, bf16, fp16")
    return DTYPES[dtype]


def plan_metas(steps: list[Step], source: TensorSource, ctx: MappingContext, *, dtype: torch.dtype | None,
               expected_src: dict | None, expected_dst: dict | None, where: str) -> list[tuple[str, torch.Tensor]]:
    """Run every step on ``meta`` tensors: shapes and dtypes of all outputs before reading data."""
    items: list[tuple[str, torch.Tensor]] = []
    for step in steps:
        metas = [source.meta(n) for n in step.src]
        if expected_src is not None:
            for name, m in zip(step.src, metas):
                want = expected_src.get(name)
                if want is not None and tuple(m.shape) != tuple(want):
                    raise CheckpointError(f"{where}: tensor '{name}' has shape {tuple(m.shape)}, but the config "
                                          f"describes {tuple(want)}; config and weights disagree")
        outs = step.run(metas, ctx)
        check_shapes(step, outs, expected_dst, source=where)
        items += [(n, o.to(dtype) if dtype is not None else o) for n, o in zip(step.dst, outs)]
    return items


def stream_steps(steps: list[Step], source: TensorSource, ctx: MappingContext,
                 dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """Load, convert and yield the destination tensors step by step (in plan order)."""
    for step in steps:
        for name, t in zip(step.dst, step.run(source.load(step.src), ctx)):
            yield name, (t.to(dtype) if dtype is not None else t)


class StepCache:
    """Produces destination tensors by name, running each step once and keeping only its outputs."""

    def __init__(self, steps: list[Step], source: TensorSource, ctx: MappingContext):
        self._by_dst = {n: s for s in steps for n in s.dst}
        self._source, self._ctx = source, ctx
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self._cache:
            step = self._by_dst[name]
            self._cache = dict(zip(step.dst, step.run(self._source.load(step.src), self._ctx)))
        return self._cache.pop(name)


def scratch_dir(out: str | Path) -> Path | None:
    """Where an intermediate file or folder of a conversion writing ``out`` goes: beside ``out`` (the same
    file system, so the final rename is atomic), else the system's temporary folder (None)."""
    parent = Path(out).expanduser().resolve().parent
    return parent if parent.is_dir() else None
