"""Property-based fuzzing of the data readers: preprocessing inputs (jsonl, text, MIMIC CSV, Parquet,
``datasets`` folders, gzip), fine-tuning task files (CoNLL, jsonl, BRAT, csv/tsv tables, SFT jsonl)
and indexed ``.bin``/``.idx`` pairs (megaforge's and Megatron-LM's), fed random bytes, truncations,
byte flips, wrong encodings and awkward CSV quoting. Every read either succeeds or raises a one-line
:class:`~toolkit.errors.MegaforgeError`; never another exception."""

from __future__ import annotations

import csv
import gzip
import io
import json
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.reliability.fuzzing import fuzz_settings, outcome
from toolkit.data import indexed, megatron_indexed
from toolkit.data.readers import READERS, iter_documents
from toolkit.data.tasks import read_examples
from toolkit.data.tasks.sft import read_sft
from toolkit.errors import MegaforgeError

FUZZ = fuzz_settings(60)




def read_all(reader, *args, **kwargs):
    return list(reader(*args, **kwargs))


# ---------------------------------------------------------------------------- byte mutations

CODECS = ["utf-16", "latin-1", "cp1252", "utf-32-be", "shift_jis"]
TRICKY = ["", "\n", "\r\n", "\r", "\t", ",", '"', "'", '""', '"a,b"', '"multi\nline"', "\x00", "\ufeff", "é", "日本",
          "\u2028", "\x85", "{", "}", "[", "]", ":", "\\", "-DOCSTART-", "B-X", "I-", "O", "T1", ";", "NaN", "1e999"]


def mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    """``valid`` itself, truncated, with a byte changed or inserted, re-encoded in another codec, or
    replaced by random bytes or by a soup of awkward fragments."""
    n = len(valid)
    text = valid.decode("utf-8", errors="replace")

    def reencode(codec: str) -> bytes:
        return text.encode(codec, errors="replace")

    return st.one_of(
        st.just(valid),
        st.integers(0, max(n - 1, 0)).map(lambda k: valid[:k]),
        st.tuples(st.integers(0, max(n - 1, 0)), st.integers(0, 255)).map(
            lambda kb: valid[:kb[0]] + bytes([kb[1]]) + valid[kb[0] + 1:]),
        st.tuples(st.integers(0, n), st.sampled_from(TRICKY)).map(
            lambda kt: valid[:kt[0]] + kt[1].encode("utf-8") + valid[kt[0]:]),
        st.sampled_from(CODECS).map(reencode),
        st.binary(max_size=120),
        st.lists(st.sampled_from(TRICKY), max_size=25).map(lambda xs: "".join(xs).encode("utf-8")),
    )


def maybe_gzip(data: st.SearchStrategy[bytes]) -> st.SearchStrategy[tuple[bytes, bool]]:
    """(bytes, gzipped?): the data as is, gzipped, or gzipped then truncated or damaged."""
    def damage(args):
        raw, mode, k = args
        packed = gzip.compress(raw, mtime=0)
        if mode == "truncate":
            return packed[: k % (len(packed) + 1)], True
        if mode == "flip":
            i = 10 + k % max(len(packed) - 10, 1)  # past the header: the deflate stream or the CRC trailer
            return packed[:i] + bytes([packed[i] ^ 0xFF]) + packed[i + 1:] if i < len(packed) else packed, True
        return packed, True

    return st.one_of(
        data.map(lambda raw: (raw, False)),
        st.tuples(data, st.sampled_from(["whole", "truncate", "flip"]), st.integers(0, 10 ** 6)).map(damage),
    )


def write(folder, name: str, data: bytes):
    path = folder / name
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------- preprocessing readers

JSONL = b'{"text": "one doc"}\n\n{"text": "caf\xc3\xa9", "id": 2}\n{"text": null}\n'
TEXT = b"para one\nline two\n\n\npara two\n"
NOTES = (b'ROW_ID,SUBJECT_ID,CATEGORY,ISERROR,TEXT\n1,2,Discharge summary,,"Admission, day 1:\n""quoted"" text"\n'
         b"2,3,Radiology,1,erroneous\n")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
json_records = st.one_of(
    json_values,
    st.dictionaries(st.sampled_from(["text", "TEXT", "id", "tokens", "tags", "ner_tags", "entities", "label", "score",
                                     "text_a", "text_b", "sentence1", "prompt", "completion", "messages"])
                    | st.text(max_size=6), json_values, max_size=4),
)


