"""Columnar preprocess inputs: Parquet files and Hugging Face ``datasets`` ``save_to_disk`` folders,
read batch by batch with pyarrow. The datasets folders are built by hand in the layout ``datasets``
writes (Arrow IPC stream files, ``state.json``, ``dataset_info.json``, ``dataset_dict.json``), so the
tests need no ``datasets`` package."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_cli
from toolkit.data.readers import READERS, detect_format, iter_documents, read_hf_dataset, read_parquet
from toolkit.errors import DataError

TEXTS = ["first document", None, "naïve café — 日本語テキスト ✓", "", "fourth\nwith a newline", "5", "six", "seven"]
EXPECTED = [t for t in TEXTS if t is not None]  # nulls skipped, empty strings kept (preprocess skips them)


def one_line(err: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def write_parquet(path: Path, texts=TEXTS, row_group_size: int = 3, **columns) -> Path:
    table = pa.table({"id": list(range(len(texts))), "text": pa.array(texts, pa.string()), **columns})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_stream(path: Path, texts, text_type=None, file_format: bool = False) -> None:
    """One Arrow IPC stream file as datasets' ArrowWriter writes it (schema with 'huggingface' metadata)."""
    features = {"id": {"dtype": "int64", "_type": "Value"}, "text": {"dtype": "string", "_type": "Value"}}
    schema = pa.schema([("id", pa.int64()), ("text", text_type or pa.string())],
                       metadata={"huggingface": json.dumps({"info": {"features": features}})})
    table = pa.table({"id": list(range(len(texts))), "text": pa.array(texts, text_type or pa.string())}, schema=schema)
    with pa.OSFile(str(path), "wb") as sink:
        writer = (pa.ipc.new_file if file_format else pa.ipc.new_stream)(sink, schema)
        writer.write_table(table, max_chunksize=2)  # several record batches per file
        writer.close()


def write_dataset(folder: Path, shards: list[list], **kw) -> Path:
    """A ``Dataset.save_to_disk`` folder with one Arrow file per shard."""
    folder.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))]
    for name, texts in zip(names, shards):
        write_stream(folder / name, texts, **kw)
    (folder / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": n} for n in names], "_fingerprint": "0123456789abcdef",
        "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
        "_split": None}, indent=2))
    (folder / "dataset_info.json").write_text(json.dumps({
        "citation": "", "description": "", "homepage": "", "license": "",
        "features": {"id": {"dtype": "int64", "_type": "Value"}, "text": {"dtype": "string", "_type": "Value"}}}))
    return folder


def write_dataset_dict(folder: Path, splits: dict[str, list]) -> Path:
    for split, texts in splits.items():
        write_dataset(folder / split, [texts])
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    return folder


# ----------------------------------------------------------------------------------------------
# Parquet


@pytest.mark.parametrize("batch_size", [1, 2, 3, 1000])
def test_parquet_texts_in_order(tmp_path, batch_size):
    path = write_parquet(tmp_path / "corpus.parquet")
    assert pq.ParquetFile(path).num_row_groups == 3
    assert list(read_parquet(path, "text", batch_size=batch_size)) == EXPECTED


def test_parquet_through_iter_documents(tmp_path):
    path = write_parquet(tmp_path / "Corpus.PARQUET")
    assert detect_format(path) == "parquet" and READERS["parquet"] is read_parquet
    assert list(iter_documents([path])) == EXPECTED
    assert list(iter_documents([path, path], fmt="parquet")) == EXPECTED * 2
    body = write_parquet(tmp_path / "body.parquet", body=pa.array(["b1", "b2"] + [None] * 6, pa.large_string()))
    assert list(iter_documents([body], json_key="body")) == ["b1", "b2"]


def test_parquet_never_reads_the_whole_table(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "corpus.parquet")

    def whole_table(*a, **k):
        raise AssertionError("read the whole table")

    monkeypatch.setattr(pq.ParquetFile, "read", whole_table)
    monkeypatch.setattr(pq, "read_table", whole_table)
    assert list(read_parquet(path, "text", batch_size=2)) == EXPECTED


def test_parquet_errors(tmp_path):
    path = write_parquet(tmp_path / "corpus.parquet")
    with pytest.raises(DataError) as e:
        list(iter_documents([path], json_key="body"))
    assert "no column 'body' (columns: id, text)" in one_line(e, path) and "--json-key" in str(e.value)
    with pytest.raises(DataError) as e:
        list(iter_documents([path], json_key="id"))
    assert "column 'id' holds int64, not strings" in one_line(e, path)

    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"not a parquet file\n" * 20)
    with pytest.raises(DataError) as e:
        list(iter_documents([corrupt]))
    assert "cannot read Parquet" in one_line(e, corrupt)

    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError) as e:
        list(iter_documents([truncated]))
    one_line(e, truncated)

    damaged = tmp_path / "damaged.parquet"  # footer intact, pages overwritten: fails mid-read
    data = bytearray(path.read_bytes())
    data[4:200] = b"\xff" * 196
    damaged.write_bytes(bytes(data))
    with pytest.raises(DataError) as e:
        list(iter_documents([damaged]))
    one_line(e, damaged)


# ----------------------------------------------------------------------------------------------
# Hugging Face datasets folders


