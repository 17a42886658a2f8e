"""The time the training step waits for its batches."""

from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator


class TimedBatches:
    """Batches of ``batches``, each passed through ``to_device`` (the host→device copy), adding the
    seconds the consumer spends in ``next()`` to :attr:`seconds`: loading and collating in this
    process (``num_workers=0``), or waiting on the loader's worker processes, plus the copy.

    A step whose data pipeline keeps up spends almost no time here; the trainer logs it as
    ``data_wait_s`` / ``data_wait_frac`` in its metrics records.
    """

    def __init__(self, batches: Iterable[dict], to_device: Callable[[dict], dict]) -> None:
        self._batches: Iterator[dict] = iter(batches)
        self._to_device = to_device
        self.seconds = 0.0  # total seconds spent in next(), since construction

    def __iter__(self) -> "TimedBatches":
        return self

    def __next__(self) -> dict:
        start = time.perf_counter()
        try:
            return self._to_device(next(self._batches))
        finally:
            self.seconds += time.perf_counter() - start
