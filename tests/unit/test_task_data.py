"""Fine-tuning data readers: every format to the same words + IOB2 tags, hand-checked; bad input is
one line naming the file and line; the shipped NCBI disease corpus reads completely."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from toolkit.data.tasks import (
    LabelSet,
    detect_format,
    detect_scheme,
    read_examples,
    resolve_task_file,
    spans,
    split_words,
    to_iob2,
)
from toolkit.errors import DataError

CONLL = """-DOCSTART-\tO

Familial\tB-Disease
breast\tI-Disease
cancer\tI-Disease
in\tO
BRCA1\tB-Gene
carriers\tO

No\tO
ataxia\tB-Disease
.\tO
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_conll_reads_sentences_and_tags(tmp_path):
    path = write(tmp_path / "train.conll", CONLL)
    assert detect_format(path) == "conll"
    ex = read_examples(path)
    assert [e.words for e in ex] == [["Familial", "breast", "cancer", "in", "BRCA1", "carriers"], ["No", "ataxia", "."]]
    assert ex[0].tags == ["B-Disease", "I-Disease", "I-Disease", "O", "B-Gene", "O"]
    assert ex[0].where == f"{path}:3" and ex[1].where == f"{path}:10"
    assert spans(ex[0].tags) == [("Disease", 0, 3), ("Gene", 4, 5)]
    labels = LabelSet.for_ner(ex)
    assert labels.labels == ("O", "B-Disease", "I-Disease", "B-Gene", "I-Gene") and labels.entity_types == ["Disease", "Gene"]


def test_gzip_and_multi_column_conll(tmp_path):
    path = tmp_path / "x.tsv.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("aspirin\tNN\tB-Drug\ndaily\tRB\tO\n")
    assert detect_format(path) == "conll"
    (e,) = read_examples(path)
    assert e.words == ["aspirin", "daily"] and e.tags == ["B-Drug", "O"]


@pytest.mark.parametrize("scheme,tags", [
    ("iob1", ["I-D", "I-D", "O", "I-D", "B-D", "I-G"]),  # IOB1: B- only between two adjacent same-type entities
    ("bioes", ["B-D", "E-D", "O", "S-D", "S-D", "S-G"]),
    ("iob2", ["B-D", "I-D", "O", "B-D", "B-D", "B-G"]),
])
def test_tag_schemes_convert_to_iob2(scheme, tags):
    assert detect_scheme([tags]) == scheme
    assert to_iob2(tags, scheme) == ["B-D", "I-D", "O", "B-D", "B-D", "B-G"]


def test_iob2_reads_a_stray_inside_tag_as_a_start():
    assert spans(["O", "I-D", "I-D", "B-G", "I-D"]) == [("D", 1, 3), ("G", 3, 4), ("D", 4, 5)]


def test_jsonl_tokens(tmp_path):
    path = write(tmp_path / "t.jsonl", json.dumps({"tokens": ["a", "b"], "tags": ["B-X", "I-X"]}) + "\n")
    assert detect_format(path) == "jsonl_tokens"
    assert read_examples(path)[0].tags == ["B-X", "I-X"]
    hf = write(tmp_path / "hf.jsonl", json.dumps({"tokens": ["a"], "ner_tags": ["B-Y"]}) + "\n")
    assert detect_format(hf) == "jsonl_tokens" and read_examples(hf)[0].tags == ["B-Y"]


def test_character_offset_entities_become_words(tmp_path):
    text = "Pt on metformin500mg; hx of type 2 diabetes."
    ents = [{"start": 6, "end": 15, "label": "Drug"}, {"start": 28, "end": 43, "label": "Problem"}]
    path = write(tmp_path / "notes.jsonl", json.dumps({"text": text, "entities": ents}) + "\n")
    assert detect_format(path) == "jsonl_entities"
    (e,) = read_examples(path)
    # "metformin500mg" is cut at the entity's end (offset 15): metformin | 500mg
    assert e.words == ["Pt", "on", "metformin", "500mg", ";", "hx", "of", "type", "2", "diabetes", "."]
    assert e.tags == ["O", "O", "B-Drug", "O", "O", "O", "O", "B-Problem", "I-Problem", "I-Problem", "O"]
    assert [text[s:t] for s, t in e.offsets] == e.words and e.text == text


