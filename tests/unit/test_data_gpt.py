"""GPT dataset index, caching, splits, blending, data_prefix parsing and the resumable sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit.data import (
    BlendedDataset,
    GPTDataset,
    IndexedDataset,
    IndexedDatasetWriter,
    PretrainingSampler,
    build_gpt_datasets,
    collate,
    parse_data_prefix,
    split_documents,
)
from toolkit.data import gpt_dataset as gpt_mod
from toolkit.errors import ConfigError

EOD = 9999


def make_corpus(prefix: Path, num_docs: int = 40, seed: int = 0, base: int = 0) -> IndexedDataset:
    """Documents of random length 1..30; token values encode (document, position) so every token is unique."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, np.int32) as w:
        for d in range(num_docs):
            n = int(rng.integers(1, 30))
            w.add_document(base + d * 100 + np.arange(n))
    return IndexedDataset(prefix)


@pytest.fixture
def corpus(tmp_path) -> IndexedDataset:
    return make_corpus(tmp_path / "c")


def stream(ds: GPTDataset) -> np.ndarray:
    """The packed token stream the dataset draws from: its doc_idx documents back to back."""
    return np.concatenate([ds.indexed[int(d)] for d in ds.doc_idx]).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# GPT dataset


def test_samples_pack_the_stream(corpus, tmp_path):
    docs = np.arange(len(corpus))
    ds = GPTDataset(corpus, docs, num_samples=50, seq_length=16, seed=3, cache_dir=tmp_path / "idx")
    assert len(ds) == 50
    unshuffled = [ds.sample_at(j) for j in range(50)]
    for s in unshuffled:
        assert s.shape == (17,) and s.dtype == np.int64
    for a, b in zip(unshuffled, unshuffled[1:]):
        assert a[-1] == b[0]  # consecutive samples overlap by one token
    joined = np.concatenate([unshuffled[0]] + [s[1:] for s in unshuffled[1:]])
    assert np.array_equal(joined, stream(ds)[: joined.size])  # and reproduce the stream
    # ds[i] is unshuffled sample shuffle_idx[i]; every sample appears once
    assert sorted(ds.shuffle_idx.tolist()) == list(range(50))
    for i in (0, 7, 49, -1):
        item = ds[i]
        assert set(item) == {"tokens"} and item["tokens"].dtype == np.int64
        assert np.array_equal(item["tokens"], unshuffled[int(ds.shuffle_idx[i])])
    with pytest.raises(IndexError):
        ds[50]


def test_multiple_epochs_shuffled_per_epoch(corpus, tmp_path):
    docs = np.arange(10, 20)
    tokens = int(corpus.sizes[docs].sum())
    ds = GPTDataset(corpus, docs, num_samples=(3 * tokens) // 8, seq_length=8, seed=1, cache_dir=tmp_path)
    epochs = ds.doc_idx.reshape(-1, docs.size)
    assert epochs.shape[0] >= 3
    for e in epochs:  # each epoch visits every document exactly once
        assert sorted(e.tolist()) == docs.tolist()
    assert any(not np.array_equal(epochs[0], e) for e in epochs[1:])
    last = ds.sample_at(len(ds) - 1)
    assert last.shape == (9,)


def test_deterministic_and_seed_dependent(corpus, tmp_path):
    docs = np.arange(len(corpus))
    a = GPTDataset(corpus, docs, 30, 8, seed=5, cache_dir=tmp_path / "a")
    b = GPTDataset(corpus, docs, 30, 8, seed=5, cache_dir=tmp_path / "b")  # separate caches: built twice
    c = GPTDataset(corpus, docs, 30, 8, seed=6, cache_dir=tmp_path / "a")
    assert not a.loaded_from_cache and not b.loaded_from_cache
    assert all(np.array_equal(a[i]["tokens"], b[i]["tokens"]) for i in range(30))
    assert any(not np.array_equal(a[i]["tokens"], c[i]["tokens"]) for i in range(30))


def test_cache_reuse(corpus, tmp_path, monkeypatch):
    docs = np.arange(len(corpus))
    first = GPTDataset(corpus, docs, 25, 8, seed=2)  # default cache dir: beside the data
    assert not first.loaded_from_cache
    for path in first.cache_paths.values():
        assert path.parent == Path(corpus.prefix).parent and path.is_file()

    def boom(*args, **kwargs):
        raise AssertionError("index rebuilt instead of loaded from the cache")

    monkeypatch.setattr(gpt_mod, "build_indices", boom)
    again = GPTDataset(corpus, docs, 25, 8, seed=2)
    assert again.loaded_from_cache
    assert all(np.array_equal(first[i]["tokens"], again[i]["tokens"]) for i in range(25))
    with pytest.raises(AssertionError, match="rebuilt"):
        GPTDataset(corpus, docs, 26, 8, seed=2)  # other arguments → other key → build


def test_corrupt_cache_is_rebuilt(corpus, tmp_path):
    docs = np.arange(len(corpus))
    a = GPTDataset(corpus, docs, 20, 8, seed=0, cache_dir=tmp_path)
    a.cache_paths["sample_idx"].write_bytes(b"garbage")
    b = GPTDataset(corpus, docs, 20, 8, seed=0, cache_dir=tmp_path)
    assert not b.loaded_from_cache
    assert np.array_equal(a[3]["tokens"], b[3]["tokens"])
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


# ----------------------------------------------------------------------------------------------
# splits and build_gpt_datasets


def test_split_documents():
    train, valid, test = split_documents(1000, "969,30,1")
    assert (train.size, valid.size, test.size) == (969, 30, 1)
    assert np.array_equal(np.concatenate([train, valid, test]), np.arange(1000))
    train, valid, test = split_documents(10, "8/2")
    assert (train.size, valid.size, test.size) == (8, 2, 0)
    assert [s.size for s in split_documents(7, "1")] == [7, 0, 0]
    for bad in ("a,b", "1,2,3,4", "0,0,0", "-1,2"):
        with pytest.raises(ConfigError):
            split_documents(10, bad)


def test_build_single_prefix(corpus, tmp_path):
    train, valid, test = build_gpt_datasets([corpus.prefix], splits_string="90,10,0", seq_length=8, seed=1,
                                            num_samples=(40, 5, 5), cache_dir=tmp_path / "idx")
    assert isinstance(train, GPTDataset) and len(train) == 40 and len(valid) == 5
    assert test is None  # no documents in the test split
    assert train.documents.max() < valid.documents.min()  # contiguous, disjoint document ranges


def test_build_blended(tmp_path):
    a = make_corpus(tmp_path / "a", 30, seed=1, base=0)
    b = make_corpus(tmp_path / "b", 3, seed=2, base=100_000)
    train, valid, test = build_gpt_datasets([0.75, str(a.prefix), "0.25", str(b.prefix)], splits_string="90,10,0",
                                            seq_length=8, seed=4, num_samples=(100, 10, 0))
    assert isinstance(train, BlendedDataset) and len(train) == 100 and test is None
    from_b = sum(int(train[i]["tokens"][0] >= 100_000) for i in range(100))
    assert from_b == 25
    assert isinstance(valid, BlendedDataset)  # b has no valid documents: a alone carries the split
    assert len(valid.datasets) == 1 and len(valid) == 10


# ----------------------------------------------------------------------------------------------
# blending and data_prefix


class Const:
    def __init__(self, tag: int, n: int) -> None:
        self.tag, self.n = tag, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[int, int]:
        return self.tag, i


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.5, 0.3, 0.2], [1, 1, 1], [0.05, 0.9, 0.05]])
def test_blending_tracks_weights(weights):
    size = 1000
    w = np.asarray(weights, float) / sum(weights)
    blend = BlendedDataset([Const(d, size) for d in range(len(w))], weights, size, seed=0)
    tags = np.array([blend[i][0] for i in range(size)])
    counts = np.zeros(len(w))
    for n, t in enumerate(tags, start=1):  # after every prefix of samples
        counts[t] += 1
        assert np.all(np.abs(counts - w * n) <= 1.0)
    for d in range(len(w)):  # each component is walked in order from 0
        assert [blend[i][1] for i in np.flatnonzero(tags == d)] == list(range(int((tags == d).sum())))
    again = BlendedDataset([Const(d, size) for d in range(len(w))], weights, size, seed=0)
    assert np.array_equal(again.dataset_index, blend.dataset_index)


