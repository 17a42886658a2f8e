"""Sub-token alignment and overlapping windows: every word is labelled once, on its first
sub-token, in exactly one window, and predictions merge back to one label per word."""

from __future__ import annotations

import pytest

from toolkit.data.tasks import LabelSet, NerExample, PairExample
from toolkit.data.tasks.encoding import IGNORE, encode_ner, encode_pair, merge_word_predictions, window_starts
from toolkit.errors import DataError
from toolkit.tokenization import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("english-wordpiece")


def test_window_starts():
    assert window_starts(3, 4, 1) == [0]
    assert window_starts(10, 4, 2) == [0, 2, 4, 6]
    assert window_starts(9, 4, 1) == [0, 3, 5]


def test_first_subtoken_carries_the_label(tok):
    words = ["Hereditary", "nonpolyposis", "cancer", "."]
    ex = NerExample(words, ["B-Disease", "I-Disease", "I-Disease", "O"], "x:1")
    labels = LabelSet.for_ner([ex])
    (w,) = encode_ner([ex], tok, labels, max_length=64, stride=8)
    pieces = [tok.encode(x) for x in words]
    assert w.input_ids == [tok.cls_id, *[i for p in pieces for i in p], tok.sep_id]
    expected = [IGNORE]
    for p, tag in zip(pieces, ex.tags):
        expected += [labels.id_of[tag]] + [IGNORE] * (len(p) - 1)
    assert w.labels == expected + [IGNORE]
    assert sum(x != IGNORE for x in w.labels) == 4 and any(len(p) > 1 for p in pieces)


def test_long_document_windows_label_every_word_once(tok):
    words = [f"word{i}" if i % 7 else "the" for i in range(120)]
    tags = ["B-X" if i % 11 == 3 else "O" for i in range(120)]
    ex = NerExample(words, tags, "doc:1")
    labels = LabelSet.for_ner([ex])
    windows = encode_ner([ex], tok, labels, max_length=32, stride=8)
    assert len(windows) > 3 and all(len(w.input_ids) <= 32 for w in windows)
    owned = sorted(w.word_index[p] for w in windows for p in range(len(w.owned)) if w.owned[p])
    assert owned == list(range(120))  # each word owned by exactly one window
    assert sum(x != IGNORE for w in windows for x in w.labels) == 120
    # predicting the gold labels everywhere merges back to the gold tags
    merged = merge_word_predictions(windows, [[max(x, 0) for x in w.labels] for w in windows], [120])
    assert [labels.labels[i] for i in merged[0]] == tags


def test_gold_entity_crossing_every_window_is_an_error(tok):
    words = ["a"] * 10 + ["long"] * 12 + ["b"] * 10
    tags = ["O"] * 10 + ["B-X"] + ["I-X"] * 11 + ["O"] * 10
    ex = NerExample(words, tags, "notes.jsonl:7")
    with pytest.raises(DataError, match=r"notes.jsonl:7: entity 'X' .* crosses every window boundary"):
        encode_ner([ex], tok, LabelSet.for_ner([ex]), max_length=10, stride=2)


def test_pair_encoding_truncates_the_longer_text(tok):
    ids, types = encode_pair(PairExample("one two three four five six", "seven", "x", "f:1"), tok, max_length=8)
    a, b = tok.encode("one two three four five six"), tok.encode("seven")
    assert len(ids) == 8 and ids == [tok.cls_id, *a[:4], tok.sep_id, *b, tok.sep_id]
    assert types == [0] * 6 + [1] * 2
    single, types1 = encode_pair(PairExample("one two", None, "x", "f:1"), tok, max_length=8)
    assert single == [tok.cls_id, *tok.encode("one two"), tok.sep_id] and set(types1) == {0}