def test_split_words_offsets():
    assert split_words("a-b  cd") == [(0, 1), (1, 2), (2, 3), (5, 7)]
    assert split_words("abcd", {2}) == [(0, 2), (2, 4)]


def test_brat_folder(tmp_path):
    write(tmp_path / "n1.txt", "Denies chest pain. Takes lisinopril.")
    write(tmp_path / "n1.ann", "T1\tProblem 7 17\tchest pain\nT2\tDrug 25 35\tlisinopril\n#1\tAnnotatorNotes T1\tnote\n")
    assert detect_format(tmp_path) == "brat"
    (e,) = read_examples(tmp_path)
    assert [(lab, " ".join(e.words[s:t])) for lab, s, t in spans(e.tags)] == [("Problem", "chest pain"),
                                                                              ("Drug", "lisinopril")]


def test_tables(tmp_path):
    csv = write(tmp_path / "nli.csv", 'text_a,text_b,label\n"On insulin.",Has diabetes.,entailment\nA,B,neutral\n')
    assert detect_format(csv) == "table"
    ex = read_examples(csv)
    assert (ex[0].text_a, ex[0].text_b, ex[0].label, ex[0].where) == ("On insulin.", "Has diabetes.", "entailment",
                                                                      f"{csv}:2")
    tsv = write(tmp_path / "sts.tsv", "text_a\ttext_b\tscore\nx\ty\t3.5\n")
    assert detect_format(tsv) == "table"
    assert read_examples(tsv, regression=True)[0].label == 3.5
    glue = write(tmp_path / "glue.jsonl", json.dumps({"sentence1": "a", "sentence2": "b", "label": "x"}) + "\n")
    assert detect_format(glue) == "table" and (read_examples(glue)[0].text_a, read_examples(glue)[0].text_b) == ("a", "b")
    jl = write(tmp_path / "cls.jsonl", json.dumps({"text": "note", "label": "discharge"}) + "\n")
    assert read_examples(jl)[0].text_b is None and LabelSet.for_classes(read_examples(jl)).labels == ("discharge",)


@pytest.mark.parametrize("name,content,needle", [
    ("bad.conll", "word\tB-X\nlonely\n", "bad.conll:2: expected 'token<TAB>tag'"),
    ("bad2.conll", "word\tX-Y\n", "bad2.conll:1: tag 'X-Y' is not O or PREFIX-LABEL"),
    ("e.jsonl", json.dumps({"text": "abc", "entities": [{"start": 1, "end": 9, "label": "X"}]}) + "\n",
     "e.jsonl:1: entity 'X' [1, 9) lies outside the text (length 3)"),
    ("c.csv", "sentence,label\nx,y\n", "c.csv:2: no 'text' or 'text_a' column"),
    ("s.tsv", "text\tscore\nx\thigh\n", "s.tsv:2: score 'high' is not a number"),
    ("empty.conll", "\n\n", "empty.conll is empty"),
])
def test_bad_input_is_one_line_naming_file_and_line(tmp_path, name, content, needle):
    path = write(tmp_path / name, content)
    with pytest.raises(DataError) as e:
        read_examples(path, regression=name.startswith("s."))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_brat_offsets_outside_the_text(tmp_path):
    write(tmp_path / "n.txt", "short")
    write(tmp_path / "n.ann", "T1\tDrug 2 40\tx\n")
    with pytest.raises(DataError, match=r"n.ann:1: entity 'Drug' \[2, 40\) lies outside the text"):
        read_examples(tmp_path)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin.conll"
    path.write_bytes("caf\xe9\tO\n".encode("latin-1"))
    with pytest.raises(DataError, match="latin.conll:1: not UTF-8"):
        read_examples(path)