def test_dataset_folder_two_files(tmp_path):
    folder = write_dataset(tmp_path / "ds", [TEXTS[:5], TEXTS[5:]])
    assert detect_format(folder) == "hf_datasets" and READERS["hf_datasets"] is read_hf_dataset
    assert list(iter_documents([folder])) == EXPECTED
    assert list(iter_documents([str(folder)], fmt="hf_datasets")) == EXPECTED
    assert list(read_hf_dataset(folder, "text", batch_size=1)) == EXPECTED
    # files are read in the order state.json lists them
    state = json.loads((folder / "state.json").read_text())
    state["_data_files"].reverse()
    (folder / "state.json").write_text(json.dumps(state))
    assert list(iter_documents([folder])) == [t for t in TEXTS[5:] + TEXTS[:5] if t is not None]


@pytest.mark.parametrize("variant", ["large_string", "ipc_file_format"])
def test_dataset_folder_variants(tmp_path, variant):
    kw = {"text_type": pa.large_string()} if variant == "large_string" else {"file_format": True}
    folder = write_dataset(tmp_path / "ds", [TEXTS], **kw)
    assert list(iter_documents([folder])) == EXPECTED


def test_dataset_dict_reads_train_or_named_split(tmp_path):
    folder = write_dataset_dict(tmp_path / "dd", {"train": ["t1", None, "t2"], "test": ["x1"]})
    assert detect_format(folder) == "hf_datasets"
    assert list(iter_documents([folder])) == ["t1", "t2"]
    assert list(iter_documents([folder / "test"])) == ["x1"]  # one split's folder is a Dataset folder
    assert list(iter_documents([write_dataset_dict(tmp_path / "one", {"validation": ["v"]})])) == ["v"]

    no_train = write_dataset_dict(tmp_path / "nt", {"validation": ["v"], "test": ["x"]})
    with pytest.raises(DataError) as e:
        list(iter_documents([no_train]))
    assert "splits validation, test and no 'train'" in one_line(e, no_train)
    assert f"--input {no_train / 'validation'}" in str(e.value)


def test_dataset_folder_errors(tmp_path):
    folder = write_dataset(tmp_path / "ds", [TEXTS[:4], TEXTS[4:]])
    with pytest.raises(DataError) as e:
        list(iter_documents([folder], json_key="body"))
    assert "no column 'body' (columns: id, text); pass --json-key" in one_line(e, folder)
    with pytest.raises(DataError) as e:
        list(iter_documents([folder], json_key="id"))
    assert "column 'id' holds int64, not strings" in one_line(e, folder)

    shard = folder / "data-00001-of-00002.arrow"
    shard.write_bytes(shard.read_bytes()[:300])  # truncated: the first file's documents come first
    docs = iter_documents([folder])
    assert [next(docs) for _ in range(3)] == EXPECTED[:3]
    with pytest.raises(DataError) as e:
        list(docs)
    assert "cannot read Arrow data" in one_line(e, shard)
    shard.write_bytes(b"")
    with pytest.raises(DataError) as e:
        list(iter_documents([folder]))
    one_line(e, shard)
    shard.unlink()
    with pytest.raises(DataError) as e:
        list(iter_documents([folder]))
    assert "not found" in one_line(e, shard)

    (folder / "state.json").write_text("{")
    with pytest.raises(DataError) as e:
        list(iter_documents([folder]))
    one_line(e, folder / "state.json")


def test_folder_that_is_not_a_dataset(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as e:
        list(iter_documents([empty]))
    assert "not a Hugging Face datasets folder" in one_line(e, empty)
    with pytest.raises(DataError) as e:
        list(iter_documents([empty], fmt="hf_datasets"))
    assert "no state.json or dataset_dict.json" in one_line(e, empty)
    with pytest.raises(DataError) as e:
        list(iter_documents([empty], fmt="jsonl"))
    assert "a folder, but --format jsonl reads files" in one_line(e, empty)
    (empty / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    with pytest.raises(DataError) as e:
        list(iter_documents([empty]))
    assert "has no state.json" in one_line(e, empty / "train")
    with pytest.raises(DataError) as e:
        list(iter_documents([tmp_path / "missing"]))
    assert "input file not found" in one_line(e, tmp_path / "missing")


# ----------------------------------------------------------------------------------------------
# megaforge preprocess


def test_preprocess_cli_parquet_and_dataset_folder(tmp_path):
    from toolkit.data import IndexedDataset

    parquet = write_parquet(tmp_path / "corpus.parquet")
    folder = write_dataset_dict(tmp_path / "dd", {"train": ["one more document", None, "and another"], "test": ["x"]})
    out = run_cli("preprocess", "--input", str(parquet), str(folder), "--output-prefix", str(tmp_path / "out" / "ds"),
                  "--tokenizer", "english-bpe", "--json-key", "text", timeout=300)
    assert out.returncode == 0, out.stderr
    # 7 non-null parquet texts, one of them empty (skipped), + 2 train documents
    assert len(IndexedDataset(tmp_path / "out" / "ds")) == 6 + 2
    bad = run_cli("preprocess", "--input", str(parquet), "--output-prefix", str(tmp_path / "bad"),
                  "--json-key", "body", timeout=300)
    assert bad.returncode == 2 and "no column 'body'" in bad.stderr and "Traceback" not in bad.stderr
