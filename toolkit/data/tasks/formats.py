"""Readers of fine-tuning data, one per format, detected from the file (``task.format`` overrides).

Token classification (NER), every reader yielding :class:`NerExample` (words + IOB2 tags):

* ``conll`` — ``token<TAB>…<TAB>tag`` (or space separated) per line, a blank line between
  sentences, ``-DOCSTART-`` lines skipped; IOB1, IOB2 or BIOES tags (detected, converted to IOB2);
* ``jsonl_tokens`` — one ``{"tokens": [...], "tags": [...]}`` object per line (``ner_tags`` also read,
  as tag strings);
* ``jsonl_entities`` — one ``{"text": ..., "entities": [{"start", "end", "label"}, ...]}`` per line:
  character offsets, what clinical annotation tools export;
* ``brat`` — a folder of ``NAME.txt`` + ``NAME.ann`` standoff files (``T`` lines; a discontinuous
  span is taken from its first start to its last end).

Character-offset documents keep their text: words come from :func:`split_words` with every entity
boundary as an extra split point, so each entity is exactly a run of words and predictions map
back to offsets in the original text.

Sequence classification and regression, yielding :class:`PairExample`:

* ``table`` — jsonl, tsv (with a header) or csv with ``text`` (or ``text_a`` + ``text_b``, or GLUE's
  ``sentence1`` + ``sentence2``) and ``label`` (or ``score``).

A malformed input is a one-line :class:`~toolkit.errors.DataError` naming the file and line.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from toolkit.data.readers import GZIP_ERRORS, json_objects, open_text, text_lines
from toolkit.data.tasks.tags import check_tag, detect_scheme, tags_from_spans, to_iob2
from toolkit.errors import DataError

NER_FORMATS = ("conll", "jsonl_tokens", "jsonl_entities", "brat")
TABLE_FORMATS = ("table",)
FORMATS = NER_FORMATS + TABLE_FORMATS
_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)  # a run of word characters, or one punctuation mark


@dataclass
class NerExample:
    """One sentence or document: words with IOB2 tags; offsets when it came from raw text."""

    words: list[str]
    tags: list[str]
    where: str  # "file:line" (or the .ann file) for error messages
    text: str | None = None  # the original text (character-offset formats)
    offsets: list[tuple[int, int]] | None = None  # each word's [start, end) in ``text``


@dataclass
class PairExample:
    """One text (or text pair) with a class label or a score."""

    text_a: str
    text_b: str | None
    label: str | float
    where: str


@dataclass
class Entity:
    start: int  # character offset, inclusive
    end: int  # character offset, exclusive
    label: str
    where: str = ""


@dataclass
class Document:
    """Raw text with character-offset entities (jsonl_entities, BRAT, predict inputs)."""

    text: str
    entities: list[Entity] = field(default_factory=list)
    where: str = ""


# ---------------------------------------------------------------------------- detection


def detect_format(path: str | Path) -> str:
    """The format of ``path`` from its extension, and for jsonl/tsv from its first record."""
    path = Path(path)
    if path.is_dir():
        if any(path.glob("*.ann")):
            return "brat"
        raise DataError(f"{path}: a folder of task data must hold BRAT .txt/.ann pairs; found no .ann file")
    if not path.is_file():
        raise DataError(f"{path} does not exist; check task.train_file / valid_file / test_file")
    suffix = _suffix(path)
    if suffix in (".jsonl", ".json"):
        first = _first_json(path)
        if "tokens" in first and ("tags" in first or "ner_tags" in first):
            return "jsonl_tokens"
        if "text" in first and "entities" in first:
            return "jsonl_entities"
        if ({"text", "text_a", "sentence1"} & set(first)) and ("label" in first or "score" in first):
            return "table"
        raise DataError(f"{path}:1: cannot tell the task format from the keys {sorted(first)}; expected tokens+tags, "
                        "text+entities, or text (text_a/text_b) + label (score); or set task.format")
    if suffix == ".csv":
        return "table"
    if suffix in (".tsv", ".txt", ".conll", ".bio", ".iob"):
        header = _first_line(path).split("\t")
        if suffix == ".tsv" and ({"text", "text_a", "sentence1"} & set(header)) and ({"label", "score"} & set(header)):
            return "table"
        return "conll"
    raise DataError(f"{path}: unknown task file extension {suffix!r}; use .conll/.tsv (CoNLL), .jsonl, .csv or a BRAT "
                    "folder, or set task.format")


def _suffix(path: Path) -> str:
    """The extension that tells the format, under a ``.gz``."""
    return Path(path.stem).suffix.lower() if path.suffix == ".gz" else path.suffix.lower()


def _first_line(path: Path) -> str:
    for _, line in text_lines(path):
        if line.strip():
            return line
    raise DataError(f"{path} is empty")


def _first_json(path: Path) -> dict:
    for _, obj in json_lines(path):
        return obj
    raise DataError(f"{path} is empty")


def read_text(path: str | Path) -> str:
    """The whole UTF-8 text of ``path`` (a non-UTF-8 file is an error naming its first bad line)."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text; convert it to UTF-8") from None