def jsonl_bytes(records) -> bytes:
    return "\n".join(json.dumps(r) for r in records).encode("utf-8")  # NaN/Infinity as Python writes them


@FUZZ
@given(fmt=st.sampled_from(["jsonl", "text", "mimic3", "mimic4"]), valid=st.sampled_from([JSONL, TEXT, NOTES]),
       data=st.data())
def test_preprocess_readers_on_damaged_files(tmp_path_factory, fmt, valid, data):
    raw, zipped = data.draw(maybe_gzip(mutations(valid)))
    name = {"jsonl": "in.jsonl", "text": "in.txt", "mimic3": "NOTEEVENTS.csv", "mimic4": "discharge.csv"}[fmt]
    path = write(tmp_path_factory.mktemp("pre"), name + (".gz" if zipped else ""), raw)
    outcome(read_all, READERS[fmt], path, data.draw(st.sampled_from(["text", "TEXT", "\n", "é"])))
    outcome(read_all, iter_documents, [path])


@FUZZ
@given(records=st.lists(json_records, max_size=4), key=st.sampled_from(["text", "id", "k\ney"]))
@example(records=[{"a\nb": 1}], key="k\ney")  # line breaks in the missing and the listed keys
def test_jsonl_reader_on_random_records(tmp_path_factory, records, key):
    path = write(tmp_path_factory.mktemp("jsonl"), "in.jsonl", jsonl_bytes(records))
    outcome(read_all, READERS["jsonl"], path, key)


csv_field = st.one_of(st.sampled_from(TRICKY), st.text(max_size=8))
csv_header = st.lists(st.sampled_from(["TEXT", "text", "ISERROR", "CATEGORY", "label", "score", "text_a", "text_b",
                                       "sentence1", "", "x\ny", '"'] + TRICKY[:12]), min_size=1, max_size=5)


def csv_bytes(header, rows, delimiter: str, quoting: int | None) -> bytes:
    """Rows written by the csv module with ``quoting``, or (None) joined by hand with no quoting at all."""
    if quoting is None:
        return "\n".join(delimiter.join(r) for r in [header, *rows]).encode("utf-8", errors="replace")
    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter, quoting=quoting, escapechar="\\")
    try:
        writer.writerow(header)
        writer.writerows(rows)
    except csv.Error:  # QUOTE_NONE cannot write some rows: join them by hand instead
        return csv_bytes(header, rows, delimiter, None)
    return out.getvalue().encode("utf-8", errors="replace")


quoting = st.sampled_from([None, csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONE, csv.QUOTE_NONNUMERIC])


@FUZZ
@given(header=csv_header, rows=st.lists(st.lists(csv_field, max_size=6), max_size=4), quoting=quoting,
       cut=st.integers(0, 400), fmt=st.sampled_from(["mimic3", "mimic4"]))
@example(header=["multi\nline"], rows=[], quoting=csv.QUOTE_MINIMAL, cut=400, fmt="mimic3")  # quoted line break
def test_notes_csv_quoting(tmp_path_factory, header, rows, quoting, cut, fmt):
    raw = csv_bytes(header, rows, ",", quoting)
    path = write(tmp_path_factory.mktemp("csv"), "notes.csv", raw[: max(cut, len(raw) // 2)])
    outcome(read_all, READERS[fmt], path, "text")


def parquet_bytes() -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["a", None, "c"]}), sink, row_group_size=2)
    return sink.getvalue()


def arrow_stream_bytes() -> bytes:
    sink = io.BytesIO()
    table = pa.table({"text": ["a", "b", None]})
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=1)
    return sink.getvalue()


PARQUET, ARROW = parquet_bytes(), arrow_stream_bytes()
state_json = st.one_of(
    st.just({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}),
    json_values,
    st.builds(lambda files: {"_data_files": files}, json_values),
    st.builds(lambda name: {"_data_files": [{"filename": name}]}, st.sampled_from(["../x.arrow", "", ".", "nope"])),
)


