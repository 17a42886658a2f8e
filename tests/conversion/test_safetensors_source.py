"""SafetensorsSource reads each tensor into a buffer of its own (no memory map): exact values for
every dtype and shape, shards through the index, and a truncated file named as such."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from toolkit.convert.streaming import SafetensorsSource
from toolkit.errors import CheckpointError

TENSORS = {"w": torch.randn(3, 5), "half": torch.randn(7).to(torch.bfloat16), "mask": torch.tensor([True, False]),
           "ids": torch.arange(6).reshape(2, 3), "empty": torch.empty(0, 4), "scalar": torch.tensor(3.5).half()}


def test_reads_every_dtype_exactly(tmp_path):
    save_file(TENSORS, tmp_path / "model.safetensors")
    source = SafetensorsSource(tmp_path)
    assert sorted(source.names()) == sorted(TENSORS)
    for name, got in zip(TENSORS, source.load(list(TENSORS))):
        want = TENSORS[name]
        assert source.meta(name).shape == want.shape and got.dtype == want.dtype and torch.equal(got, want), name


def test_reads_shards_through_the_index(tmp_path):
    save_file({"a": TENSORS["w"]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": TENSORS["ids"]}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    a, b = SafetensorsSource(tmp_path).load(["a", "b"])
    assert torch.equal(a, TENSORS["w"]) and torch.equal(b, TENSORS["ids"])


def test_truncated_file_is_named(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(64, 64)}, path)
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size - 100)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        SafetensorsSource(tmp_path).load(["w"])