# ---------------------------------------------------------------------------- NER readers


def read_conll(path: str | Path) -> list[NerExample]:
    """Sentences of a CoNLL/BIO file; the tag is the last column, the word the first."""
    path = Path(path)
    sentences: list[NerExample] = []
    words: list[str] = []
    tags: list[str] = []
    start = 0
    for number, line in text_lines(path):
        if not line.strip():
            if words:
                sentences.append(NerExample(words, tags, f"{path}:{start}"))
            words, tags = [], []
            continue
        cols = line.split("\t") if "\t" in line else line.split()
        if cols[0] == "-DOCSTART-":
            continue
        if len(cols) < 2:
            raise DataError(f"{path}:{number}: expected 'token<TAB>tag', got {line[:60]!r}")
        try:
            check_tag(cols[-1])
        except ValueError as e:
            raise DataError(f"{path}:{number}: {e}") from None
        if not words:
            start = number
        words.append(cols[0])
        tags.append(cols[-1])
    if words:
        sentences.append(NerExample(words, tags, f"{path}:{start}"))
    return _as_iob2(sentences)


def _as_iob2(examples: list[NerExample]) -> list[NerExample]:
    scheme = detect_scheme([e.tags for e in examples])
    if scheme != "iob2":
        for e in examples:
            e.tags = to_iob2(e.tags, scheme)
    return examples


def json_lines(path: Path) -> Iterator[tuple[str, dict]]:
    """``("file:line", object)`` of each non-empty line of a jsonl file."""
    for number, obj in json_objects(path):
        yield f"{path}:{number}", obj


def read_jsonl_tokens(path: str | Path) -> list[NerExample]:
    out = []
    for where, obj in json_lines(Path(path)):
        words, tags = obj.get("tokens"), obj.get("tags", obj.get("ner_tags"))  # ner_tags: HF datasets' name
        if not isinstance(words, list) or not isinstance(tags, list) or len(words) != len(tags):
            raise DataError(f"{where}: needs lists 'tokens' and 'tags' (or 'ner_tags') of the same length")
        for tag in tags:
            try:
                check_tag(str(tag))
            except ValueError as e:
                raise DataError(f"{where}: {e}") from None
        out.append(NerExample([str(w) for w in words], [str(t) for t in tags], where))
    return _as_iob2(out)


def read_jsonl_entities(path: str | Path) -> list[NerExample]:
    docs = []
    for where, obj in json_lines(Path(path)):
        text, entities = obj.get("text"), obj.get("entities", [])
        if not isinstance(text, str) or not isinstance(entities, list):
            raise DataError(f"{where}: needs a string 'text' and a list 'entities'")
        ents = []
        for e in entities:
            try:
                ents.append(Entity(int(e["start"]), int(e["end"]), str(e["label"]), where))
            except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: Infinity
                raise DataError(f"{where}: each entity needs integer 'start', 'end' and a 'label', got {e!r}") from None
        docs.append(Document(text, ents, where))
    return [document_example(d) for d in docs]


def read_brat(folder: str | Path) -> list[NerExample]:
    """One example per ``.txt``/``.ann`` pair (sorted by name); ``T`` lines only."""
    folder = Path(folder)
    out = []
    for ann in sorted(folder.glob("*.ann")):
        txt = ann.with_suffix(".txt")
        if not txt.is_file():
            raise DataError(f"{ann}: no {txt.name} beside it; BRAT data is NAME.txt + NAME.ann")
        text = read_text(txt)
        ents = []
        for number, line in text_lines(ann):
            if not line.startswith("T"):
                continue
            parts = line.split("\t")
            try:
                label, *rest = parts[1].split(" ")
                frags = [tuple(int(x) for x in f.split()) for f in " ".join(rest).split(";")]
                start, end = frags[0][0], frags[-1][1]
            except (IndexError, ValueError):
                raise DataError(f"{ann}:{number}: expected 'T<n><TAB>LABEL START END<TAB>text', got {line[:60]!r}") \
                    from None
            ents.append(Entity(start, end, label, f"{ann}:{number}"))
        out.append(document_example(Document(text, ents, str(ann))))
    if not out:
        raise DataError(f"{folder}: no .ann files")
    return out