@FUZZ
@given(raw=mutations(PARQUET), key=st.sampled_from(["text", "id", "missing"]))
def test_parquet_reader_on_damaged_files(tmp_path_factory, raw, key):
    path = write(tmp_path_factory.mktemp("pq"), "in.parquet", raw)
    outcome(read_all, READERS["parquet"], path, key)


@FUZZ
@given(arrow=mutations(ARROW), state=state_json, splits=st.one_of(st.none(), json_values),
       key=st.sampled_from(["text", "id"]))
def test_datasets_folder_on_damaged_files(tmp_path_factory, arrow, state, splits, key):
    folder = tmp_path_factory.mktemp("ds")
    root = folder
    if splits is not None:
        (folder / "dataset_dict.json").write_text(json.dumps({"splits": splits}))
        folder = folder / "train"
        folder.mkdir()
    (folder / "state.json").write_text(json.dumps(state))
    (folder / "dataset_info.json").write_text("{}")
    (folder / "data-00000-of-00001.arrow").write_bytes(arrow)
    outcome(read_all, READERS["hf_datasets"], root, key)
    outcome(read_all, iter_documents, [root])


def corrupt_deflate(raw: bytes) -> bytes:
    """``raw`` gzipped with its first deflate byte flipped: zlib.error, not BadGzipFile, on reading."""
    packed = gzip.compress(raw, mtime=0)
    return packed[:10] + bytes([packed[10] ^ 0xFF]) + packed[11:]


@pytest.mark.parametrize("name", ["in.txt.gz", "in.jsonl.gz", "discharge.csv.gz", "train.csv.gz", "train.conll.gz"])
def test_corrupt_deflate_stream(tmp_path, name):
    """A gzip file whose deflate data is damaged (zlib.error) once escaped every reader."""
    path = write(tmp_path, name, corrupt_deflate(TEXT * 3))
    if name.startswith("train"):
        err = outcome(read_examples, path, "table" if "csv" in name else "conll")
    else:
        err = outcome(read_all, iter_documents, [path], "auto" if "csv" not in name else "mimic4")
    assert isinstance(err, MegaforgeError)


# ---------------------------------------------------------------------------- fine-tuning task files

CONLL = b"-DOCSTART- O\n\nAspirin\tB-Drug\ncauses\tO\nulcers\tB-Disease\n\nI-X\tI-X\nfoo bar E-Y\n"
TOKENS = b'{"tokens": ["a", "b"], "tags": ["B-X", "I-X"]}\n{"tokens": ["c"], "ner_tags": ["O"]}\n'
ENTITIES = b'{"text": "aspirin causes ulcers", "entities": [{"start": 0, "end": 7, "label": "Drug"}]}\n'
TABLE_JSONL = b'{"text": "good", "label": "pos"}\n{"text_a": "a", "text_b": "b", "label": 1, "score": 0.5}\n'
TSV = b"text_a\ttext_b\tlabel\tscore\nx\ty\tentail\t1.5\nz\t\tneutral\t\n"
CSV = b'text,label,score\n"a, quoted ""one""",pos,0.1\nplain,neg,2\n'
TASK_FILES = [("train.conll", CONLL), ("train.tsv", TSV), ("train.txt", CONLL), ("train.jsonl", TOKENS),
              ("train.jsonl", ENTITIES), ("train.jsonl", TABLE_JSONL), ("train.csv", CSV), ("train.bio", CONLL),
              ("train.json", TABLE_JSONL)]
task_fmt = st.sampled_from([None, "conll", "jsonl_tokens", "jsonl_entities", "table", "brat", "nope"])


@FUZZ
@given(file=st.sampled_from(TASK_FILES), data=st.data(), fmt=task_fmt, regression=st.booleans())
def test_task_files_on_damaged_files(tmp_path_factory, file, data, fmt, regression):
    name, valid = file
    raw, zipped = data.draw(maybe_gzip(mutations(valid)))
    path = write(tmp_path_factory.mktemp("task"), name + (".gz" if zipped else ""), raw)
    outcome(read_examples, path, fmt, regression=regression)


offset = st.one_of(st.integers(-3, 30), st.floats(),
                   st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e300, 2.5, "2", "x", None, True, [1]]))
