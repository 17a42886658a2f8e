"""Indexed dataset format, corruption detection, readers, preprocessing and the shipped-corpus cache."""

from __future__ import annotations

import gzip
import json
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

from toolkit.data import (
    IndexedDataset,
    IndexedDatasetWriter,
    best_dtype,
    corpus_prefix,
    preprocess,
    read_text,
)
from toolkit.data import corpus as corpus_mod
from toolkit.data.indexed import HEADER_SIZE
from toolkit.errors import DataError
from toolkit.tokenization.base import Tokenizer


class CharTokenizer(Tokenizer):
    """Byte-level test tokenizer: ids 0..255 are bytes, 256 is end-of-document."""

    library = "test"
    eod_id = 256

    @property
    def vocab_size(self) -> int:
        return 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        b = token.encode("utf-8")
        return b[0] if len(b) == 1 else None

    def id_to_token(self, idx: int) -> str:
        return "<eod>" if idx == 256 else bytes([idx]).decode("latin-1")

    def save(self, folder: str | Path) -> list[Path]:
        return []


def write(prefix: Path, docs: list[list[int]], dtype=np.uint16) -> None:
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(d)


DOCS = [[1, 2, 3], [4], [], [5, 6, 7, 8, 9], [10, 11]]


# ----------------------------------------------------------------------------------------------
# format


@pytest.mark.parametrize("dtype,big", [(np.uint16, 65535), (np.int32, 2_000_000)])
def test_round_trip(tmp_path, dtype, big):
    docs = DOCS + [[big, 0, big]]
    write(tmp_path / "ds", docs, dtype)
    ds = IndexedDataset(tmp_path / "ds")
    assert len(ds) == len(docs) and ds.dtype == np.dtype(dtype)
    assert ds.num_tokens == sum(map(len, docs))
    assert ds.sizes.dtype == np.int32 and ds.sizes.tolist() == [len(d) for d in docs]
    for i, d in enumerate(docs):
        assert ds[i].tolist() == d
    assert ds[-1].tolist() == docs[-1]
    assert ds.get(3, offset=1, length=2).tolist() == [6, 7]
    assert ds.get(3, offset=2).tolist() == [7, 8, 9]
    with pytest.raises(IndexError):
        ds[len(docs)]
    with pytest.raises(IndexError):
        ds.get(0, offset=2, length=5)
    assert (tmp_path / "ds.bin").stat().st_size == ds.num_tokens * np.dtype(dtype).itemsize
    assert not list(tmp_path.glob("*.tmp*"))


def test_best_dtype():
    assert best_dtype(50257) == np.uint16
    assert best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32
    assert best_dtype(250_000) == np.int32


def test_empty_dataset_and_pickle(tmp_path):
    import pickle

    write(tmp_path / "empty", [])
    assert len(IndexedDataset(tmp_path / "empty")) == 0
    write(tmp_path / "ds", DOCS)
    ds = pickle.loads(pickle.dumps(IndexedDataset(tmp_path / "ds")))
    assert ds[3].tolist() == DOCS[3]
    assert len(pickle.dumps(ds)) < 200  # pickles as its prefix, not its data


def test_id_out_of_dtype_range(tmp_path):
    with pytest.raises(DataError, match="does not fit"):
        write(tmp_path / "ds", [[70000]], np.uint16)
    assert not list(tmp_path.iterdir())  # aborted: nothing left behind


def test_unfinalized_writer_leaves_no_pair(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "ds", np.uint16)
    w.add_document([1, 2, 3])
    assert not (tmp_path / "ds.bin").exists() and not (tmp_path / "ds.idx").exists()
    with pytest.raises(DataError, match="not found"):
        IndexedDataset(tmp_path / "ds")
    w.finalize()
    assert IndexedDataset(tmp_path / "ds")[0].tolist() == [1, 2, 3]


# ----------------------------------------------------------------------------------------------
# corruption


@pytest.fixture
def good(tmp_path) -> Path:
    write(tmp_path / "ds", DOCS)
    return tmp_path / "ds"


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_files(good):
    Path(f"{good}.bin").unlink()
    with pytest.raises(DataError) as e:
        IndexedDataset(good)
    assert "ds.bin" in one_line(e) and "preprocess" in str(e.value)
    Path(f"{good}.idx").unlink()
    with pytest.raises(DataError, match=r"ds\.idx.*not found"):
        IndexedDataset(good)


def test_bad_magic(good):
    idx = Path(f"{good}.idx")
    data = bytearray(idx.read_bytes())
    data[:4] = b"JUNK"
    idx.write_bytes(bytes(data))
    with pytest.raises(DataError, match="bad magic") as e:
        IndexedDataset(good)
    assert str(idx) in one_line(e)


def test_unsupported_version(good):
    idx = Path(f"{good}.idx")
    data = bytearray(idx.read_bytes())
    data[8:12] = (99).to_bytes(4, "little")
    idx.write_bytes(bytes(data))
    with pytest.raises(DataError, match="version 99"):
        IndexedDataset(good)


