"""Preprocessing paths (thread-parallel tokenizer, in-process, process pool): same bytes, bounded
memory, errors named; and the trainer's data-wait figure with and without loader workers."""

import copy
import importlib
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import cli_main
from tests.unit.test_data_indexed import TEXTS, CharTokenizer, write_jsonl
from toolkit.data.indexed import IndexedDataset, IndexedDatasetWriter
from toolkit.errors import DataError
from toolkit.tokenization import load_tokenizer

pp = importlib.import_module("toolkit.data.preprocess")  # toolkit.data.preprocess is also the function


@pytest.fixture(scope="module")
def bpe():
    return load_tokenizer("english-bpe")


def test_hf_threaded_pool_and_serial_paths_write_the_same_bytes(tmp_path, bpe, monkeypatch):
    assert bpe.threaded_batch
    src = write_jsonl(tmp_path / "in.jsonl", TEXTS + ["ünïcode — and\nnew lines", "x" * 5000])
    monkeypatch.setattr(pp, "THREADED_BATCH_DOCUMENTS", 7)  # many batches, a partial last one
    monkeypatch.setattr(pp, "BATCH_CHARS", 4000)  # and the character cap: the 5000-char document alone
    stats = pp.preprocess([src], tmp_path / "threaded", bpe, workers=2, progress=False)
    unthreaded = copy.copy(bpe)
    unthreaded.threaded_batch = False  # the pool's workers load the same tokenizer.json (bpe.path)
    pp.preprocess([src], tmp_path / "pool", unthreaded, workers=2, progress=False)
    pp.preprocess([src], tmp_path / "serial", unthreaded, workers=1, progress=False)
    for ext in (".bin", ".idx"):
        want = Path(f"{tmp_path}/threaded{ext}").read_bytes()
        assert Path(f"{tmp_path}/pool{ext}").read_bytes() == want
        assert Path(f"{tmp_path}/serial{ext}").read_bytes() == want
    ds = IndexedDataset(tmp_path / "threaded")
    kept = [t for t in TEXTS + ["ünïcode — and\nnew lines", "x" * 5000] if t.strip()]
    assert stats["documents"] == len(ds) == len(kept) and stats["skipped"] == 2
    for i in (0, 1, len(kept) - 2, len(kept) - 1):
        assert ds[i].tolist() == bpe.encode(kept[i]) + [bpe.eod_id]


def test_sentencepiece_takes_the_threaded_path_and_matches_encode(tmp_path, monkeypatch):
    spm = load_tokenizer("english-t5-spm")
    assert spm.threaded_batch
    monkeypatch.setattr(pp, "THREADED_BATCH_DOCUMENTS", 5)
    src = write_jsonl(tmp_path / "in.jsonl", TEXTS)
    pp.preprocess([src], tmp_path / "ds", spm, workers=2, progress=False)
    kept = [t for t in TEXTS if t.strip()]
    ds = IndexedDataset(tmp_path / "ds")
    assert [ds[i].tolist() for i in range(len(ds))] == [spm.encode(t) + [spm.eod_id] for t in kept]


@pytest.mark.parametrize("path", ["threaded", "serial", "pool"])
def test_in_flight_documents_are_bounded(tmp_path, bpe, monkeypatch, path):
    """Documents read ahead of the writer stay under the documented bound, however long the input."""
    n, produced, ahead = 3000, [0], []

    def documents(inputs, fmt, json_key):
        for i in range(n):
            produced[0] += 1
            yield f"document {i} " + "word " * (i % 5)

    class Recording(IndexedDatasetWriter):
        def add_documents(self, tokens, lengths):
            ahead.append(produced[0] - self.num_documents)
            super().add_documents(tokens, lengths)

    monkeypatch.setattr(pp, "iter_documents", documents)
    monkeypatch.setitem(pp.WRITERS, "megaforge", Recording)
    monkeypatch.setattr(pp, "THREADED_BATCH_DOCUMENTS", 16)
    tok, workers = (bpe, 1) if path == "threaded" else (CharTokenizer(), 1 if path == "serial" else 2)
    if path == "threaded":
        bound = (pp.THREAD_WINDOW + 1) * 16
    elif path == "serial":
        bound = pp.BATCH_DOCUMENTS + 1
    else:
        bound = (workers * pp.IN_FLIGHT_PER_WORKER + 1) * pp.BATCH_DOCUMENTS
    stats = pp.preprocess(["unused.jsonl"], tmp_path / "ds", tok, workers=workers, progress=False)
    assert stats["documents"] == produced[0] == n
    assert len(ahead) > 10 and 0 < max(ahead) <= bound, (max(ahead), bound)


def test_threaded_bad_json_names_the_line_and_stops_the_thread(tmp_path, bpe, monkeypatch):
    monkeypatch.setattr(pp, "THREADED_BATCH_DOCUMENTS", 8)
    src = write_jsonl(tmp_path / "bad.jsonl", TEXTS)
    with open(src, "a", encoding="utf-8") as f:
        f.write('{"text": broken\n')
    with pytest.raises(DataError) as e:
        pp.preprocess([src], tmp_path / "ds", bpe, progress=False)
    assert f"{src}:{len(TEXTS) + 1}: invalid JSON" in str(e.value)
    assert not list(tmp_path.glob("ds*"))  # nothing half-written
    assert not [t for t in threading.enumerate() if t.name.startswith("megaforge-tokenize")]


def test_cli_workers_sizes_the_tokenizer_threads(tmp_path, monkeypatch):
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    src = write_jsonl(tmp_path / "in.jsonl", TEXTS[:20])
    out = cli_main("preprocess", "--input", str(src), "--output-prefix", str(tmp_path / "ds"), "--workers", "3")
    assert out.returncode == 0, out.stderr
    assert os.environ["RAYON_NUM_THREADS"] == "3"
    assert len(IndexedDataset(tmp_path / "ds")) == 20


# A very small gpt-tiny: a few seconds on 2 cores.
SMALL = ["model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", "model.seq_length=32",
         "trainer.micro_batch_size=2", "trainer.global_batch_size=4", "trainer.eval_interval=0",
         "logging.wandb.enabled=false", "trainer.sample_prompt=null", "trainer.num_threads=1",
         "trainer.max_steps=4", "trainer.log_interval=2", "logging.plot=false"]


def test_data_wait_is_logged_and_loader_workers_give_the_same_batches(tmp_path):
    records = {}
    for workers in (0, 1):
        run = tmp_path / f"w{workers}"
        out = cli_main("train", "gpt-tiny", *SMALL, f"trainer.run_dir={run}", f"data.num_workers={workers}")
        assert out.returncode == 0, out.stderr[-3000:]
        records[workers] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for recs in records.values():
        assert [r["step"] for r in recs] == [2, 4]
        for r in recs:  # the two steps since the previous record
            assert 0 <= r["data_wait_s"] and 0 <= r["data_wait_frac"] <= 1
    assert np.allclose([r["loss"] for r in records[0]], [r["loss"] for r in records[1]], rtol=0, atol=0)