entity = st.one_of(
    st.fixed_dictionaries({"start": offset, "end": offset, "label": st.text(max_size=4)}),
    st.fixed_dictionaries({"start": json_values, "end": json_values, "label": json_values}),
    json_values,
)
task_record = st.one_of(
    st.fixed_dictionaries({"tokens": st.lists(json_values, max_size=3),
                           "tags": st.lists(st.sampled_from(["O", "B-X", "I-X", "E-X", "S-Y", "B-", "X", "I-Y"])
                                            | json_values, max_size=3)}),
    st.fixed_dictionaries({"text": st.text(max_size=30) | json_values, "entities": st.lists(entity, max_size=3)}),
    st.fixed_dictionaries({"text": json_values, "label": json_values}),
    st.fixed_dictionaries({"text_a": json_values, "text_b": json_values, "score": json_values}),
    json_records,
)


@FUZZ
@given(records=st.lists(task_record, max_size=4), fmt=task_fmt, regression=st.booleans())
def test_task_jsonl_on_random_records(tmp_path_factory, records, fmt, regression):
    path = write(tmp_path_factory.mktemp("taskjs"), "train.jsonl", jsonl_bytes(records))
    outcome(read_examples, path, fmt, regression=regression)


@FUZZ
@given(docs=st.lists(st.fixed_dictionaries({"text": st.sampled_from(["", "aspirin causes ulcers", "a-b c"]),
                                            "entities": st.lists(entity, max_size=3)}), min_size=1, max_size=3),
       fmt=st.sampled_from([None, "jsonl_entities"]))
@example(docs=[{"text": "abc", "entities": [{"start": float("inf"), "end": 1, "label": "X"}]}], fmt=None)
def test_task_entity_offsets(tmp_path_factory, docs, fmt):
    path = write(tmp_path_factory.mktemp("ents"), "train.jsonl", jsonl_bytes(docs))
    outcome(read_examples, path, fmt)


@FUZZ
@given(header=csv_header, rows=st.lists(st.lists(csv_field, max_size=6), max_size=4), quoting=quoting,
       ext=st.sampled_from(["csv", "tsv"]), regression=st.booleans())
@example(header=["x"], rows=[["a", "b"]], quoting=None, ext="csv", regression=False)  # TypeError: None key
def test_task_tables_quoting(tmp_path_factory, header, rows, quoting, ext, regression):
    raw = csv_bytes(header, rows, "," if ext == "csv" else "\t", quoting)
    path = write(tmp_path_factory.mktemp("table"), f"train.{ext}", raw)
    outcome(read_examples, path, "table", regression=regression)
    outcome(read_examples, path, None, regression=regression)


ANN = b"T1\tDrug 0 7\taspirin\nT2\tDisease 15 21;22 23\tulcers\n#1\tAnnotatorNotes T1\tnote\nR1\tCause Arg1:T1 Arg2:T2\n"
ann_line = st.one_of(
    st.builds(lambda i, label, a, b, frag: f"T{i}\t{label} {a} {b}{frag}\tx", st.integers(0, 9),
              st.sampled_from(["Drug", "", "a b", "X\tY"]), st.integers(-2, 40), st.integers(-2, 40),
              st.sampled_from(["", ";", ";5", ";30 31", " 9"])),
    st.sampled_from(["T", "T1", "T1\t", "T1\tDrug", "T1\tDrug x y", "E1\tx", "", "*\tOverlap T1 T2"]),
)


@FUZZ
@given(text=mutations(b"aspirin causes ulcers & pain"), ann=st.one_of(mutations(ANN),
       st.lists(ann_line, max_size=4).map(lambda xs: "\n".join(xs).encode())), with_txt=st.booleans())
def test_brat_folders(tmp_path_factory, text, ann, with_txt):
    folder = tmp_path_factory.mktemp("brat")
    write(folder, "doc.ann", ann)
    if with_txt:
        write(folder, "doc.txt", text)
    outcome(read_examples, folder, None)
    outcome(read_examples, folder, "brat")


message = st.one_of(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool"]) | json_values,
                                           "content": st.text(max_size=10) | json_values}), json_values)
sft_record = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(message, max_size=3) | json_values}),
    st.fixed_dictionaries({"prompt": st.text(max_size=8) | json_values, "completion": st.text(max_size=8) | json_values}),
    json_records,
)
SFT = b'{"prompt": "q", "completion": "a"}\n{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'