def test_truncated_bin(good):
    b = Path(f"{good}.bin")
    b.write_bytes(b.read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated") as e:
        IndexedDataset(good)
    assert str(b) in one_line(e)


@pytest.mark.parametrize("keep", [HEADER_SIZE - 3, HEADER_SIZE + 6])
def test_truncated_idx(good, keep):
    idx = Path(f"{good}.idx")
    idx.write_bytes(idx.read_bytes()[:keep])
    with pytest.raises(DataError, match="truncated") as e:
        IndexedDataset(good)
    assert str(idx) in one_line(e)


# ----------------------------------------------------------------------------------------------
# readers and preprocessing


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t, "id": 1}) + "\n")
    return path


TEXTS = [f"document {i}: " + "lorem ipsum " * (i % 7) for i in range(300)] + ["", "   ", "the end"]


def test_preprocess_jsonl_eod_and_skip(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", TEXTS)
    stats = preprocess([src], tmp_path / "out" / "ds", CharTokenizer(), progress=False)
    ds = IndexedDataset(tmp_path / "out" / "ds")
    kept = [t for t in TEXTS if t.strip()]
    assert stats["documents"] == len(ds) == len(kept) and stats["skipped"] == 2
    assert stats["tokens"] == ds.num_tokens and stats["seconds"] >= 0
    for i, t in enumerate(kept):
        assert ds[i].tolist() == list(t.encode()) + [256]
    assert ds.dtype == np.uint16 and ds.vocab_size == 257
    preprocess([src], tmp_path / "noeod", CharTokenizer(), append_eod=False, progress=False)
    assert IndexedDataset(tmp_path / "noeod")[0].tolist() == list(kept[0].encode())


def test_workers_identical_bytes(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl.gz", TEXTS)
    preprocess([src], tmp_path / "w1", CharTokenizer(), workers=1, progress=False)
    preprocess([src, src], tmp_path / "w1x2", CharTokenizer(), workers=1, progress=False)
    preprocess([src, src], tmp_path / "w2x2", CharTokenizer(), workers=2, progress=False)
    for ext in (".bin", ".idx"):
        assert Path(f"{tmp_path}/w1x2{ext}").read_bytes() == Path(f"{tmp_path}/w2x2{ext}").read_bytes()
    assert len(IndexedDataset(tmp_path / "w2x2")) == 2 * len(IndexedDataset(tmp_path / "w1"))


def test_preprocess_text_paragraphs(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("first line\nsecond line\n\n\n  \nthird para\n\nlast\n")
    assert list(read_text(src)) == ["first line\nsecond line", "third para", "last"]
    stats = preprocess([src], tmp_path / "t", CharTokenizer(), progress=False)
    ds = IndexedDataset(tmp_path / "t")
    assert stats["documents"] == 3
    assert ds[1].tolist() == list(b"third para") + [256]


def test_invalid_json_names_line(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "ok"}\n\n{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(DataError) as e:
        preprocess([src], tmp_path / "ds", CharTokenizer(), progress=False)
    assert f"{src}:4" in one_line(e) and "invalid JSON" in str(e.value)
    assert not list(tmp_path.glob("ds*"))  # nothing half-written


def test_missing_key_and_file(tmp_path):
    src = write_jsonl(tmp_path / "k.jsonl", ["a", "b"], key="body")
    with pytest.raises(DataError, match=r"k\.jsonl:1: no key 'text'.*body"):
        preprocess([src], tmp_path / "ds", CharTokenizer(), progress=False)
    assert preprocess([src], tmp_path / "ds", CharTokenizer(), json_key="body", progress=False)["documents"] == 2
    with pytest.raises(DataError, match=r"nope\.jsonl: input file not found"):
        preprocess([tmp_path / "nope.jsonl"], tmp_path / "x", CharTokenizer(), progress=False)
    with pytest.raises(DataError, match="cannot tell the input format"):
        preprocess([src.rename(tmp_path / "k.weird")], tmp_path / "x", CharTokenizer(), progress=False)


# ----------------------------------------------------------------------------------------------
# shipped-corpus cache


@pytest.fixture
def corpora(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "corpora"
    folder.mkdir()
    write_jsonl(folder / "tiny.jsonl.gz", TEXTS[:50])
    monkeypatch.setattr(corpus_mod, "corpora_dir", lambda: folder)
    return folder


def test_corpus_prefix_builds_once(tmp_path, corpora):
    cache = tmp_path / "cache"
    prefix = corpus_prefix("tiny", CharTokenizer(), "char", cache_dir=cache)
    assert prefix == str(cache / "tiny-char" / "tiny")
    ds = IndexedDataset(prefix)
    assert len(ds) == 50 and ds[0].tolist()[-1] == 256
    mtime = Path(f"{prefix}.bin").stat().st_mtime_ns
    assert corpus_prefix("tiny", CharTokenizer(), "char", cache_dir=cache) == prefix
    assert Path(f"{prefix}.bin").stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp folders or locks left


def test_corpus_prefix_race_and_missing(tmp_path, corpora):
    cache = tmp_path / "cache"
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(corpus_prefix("tiny", CharTokenizer(), "c", cache)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1 and len(IndexedDataset(results[0])) == 50
    with pytest.raises(DataError, match="no shipped corpus named 'nope'.*available: tiny"):
        corpus_prefix("nope", CharTokenizer(), "c", cache)
