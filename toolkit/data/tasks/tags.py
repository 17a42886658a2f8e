"""Entity tag schemes: IOB1, IOB2 (BIO) and BIOES tags ↔ entity spans over words.

Everything downstream (alignment, training labels, seqeval's strict scoring) works in IOB2; the
readers convert what a file uses with :func:`to_iob2`. A span is ``(label, start, end)`` with
``end`` exclusive, in word positions.
"""

from __future__ import annotations

from typing import Sequence

SCHEMES = ("iob1", "iob2", "bioes")


def _split(tag: str) -> tuple[str, str]:
    """``B-Disease`` → (``B``, ``Disease``); ``O`` → (``O``, ``""``)."""
    if tag == "O":
        return "O", ""
    prefix, sep, label = tag.partition("-")
    if not sep or prefix not in ("B", "I", "E", "S") or not label:
        raise ValueError(f"tag {tag!r} is not O or PREFIX-LABEL with PREFIX one of B, I, E, S")
    return prefix, label


def check_tag(tag: str) -> None:
    """Raise ValueError unless ``tag`` is a well-formed tag of some scheme."""
    _split(tag)


def detect_scheme(sentences: Sequence[Sequence[str]]) -> str:
    """``bioes`` if any E-/S- tag occurs; ``iob1`` if an entity starts with I- (no B- before it of the
    same label); else ``iob2``."""
    iob1 = False
    for tags in sentences:
        prev = "O"
        for tag in tags:
            prefix, label = _split(tag)
            if prefix in ("E", "S"):
                return "bioes"
            if prefix == "I" and (prev == "O" or _split(prev)[1] != label):
                iob1 = True
            prev = tag
    return "iob1" if iob1 else "iob2"


def spans(tags: Sequence[str], scheme: str = "iob2") -> list[tuple[str, int, int]]:
    """Entity spans ``(label, start, end)`` of one sentence. In IOB1/IOB2 an ``I-X`` that does not
    continue an ``X`` entity starts one (as conlleval reads it); in BIOES an entity ends at ``E-``/``S-``."""
    out: list[tuple[str, int, int]] = []
    start, label = None, ""
    for i, tag in enumerate(tags):
        prefix, lab = _split(tag)
        continues = start is not None and lab == label and prefix in ("I", "E")
        if scheme == "iob1":
            continues = start is not None and lab == label and prefix == "I"
        if not continues:
            if start is not None:
                out.append((label, start, i))
            start, label = (i, lab) if prefix != "O" else (None, "")
        if start is not None and scheme == "bioes" and prefix in ("E", "S"):
            out.append((label, start, i + 1))
            start, label = None, ""
    if start is not None:
        out.append((label, start, len(tags)))
    return out


def tags_from_spans(length: int, entity_spans: Sequence[tuple[str, int, int]]) -> list[str]:
    """IOB2 tags for ``length`` words holding ``entity_spans`` (non-overlapping)."""
    tags = ["O"] * length
    for label, start, end in entity_spans:
        tags[start] = f"B-{label}"
        for i in range(start + 1, end):
            tags[i] = f"I-{label}"
    return tags


def to_iob2(tags: Sequence[str], scheme: str) -> list[str]:
    """The IOB2 tags of one sentence tagged in ``scheme`` (iob1 | iob2 | bioes)."""
    if scheme not in SCHEMES:
        raise ValueError(f"tag scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
    return tags_from_spans(len(tags), spans(tags, scheme))
