"""A fine-tuning dataset reaches data-loader workers started with ``spawn`` (macOS's default start method,
Linux's ``forkserver`` from Python 3.14 pickles the same way): the whole NCBI-disease training set once
needed a shared-memory file descriptor per example tensor, 22k of them, and failed on "Too many open files"."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from toolkit.data.tasks.datasets import EncodedTask, TaskDataset


def _rows(n: int) -> list[dict[str, torch.Tensor]]:
    return [{"tokens": torch.arange(i, i + 8), "token_types": torch.zeros(8, dtype=torch.long),
             "padding_mask": torch.tensor([1] * (i % 8 + 1) + [0] * (7 - i % 8)), "labels": torch.tensor(i % 3)}
            for i in range(n)]


def test_items_are_the_rows():
    rows = _rows(20)
    ds = TaskDataset(rows, EncodedTask([], None))
    assert len(ds) == 20
    for i in (0, 7, 19):
        item = ds[i]
        assert item.keys() == rows[i].keys()
        for k in rows[i]:
            assert torch.equal(item[k], rows[i][k]) and item[k].dtype == rows[i][k].dtype, k


def test_spawned_loader_workers_get_the_dataset_within_256_open_files(tmp_path):
    script = tmp_path / "spawn_loader.py"
    script.write_text(textwrap.dedent("""
        import resource
        import sys

        from torch.utils.data import DataLoader

        sys.path.insert(0, sys.argv[1])
        from tests.unit.test_task_dataset_workers import _rows
        from toolkit.data.tasks.datasets import EncodedTask, TaskDataset

        if __name__ == "__main__":
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
            ds = TaskDataset(_rows(1000), EncodedTask([], None))  # 4,000 tensors
            loader = DataLoader(ds, batch_size=100, num_workers=1, multiprocessing_context="spawn")
            print(sum(int(batch["tokens"][:, 0].sum()) + int(batch["labels"].sum()) for batch in loader))
    """))
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, str(script), root], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split()[-1]) == sum(range(1000)) + sum(i % 3 for i in range(1000))
