"""Megatron-LM indexed datasets (MMIDIDX, version 1): files built byte by byte from the documented
layout are read as documents; megaforge writes the same bytes; bad files are one line; training on
a Megatron copy of a corpus gives the losses of the native copy; Megatron-style blend strings."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli, step_losses
from toolkit.config import load_config
from toolkit.data.indexed import IndexedDataset
from toolkit.data.megatron_indexed import (
    MegatronIndexedDataset,
    MegatronIndexedDatasetWriter,
    is_megatron_index,
    open_indexed,
)
from toolkit.errors import DataError

# three documents: one sequence; two sentences (as --split-sentences writes for BERT); an empty one
DOCS = [[[5, 6, 7]], [[1, 2], [3, 4, 9]], []]
CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}


def megatron_bytes(docs: list[list[list[int]]], dtype) -> tuple[bytes, bytes]:
    """(.bin, .idx) of ``docs`` (documents of sequences) exactly as Megatron-LM's _IndexWriter lays them out."""
    dtype = np.dtype(dtype)
    seqs = [s for d in docs for s in d]
    data = b"".join(np.asarray(s, dtype=dtype).tobytes() for s in seqs)
    lengths = [len(s) for s in seqs]
    pointers = list(np.cumsum([0] + lengths[:-1]) * dtype.itemsize) if seqs else []
    doc_index = list(np.cumsum([0] + [len(d) for d in docs]))
    idx = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", CODES[dtype])
    idx += struct.pack("<Q", len(seqs)) + struct.pack("<Q", len(doc_index))
    idx += struct.pack(f"<{len(lengths)}i", *lengths) + struct.pack(f"<{len(pointers)}q", *map(int, pointers))
    idx += struct.pack(f"<{len(doc_index)}q", *map(int, doc_index))
    return data, idx


def read_like_megatron(prefix: Path) -> list[list[list[int]]]:
    """An independent reader written from the format description (as Megatron's _IndexReader reads):
    documents as lists of sequences."""
    idx = Path(f"{prefix}.idx").read_bytes()
    assert idx[:9] == b"MMIDIDX\x00\x00" and struct.unpack_from("<Q", idx, 9)[0] == 1
    dtype = {8: np.uint16, 4: np.int32}[idx[17]]
    n_seq, n_doc = struct.unpack_from("<QQ", idx, 18)
    lengths = struct.unpack_from(f"<{n_seq}i", idx, 34)
    pointers = struct.unpack_from(f"<{n_seq}q", idx, 34 + 4 * n_seq)
    doc_index = struct.unpack_from(f"<{n_doc}q", idx, 34 + 12 * n_seq)
    data = Path(f"{prefix}.bin").read_bytes()
    seqs = [np.frombuffer(data, dtype=dtype, count=n, offset=p).tolist() for n, p in zip(lengths, pointers)]
    return [seqs[doc_index[d]:doc_index[d + 1]] for d in range(n_doc - 1)]


def write_files(prefix: Path, data: bytes, idx: bytes) -> Path:
    Path(f"{prefix}.bin").write_bytes(data)
    Path(f"{prefix}.idx").write_bytes(idx)
    return prefix


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_reads_hand_built_files_as_documents(tmp_path, dtype):
    prefix = write_files(tmp_path / "m", *megatron_bytes(DOCS, dtype))
    assert is_megatron_index(prefix)
    ds = open_indexed(prefix)
    assert isinstance(ds, MegatronIndexedDataset) and ds.dtype == np.dtype(dtype)
    assert [list(ds[i]) for i in range(len(ds))] == [[5, 6, 7], [1, 2, 3, 4, 9], []]
    assert list(ds.sizes) == [3, 5, 0] and ds.num_tokens == 8 and ds.vocab_size is None
    assert list(ds.sequence_lengths) == [3, 2, 3] and list(ds.document_index) == [0, 1, 3, 3]
    assert list(ds.get(1, 1, 3)) == [2, 3, 4]
    import pickle

    again = pickle.loads(pickle.dumps(ds))  # DataLoader workers re-open by prefix
    assert list(again[1]) == [1, 2, 3, 4, 9]
    assert isinstance(open_indexed(f"{prefix}.idx"), MegatronIndexedDataset)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_writer_writes_megatrons_bytes(tmp_path, dtype):
    with MegatronIndexedDatasetWriter(tmp_path / "w", dtype) as w:
        w.add_document([5, 6, 7])
        w.add_document([1, 2, 3, 4, 9], sequence_lengths=[2, 3])
        w.add_document([])
    data, idx = megatron_bytes(DOCS, dtype)
    assert (tmp_path / "w.bin").read_bytes() == data
    assert (tmp_path / "w.idx").read_bytes() == idx
    assert read_like_megatron(tmp_path / "w") == DOCS
    # add_documents (what preprocess uses) gives one sequence per document
    with MegatronIndexedDatasetWriter(tmp_path / "b", dtype) as w:
        w.add_documents(np.array([5, 6, 7, 8]), [3, 1])
    assert list(open_indexed(tmp_path / "b").sizes) == [3, 1]
    assert list(open_indexed(tmp_path / "b").document_index) == [0, 1, 2]