@FUZZ
@given(raw=st.one_of(mutations(SFT), st.lists(sft_record, max_size=4).map(jsonl_bytes)))
def test_sft_jsonl(tmp_path_factory, raw):
    outcome(read_sft, write(tmp_path_factory.mktemp("sft"), "train.jsonl", raw))


# ---------------------------------------------------------------------------- indexed datasets


def valid_pair(folder, megatron: bool) -> tuple[bytes, bytes]:
    writer_cls = megatron_indexed.MegatronIndexedDatasetWriter if megatron else indexed.IndexedDatasetWriter
    prefix = folder / ("valid-mt" if megatron else "valid-mf")
    with writer_cls(prefix, np.uint16, vocab_size=100) as w:
        for doc in ([1, 2, 3], [], [4, 5], [6]):
            w.add_document(doc)
    return indexed.index_file_path(prefix).read_bytes(), indexed.data_file_path(prefix).read_bytes()


def header(megatron: bool, fields) -> bytes:
    """A header with chosen (possibly inconsistent) fields, so the checks past the magic are reached."""
    version, code, a, b, c = fields
    if megatron:
        return struct.pack("<9sQBQQ", megatron_indexed.MAGIC, version, code, a, b)
    return struct.pack("<8sIB3xQQQ", indexed.MAGIC, version, code, a, b, c)


small = st.one_of(st.integers(0, 8), st.sampled_from([2 ** 32 - 1, 2 ** 63, 2 ** 64 - 1]))
header_fields = st.tuples(st.sampled_from([0, 1, 2, 2 ** 32 - 1]), st.integers(0, 12), small, small, small)


@FUZZ
@given(megatron=st.booleans(), data=st.data())
def test_indexed_datasets_on_damaged_files(tmp_path_factory, megatron, data):
    folder = tmp_path_factory.mktemp("idx")
    idx, bin_ = valid_pair(folder, megatron)
    idx = data.draw(st.one_of(
        mutations(idx),
        st.tuples(st.builds(header, st.just(megatron), header_fields), st.binary(max_size=96)).map(lambda t: t[0] + t[1]),
        st.tuples(st.integers(0, len(idx) - 1), st.integers(0, 255)).map(
            lambda kb: idx[:kb[0]] + bytes([kb[1]]) + idx[kb[0] + 1:]),
    ), label="idx")
    bin_ = data.draw(st.one_of(st.just(bin_), mutations(bin_)), label="bin")
    write(folder, "fuzz.idx", idx)
    write(folder, "fuzz.bin", bin_)

    def open_and_read(prefix):
        ds = megatron_indexed.open_indexed(prefix)
        return [ds[i].tolist() for i in range(min(len(ds), 8))]

    outcome(open_and_read, folder / "fuzz")
    outcome(open_and_read, folder / "fuzz.bin")


@FUZZ
@given(lengths=st.lists(st.integers(-3, 5), max_size=5), cuts=st.lists(st.integers(-1, 6), max_size=4),
       code=st.sampled_from([1, 3, 4, 5, 8]), pad=st.integers(-2, 2))
@example(lengths=[5, -3], cuts=[1], code=8, pad=0)  # pointers that agree with a negative length
def test_megatron_index_arrays(tmp_path_factory, lengths, cuts, code, pad):
    """Self-consistent Megatron headers over arbitrary arrays (negative lengths, unordered document
    index): opening fails in one line, or every document reads back as long as ``sizes`` says."""
    folder = tmp_path_factory.mktemp("mt")
    item = megatron_indexed.DTYPE_CODES[code].itemsize
    lens = np.asarray(lengths, dtype="<i4")
    pointers = (np.concatenate([[0], np.cumsum(lens, dtype=np.int64)])[:-1] * item).astype("<i8")
    doc_index = np.asarray([0, *cuts, len(lengths)], dtype="<i8")
    idx = (struct.pack("<9sQBQQ", megatron_indexed.MAGIC, 1, code, len(lengths), len(doc_index))
           + lens.tobytes() + pointers.tobytes() + doc_index.tobytes())
    write(folder, "m.idx", idx)
    write(folder, "m.bin", b"\x01" * max(0, int(lens.sum()) * item + pad))

    ds = outcome(megatron_indexed.open_indexed, folder / "m")
    if not isinstance(ds, MegaforgeError):
        assert all(0 <= int(n) == len(ds[i]) for i, n in enumerate(ds.sizes))
