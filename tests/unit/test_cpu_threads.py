"""Default intra-op threads (``trainer.num_threads: null``): the usable cores split over the local ranks."""

from __future__ import annotations

import os

from toolkit.training.run import cpu_threads


def test_threads_split_the_cores_over_local_ranks(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cpu_threads(None, "cpu") == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun --nproc-per-node 4 (it sets OMP_NUM_THREADS=1)
    assert cpu_threads(None, "cpu") == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert cpu_threads(None, "cpu") == 1
    assert cpu_threads(3, "cpu") == 3  # trainer.num_threads wins
    assert cpu_threads(None, "cuda") is None  # GPU runs keep torch's default