def test_native_files_still_open_natively(tmp_path):
    from toolkit.data import IndexedDatasetWriter

    with IndexedDatasetWriter(tmp_path / "n", np.uint16) as w:
        w.add_document([1, 2])
    ds = open_indexed(tmp_path / "n")
    assert type(ds) is IndexedDataset and not is_megatron_index(tmp_path / "n")


def _corrupt(data: bytes, idx: bytes, what: str) -> tuple[bytes, bytes]:
    if what == "truncated idx":
        return data, idx[:-3]
    if what == "truncated bin":
        return data[:-2], idx
    if what == "float dtype":
        return data, idx[:17] + bytes([7]) + idx[18:]
    if what == "version":
        return data, idx[:9] + struct.pack("<Q", 2) + idx[17:]
    if what == "document index":
        return data, idx[:-8] + struct.pack("<q", 2)
    raise AssertionError(what)


@pytest.mark.parametrize("what,needle", [("truncated idx", "Megatron index truncated"),
                                         ("truncated bin", "does not match the Megatron index"),
                                         ("float dtype", "float32 values, not token ids"),
                                         ("version", "version 2 is not supported"),
                                         ("document index", "must run from 0 to 3 sequences")])
def test_damaged_files_are_one_line(tmp_path, what, needle):
    prefix = write_files(tmp_path / "m", *_corrupt(*megatron_bytes(DOCS, np.uint16), what))
    with pytest.raises(DataError, match=needle) as e:
        open_indexed(prefix)
    assert "\n" not in str(e.value) and "m.idx" in str(e.value) or "m.bin" in str(e.value)


def test_writer_refuses_dtypes_megatron_lacks(tmp_path):
    with pytest.raises(DataError, match="not uint32"):
        MegatronIndexedDatasetWriter(tmp_path / "x", np.uint32)


def test_megatron_blend_string():
    cfg = load_config("gpt-tiny", ["data.data_prefix=0.3 /data/a 0.7 /data/b"])
    assert cfg.data.data_prefix == ["0.3", "/data/a", "0.7", "/data/b"]
    assert load_config("gpt-tiny", ["data.data_prefix=/data/a"]).data.data_prefix == ["/data/a"]
    from toolkit.data import parse_data_prefix

    assert parse_data_prefix(cfg.data.data_prefix) == (["/data/a", "/data/b"], pytest.approx([0.3, 0.7]))


def test_preprocess_megatron_format_and_train_on_it_as_on_native(tmp_path):
    """`preprocess --output-format megatron` writes what Megatron reads; training on it (given as a
    Megatron-style blend string) takes the same samples, hence the same losses, as the native copy."""
    src = tmp_path / "corpus.jsonl"
    words = "the patient was seen today and is doing well with no new pain".split()
    rng = np.random.default_rng(0)
    src.write_text("".join(f'{{"text": "{" ".join(rng.choice(words, 40))}."}}\n' for _ in range(60)))
    for fmt in ("megaforge", "megatron"):
        out = run_cli("preprocess", "--input", str(src), "--output-prefix", str(tmp_path / fmt), "--tokenizer",
                      "english-bpe", "--output-format", fmt)
        assert out.returncode == 0 and f"({fmt} format)" in out.stdout, out.stderr[-2000:]
    assert is_megatron_index(tmp_path / "megatron") and not is_megatron_index(tmp_path / "megaforge")
    native, megatron = open_indexed(tmp_path / "megaforge"), open_indexed(tmp_path / "megatron")
    assert len(native) == len(megatron) == 60
    assert all(np.array_equal(native[i], megatron[i]) for i in range(60))
    tiny = ["model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", "model.seq_length=32",
            "trainer.max_steps=2", "trainer.micro_batch_size=2", "trainer.global_batch_size=2", "trainer.eval_interval=0",
            "trainer.num_threads=1", "logging.plot=false", "logging.progress_bar=false", "logging.wandb.enabled=false"]
    for fmt, prefix in (("megaforge", f"[{tmp_path / 'megaforge'}]"), ("megatron", f"1.0 {tmp_path / 'megatron'}")):
        out = run_cli("train", "gpt-tiny", *tiny, f"data.data_prefix={prefix}", f"trainer.run_dir={tmp_path / ('run-' + fmt)}")
        assert out.returncode == 0, out.stderr[-2000:]
    assert step_losses(tmp_path / "run-megatron") == step_losses(tmp_path / "run-megaforge")
