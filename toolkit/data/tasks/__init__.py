"""Fine-tuning data: task file readers (CoNLL/BIO, jsonl, BRAT, tables), tag schemes, label sets and
the task data that ships with the package. See ``docs/finetuning.md``."""

from toolkit.data.tasks.formats import (
    FORMATS,
    Document,
    Entity,
    NerExample,
    PairExample,
    detect_format,
    document_example,
    read_examples,
    split_words,
)
from toolkit.data.tasks.labels import LabelSet
from toolkit.data.tasks.shipped import SHIPPED, resolve_task_file
from toolkit.data.tasks.tags import detect_scheme, spans, tags_from_spans, to_iob2

__all__ = ["FORMATS", "Document", "Entity", "NerExample", "PairExample", "detect_format", "document_example",
           "read_examples", "split_words", "LabelSet", "SHIPPED", "resolve_task_file", "detect_scheme", "spans",
           "tags_from_spans", "to_iob2"]
