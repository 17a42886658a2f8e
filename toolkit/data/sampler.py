"""Resumable pretraining batch sampler and collate function (Megatron's pretraining sampler).

Global sample indices are walked in order from ``consumed_samples``; every chunk of
``micro_batch_size × data_parallel_size`` indices is one global micro-batch, and data-parallel rank
``r`` takes slice ``[r × micro, (r + 1) × micro)`` of it. Training records ``consumed_samples``
(global micro-batches × micro × dp) in its checkpoint; a sampler built with that number continues
with exactly the samples the uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily so preprocessing workers start fast
    import torch

from toolkit.errors import ConfigError


class PretrainingSampler:
    """Batch sampler: yields lists of ``micro_batch_size`` dataset indices for one data-parallel rank.

    Use as ``DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)``. The last incomplete
    global chunk is dropped, so every rank yields the same number of batches.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int = 0, data_parallel_size: int = 1) -> None:
        if total_samples <= 0:
            raise ConfigError(f"no samples to draw from (total_samples={total_samples})")
        if micro_batch_size <= 0:
            raise ConfigError(f"trainer.micro_batch_size must be positive, got {micro_batch_size}")
        if data_parallel_size <= 0 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ConfigError(f"data-parallel rank {data_parallel_rank} is not in [0, {data_parallel_size})")
        if consumed_samples < 0:
            raise ConfigError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.total_samples = int(total_samples)
        self.consumed_samples = int(consumed_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.data_parallel_rank = int(data_parallel_rank)
        self.data_parallel_size = int(data_parallel_size)
        self.global_chunk = self.micro_batch_size * self.data_parallel_size

    def __len__(self) -> int:
        """Micro-batches this rank will yield."""
        return max(0, self.total_samples - self.consumed_samples) // self.global_chunk

    def __iter__(self) -> Iterator[list[int]]:
        lo = self.data_parallel_rank * self.micro_batch_size
        for start in range(self.consumed_samples, self.total_samples - self.global_chunk + 1, self.global_chunk):
            yield list(range(start + lo, start + lo + self.micro_batch_size))


def collate(batch: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack samples ``{"tokens": int array [s]}`` into ``{"tokens": LongTensor [b, s]}``.

    Every key is stacked; integer and bool arrays become int64/bool tensors, floats float32.
    """
    import torch

    if not batch:
        raise ValueError("collate() got an empty batch")
    out: dict[str, torch.Tensor] = {}
    for key in batch[0]:
        arr = np.stack([np.asarray(sample[key]) for sample in batch])  # [b, ...]
        if arr.dtype.kind in "iu":
            arr = arr.astype(np.int64, copy=False)
        elif arr.dtype.kind == "f":
            arr = arr.astype(np.float32, copy=False)
        out[key] = torch.from_numpy(np.ascontiguousarray(arr))
    return out


def build_data_loader(dataset: Any, *, consumed_samples: int, micro_batch_size: int, data_parallel_rank: int = 0,
                      data_parallel_size: int = 1, num_workers: int = 0,
                      total_samples: int | None = None) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` over ``dataset`` driven by :class:`PretrainingSampler` and :func:`collate`."""
    import torch

    sampler = PretrainingSampler(len(dataset) if total_samples is None else total_samples, consumed_samples,
                                 micro_batch_size, data_parallel_rank, data_parallel_size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                                       persistent_workers=num_workers > 0)