def test_predict_input_not_utf8_names_file_and_line(tmp_path):
    from toolkit.training.predict import read_documents

    (tmp_path / "a.txt").write_bytes("first line\nsecond caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"a.txt:2: not UTF-8 text"):
        read_documents(tmp_path)
    (tmp_path / "a.txt").write_text("ok")
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n\n{"note": 1}\n')
    assert read_documents(tmp_path / "a.txt") == [("a", "ok")]
    with pytest.raises(DataError, match=r"b.jsonl:3: each line needs a string 'text'"):
        read_documents(tmp_path / "b.jsonl")


def test_unseen_label_names_file_line_and_label(tmp_path):
    labels = LabelSet.for_ner(read_examples(write(tmp_path / "train.conll", "a\tB-Disease\n")))
    valid = read_examples(write(tmp_path / "valid.conll", "x\tO\n\nb\tB-Drug\n"))
    with pytest.raises(DataError, match=r"valid.conll:3: tag 'B-Drug' does not occur in the training data"):
        labels.check_ner(valid)


def test_shipped_ncbi_disease():
    """Counts from the corpus README (5,432 training sentences) and the files themselves."""
    train = read_examples(resolve_task_file("ncbi-disease:train"))
    valid = read_examples(resolve_task_file("ncbi-disease:valid"))
    test = read_examples(resolve_task_file("ncbi-disease:test"))
    assert (len(train), len(valid), len(test)) == (5432, 923, 940)
    assert LabelSet.for_ner(train).labels == ("O", "B-Disease", "I-Disease")
    assert [sum(len(spans(e.tags)) for e in split) for split in (train, valid, test)] == [5145, 787, 960]
    with pytest.raises(DataError, match="has splits train, valid, test"):
        resolve_task_file("ncbi-disease:dev")


def _patients(rows) -> set[str]:
    """Patient ids (``POP-000123``) named in the rows' clinosim ``source`` fields."""
    import re

    return {m for r in rows for m in re.findall(r"POP-\d+", r["source"])}


def _rows(name: str, split: str) -> list[dict]:
    with gzip.open(resolve_task_file(f"{name}:{split}"), "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_shipped_clinical_tasks():
    """The four synthetic clinical tasks (docs/finetuning.md): sizes, labels, formats as the readers
    see them, and splits by patient (no patient in two splits)."""
    ner = {s: read_examples(resolve_task_file(f"clinical-ner:{s}")) for s in ("train", "valid", "test")}
    assert [len(ner[s]) for s in ("train", "valid", "test")] == [1000, 120, 240]
    assert LabelSet.for_ner(ner["train"]).labels == ("O", "B-DRUG", "I-DRUG", "B-PROBLEM", "I-PROBLEM")
    assert sum(len(spans(e.tags)) for e in ner["test"]) == 2728
    assert max(len(e.text) for e in ner["train"]) > 2000  # whole notes: longer than one 128-token window
    note_type = read_examples(resolve_task_file("clinical-note-type:train"))
    assert len(LabelSet.for_classes(note_type)) == 9
    for s in ("valid", "test"):
        assert {e.label for e in read_examples(resolve_task_file(f"clinical-note-type:{s}"))} <= {e.label for e in note_type}
    nli = read_examples(resolve_task_file("clinical-nli:train"))
    assert LabelSet.for_classes(nli).labels == ("contradiction", "entailment", "neutral")
    assert all(e.text_b for e in nli)
    sts = read_examples(resolve_task_file("clinical-sts:test"), regression=True)
    scores = [e.label for e in sts]
    assert len(sts) == 600 and min(scores) == 0 and max(scores) == 5 and len(set(scores)) > 20
    from toolkit.data.tasks.sft import read_sft

    sft = read_sft(resolve_task_file("clinical-sft:train"))
    assert len(sft) == 3000 and 1000 < sum(e.prompt is not None for e in sft) < 2000  # prompt/completion and chat
    for name in ("clinical-ner", "clinical-note-type", "clinical-nli", "clinical-sts", "clinical-sft"):
        train, valid, test = (_patients(_rows(name, s)) for s in ("train", "valid", "test"))
        assert train and valid and test and not (train & valid or train & test or valid & test), name
