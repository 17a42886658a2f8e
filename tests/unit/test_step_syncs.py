"""The training step reads values back from the device once (a GPU step waits for the device only there)."""

from __future__ import annotations

import argparse
import collections
import runpy
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "gpt_throughput.py"
HOST_READS = ("item", "tolist", "__float__", "__bool__", "__int__", "__index__", "cpu", "numpy")


def test_one_host_read_per_training_step(monkeypatch, tmp_path):
    """``Trainer.train_step`` (built as ``megaforge train`` builds it, through the benchmark's helper):
    one ``tolist`` of loss, gradient norm and the skip/stop flags; no ``item``/``float``/``bool`` anywhere
    in forward, backward, clipping or the optimizer step."""
    bench = runpy.run_path(str(BENCH), run_name="bench")
    args = argparse.Namespace(recipe="gpt-tiny", layers=1, hidden=32, heads=4, vocab=250, seq=16, micro_batch=2,
                              dropout=0.0, set=[], device="cpu", steps=1, warmup=1, threads=None, peak_tflops=None,
                              modes=None, compile=False, interleave=False, profile=0, hf_activation=None,
                              precisions=None)
    cfg = bench["run_config"](args, "fp32", False, str(tmp_path))
    step, runtime, *_ = bench["megaforge_step"](cfg, str(tmp_path))
    batches = bench["make_batches"](cfg, 2, torch.device("cpu"))
    step(batches[0])  # the first step allocates the optimizer state
    counts: collections.Counter = collections.Counter()
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **k):
            counts[_name] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    loss = step(batches[1])
    monkeypatch.undo()
    runtime.close()
    assert counts == {"tolist": 1}, counts
    assert isinstance(loss, float) and loss > 0