def split_words(text: str, cuts: set[int] = frozenset()) -> list[tuple[int, int]]:
    """Word character spans of ``text``: runs of word characters or single punctuation marks, also
    split at every offset in ``cuts`` (entity boundaries)."""
    spans = []
    for m in _WORD.finditer(text):
        start = m.start()
        for cut in sorted(c for c in cuts if m.start() < c < m.end()):
            spans.append((start, cut))
            start = cut
        spans.append((start, m.end()))
    return spans


def document_example(doc: Document) -> NerExample:
    """Words and IOB2 tags of a character-offset document (entities become whole runs of words)."""
    n = len(doc.text)
    for e in doc.entities:
        if not 0 <= e.start < e.end <= n:
            raise DataError(f"{e.where or doc.where}: entity {e.label!r} [{e.start}, {e.end}) lies outside the text "
                            f"(length {n}) or is empty")
    offsets = split_words(doc.text, {x for e in doc.entities for x in (e.start, e.end)})
    spans = []
    for e in sorted(doc.entities, key=lambda e: (e.start, -e.end)):
        inside = [i for i, (s, t) in enumerate(offsets) if s >= e.start and t <= e.end]
        if not inside:
            raise DataError(f"{e.where or doc.where}: entity {e.label!r} [{e.start}, {e.end}) covers no word")
        if spans and inside[0] < spans[-1][2]:
            raise DataError(f"{e.where or doc.where}: entity {e.label!r} [{e.start}, {e.end}) overlaps the previous "
                            "one; nested or overlapping entities are not supported")
        spans.append((e.label, inside[0], inside[-1] + 1))
    words = [doc.text[s:t] for s, t in offsets]
    return NerExample(words, tags_from_spans(len(words), spans), doc.where, text=doc.text, offsets=offsets)


# ---------------------------------------------------------------------------- table reader


def read_table(path: str | Path, *, regression: bool = False) -> list[PairExample]:
    """Rows of a jsonl, tsv or csv file with ``text`` (or ``text_a``/``text_b``) and ``label`` (or
    ``score``, a number; required with ``regression``)."""
    path = Path(path)
    if _suffix(path) in (".jsonl", ".json"):
        rows = json_lines(path)
    else:
        rows = _csv_rows(path, "\t" if _suffix(path) in (".tsv", ".txt") else ",")
    target = "score" if regression else "label"
    out = []
    for where, row in rows:
        a = row.get("text_a", row.get("text", row.get("sentence1")))  # sentence1/sentence2: GLUE-style names
        if a is None:
            raise DataError(f"{where}: no 'text' or 'text_a' column (has {sorted(row)}); rename the text column")
        value = row.get(target, row.get("label") if regression else None)
        if value is None or value == "":
            raise DataError(f"{where}: no '{target}' value (has {sorted(row)})")
        if regression:
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise DataError(f"{where}: score {value!r} is not a number") from None
        else:
            value = str(value)
        b = row.get("text_b", row.get("sentence2"))
        out.append(PairExample(str(a), str(b) if b not in (None, "") else None, value, where))
    return out


def _csv_rows(path: Path, delimiter: str) -> Iterator[tuple[str, dict]]:
    kind = "TSV" if delimiter == "\t" else "CSV"
    with open_text(path) as fh:
        try:
            reader = csv.DictReader(fh, delimiter=delimiter)
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row or None in row.values():  # more fields than the header (restkey), or fewer
                    n = len(row) - 1 + len(row[None]) if None in row else sum(v is not None for v in row.values())
                    raise DataError(f"{where}: {n} fields, the header {len(reader.fieldnames)}; quote fields that hold "
                                    f"the delimiter or line breaks, or fix the row")
                yield where, row
        except (UnicodeDecodeError, csv.Error) as e:
            raise DataError(f"{path}: cannot read as {kind}: {' '.join(str(e).split())}") from None
        except GZIP_ERRORS as e:
            raise DataError(f"{path}: cannot read as {kind} ({' '.join(str(e).split())}); the file may be corrupt or "
                            "truncated") from None


def read_examples(path: str | Path, fmt: str | None = None, *, regression: bool = False):
    """The examples of ``path`` in ``fmt`` (detected when None)."""
    fmt = fmt or detect_format(path)
    readers = {"conll": read_conll, "jsonl_tokens": read_jsonl_tokens, "jsonl_entities": read_jsonl_entities,
               "brat": read_brat}
    if fmt in readers:
        examples = readers[fmt](path)
    elif fmt == "table":
        examples = read_table(path, regression=regression)
    else:
        raise DataError(f"task.format={fmt!r} is not one of {', '.join(FORMATS)}")
    if not examples:
        raise DataError(f"{path} holds no examples; check the file (an empty split cannot train or evaluate)")
    return examples