def test_parse_data_prefix():
    assert parse_data_prefix(["data/a"]) == (["data/a"], [1.0])
    assert parse_data_prefix("data/a") == (["data/a"], [1.0])
    assert parse_data_prefix(["a", "b"]) == (["a", "b"], [0.5, 0.5])
    p, w = parse_data_prefix([0.7, "a", 0.3, "b"])
    assert p == ["a", "b"] and w == pytest.approx([0.7, 0.3])
    p, w = parse_data_prefix(["3", "a", "1.0", "b"])
    assert p == ["a", "b"] and w == pytest.approx([0.75, 0.25])
    for bad in ([], [0.7, "a", 0.3], ["a", 0.5], [0.5, 0.5], [-1, "a"], [0, "a", 1, "b"], [0.5, "a", "b", "c"]):
        with pytest.raises(ConfigError):
            parse_data_prefix(bad)


# ----------------------------------------------------------------------------------------------
# sampler


def run(total, consumed, micro, dp, steps=None):
    """Global micro-batches seen by all ranks, as a list of per-rank index lists."""
    iters = [iter(PretrainingSampler(total, consumed, micro, r, dp)) for r in range(dp)]
    out = []
    for batches in zip(*iters):
        out.append(list(batches))
        if steps is not None and len(out) == steps:
            break
    return out


def test_sampler_partitions_and_resumes():
    total, micro, dp = 103, 4, 3
    full = run(total, 0, micro, dp)
    assert len(full) == total // (micro * dp) == len(PretrainingSampler(total, 0, micro, 1, dp))
    for step, ranks in enumerate(full):  # ranks partition each global chunk, in order
        flat = [i for r in ranks for i in r]
        assert flat == list(range(step * micro * dp, (step + 1) * micro * dp))
        assert all(len(r) == micro for r in ranks)
    k = 5
    resumed = run(total, 0, micro, dp, steps=k) + run(total, k * micro * dp, micro, dp)
    assert resumed == full
    assert list(PretrainingSampler(10, 12, 2, 0, 1)) == []
    with pytest.raises(ConfigError):
        PretrainingSampler(10, 0, 2, 2, 2)


def test_dataloader_resume_sees_same_samples(corpus, tmp_path):
    ds = GPTDataset(corpus, np.arange(len(corpus)), 24, 8, seed=0, cache_dir=tmp_path)

    def tokens(consumed):
        loader = torch.utils.data.DataLoader(ds, batch_sampler=PretrainingSampler(len(ds), consumed, 2, 0, 1),
                                             collate_fn=collate)
        return [b["tokens"] for b in loader]

    full = tokens(0)
    assert full[0].dtype == torch.long and full[0].shape == (2, 9)
    resumed = full[:3] + tokens(3 * 2)
    assert len(resumed) == len(full) and all(torch.equal(a, b) for a, b in zip(full, resumed))
