"""Running a conversion plan (the :class:`~toolkit.checkpoint.hf_mapping.Step`\\ s of
``TemplateTable.plan``) on a :class:`~toolkit.checkpoint.streaming.TensorSource`, never holding more
than one step's tensors:

* :func:`plan_metas` — every step on ``meta`` tensors first: all output names, shapes and dtypes
  (checked against the model) before any data is read, which is what a writer lays out;
* :func:`stream_steps` — then the real tensors, step by step in plan order (safetensors writer);
* :class:`StepCache` — or by name, in whatever order a writer asks for them (DCP writer).
"""

from __future__ import annotations

from typing import Iterator

import torch

from toolkit.checkpoint.hf_mapping import MappingContext, Step, check_shapes
from toolkit.checkpoint.streaming import TensorSource
from toolkit.errors import CheckpointError

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
