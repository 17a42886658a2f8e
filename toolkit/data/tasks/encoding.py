"""Fine-tuning examples → model inputs: sub-token alignment, overlapping windows over long
documents, and the way back (window predictions → one label per word).

Token classification: each word is encoded on its own (``tokenizer.encode(word)``, as a fast
tokenizer does with pre-tokenized input); its first sub-token carries the word's label, the others
and the special tokens carry ``-100`` (ignored by the loss). A document longer than the model is cut
into windows of at most ``max_length - 2`` sub-tokens (room for ``[CLS]``/``[SEP]``) that overlap by
``stride`` sub-tokens, so no text is truncated. Each word is *owned* by the window where it has the
most context on both sides (the window whose centre is nearest); it is labelled there for training
and predicted from there. A gold entity that no single window holds whole is an error naming it:
raise ``model.seq_length`` or ``task.stride``.

Sequence classification and regression: ``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]`` with token
types 0/1, the longer text truncated first to fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.data.tasks.formats import NerExample, PairExample
from toolkit.data.tasks.labels import LabelSet
from toolkit.data.tasks.tags import spans
from toolkit.errors import ConfigError, DataError

IGNORE = -100


@dataclass
class Window:
    """One model input of at most ``max_length`` ids."""

    input_ids: list[int]  # [CLS] sub-tokens [SEP]
    labels: list[int]  # per position: label id on the first sub-token of an owned word, else -100
    word_index: list[int]  # per position: the word whose first sub-token it is, else -1
    owned: list[bool]  # per position: that word is owned by this window
    example: int  # index of the example (document) it came from


def _specials(tokenizer) -> tuple[int, int]:
    if tokenizer.cls_id is None or tokenizer.sep_id is None:
        raise ConfigError(f"fine-tuning an encoder needs a tokenizer with [CLS] and [SEP]; {tokenizer!r} has none")
    return tokenizer.cls_id, tokenizer.sep_id


def word_pieces(words: list[str], tokenizer) -> list[list[int]]:
    """The sub-token ids of each word (a word the tokenizer drops entirely becomes ``[UNK]``)."""
    unk = tokenizer.unk_id if getattr(tokenizer, "unk_id", None) is not None else tokenizer.sep_id
    return [tokenizer.encode(w) or [unk] for w in words]


def window_starts(n: int, size: int, stride: int) -> list[int]:
    """Start offsets of windows of ``size`` over ``n`` positions overlapping by ``stride``."""
    if stride >= size:
        raise ConfigError(f"task.stride={stride} must be smaller than model.seq_length - 2 = {size}")
    if n <= size:
        return [0]
    starts = list(range(0, n - size, size - stride))
    return starts + [n - size]


def encode_ner(examples: list[NerExample], tokenizer, labels: LabelSet | None, *, max_length: int,
               stride: int) -> list[Window]:
    """Windows of every example (with ``labels`` None: prediction inputs, every label ``-100``)."""
    cls, sep = _specials(tokenizer)
    size = max_length - 2
    ids = labels.id_of if labels is not None else {}
    out: list[Window] = []
    for index, ex in enumerate(examples):
        pieces = word_pieces(ex.words, tokenizer)
        flat: list[int] = []  # sub-token ids of the whole example
        first_of: list[int] = []  # per sub-token: its word if it is the word's first piece, else -1
        word_start: list[int] = []  # per word: position of its first sub-token in ``flat``
        for w, p in enumerate(pieces):
            word_start.append(len(flat))
            first_of += [w] + [-1] * (len(p) - 1)
            flat += p
        starts = window_starts(len(flat), size, stride)
        owner = _owners(word_start, starts, size, len(flat))
        if labels is not None:
            _check_entities_fit(ex, word_start, pieces, starts, size)
        for k, start in enumerate(starts):
            end = min(start + size, len(flat))
            words = first_of[start:end]
            lab = [IGNORE] * len(words)
            if labels is not None:
                lab = [ids[ex.tags[w]] if w >= 0 and owner[w] == k else IGNORE for w in words]
            out.append(Window(input_ids=[cls, *flat[start:end], sep], labels=[IGNORE, *lab, IGNORE],
                              word_index=[-1, *words, -1],
                              owned=[False, *[w >= 0 and owner[w] == k for w in words], False], example=index))
    return out


def _owners(word_start: list[int], starts: list[int], size: int, n: int) -> list[int]:
    """For each word, the window whose centre is nearest its first sub-token (among those holding it)."""
    owners = []
    for pos in word_start:
        best, dist = 0, None
        for k, s in enumerate(starts):
            e = min(s + size, n)
            if s <= pos < e:
                d = abs(pos - (s + e - 1) / 2)
                if dist is None or d < dist:
                    best, dist = k, d
        owners.append(best)
    return owners


def _check_entities_fit(ex: NerExample, word_start: list[int], pieces: list[list[int]], starts: list[int],
                        size: int) -> None:
    if len(starts) == 1:
        return
    for label, a, b in spans(ex.tags):
        first, last = word_start[a], word_start[b - 1] + len(pieces[b - 1]) - 1
        if not any(s <= first and last < s + size for s in starts):
            raise DataError(f"{ex.where}: entity {label!r} ({' '.join(ex.words[a:b])[:40]!r}) crosses every window "
                            f"boundary; raise model.seq_length or task.stride")


def merge_word_predictions(windows: list[Window], predictions: list[list], num_words: list[int]) -> list[list]:
    """Per example, one value per word (a label id, a probability) taken at the word's first
    sub-token in the window that owns the word; ``predictions`` holds one value per window position."""
    out: list[list] = [[0] * n for n in num_words]
    for window, pred in zip(windows, predictions):
        for pos, (w, own) in enumerate(zip(window.word_index, window.owned)):
            if own:
                out[window.example][w] = pred[pos]
    return out


def encode_pair(example: PairExample, tokenizer, *, max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, token types) of ``[CLS] a [SEP] (b [SEP])``, truncating the longer text first."""
    cls, sep = _specials(tokenizer)
    a = tokenizer.encode(example.text_a)
    b = tokenizer.encode(example.text_b) if example.text_b is not None else None
    room = max_length - (3 if b is not None else 2)
    if b is None:
        a = a[:room]
        return [cls, *a, sep], [0] * (len(a) + 2)
    while len(a) + len(b) > room:
        if len(a) >= len(b):
            a = a[:-1]
        else:
            b = b[:-1]
    return [cls, *a, sep, *b, sep], [0] * (len(a) + 2) + [1] * (len(b) + 1)
