"""Input readers for preprocessing: one function per format, each streaming documents as strings.

``READERS`` maps a format name to ``reader(path, json_key) -> Iterator[str]``; ``EXTENSIONS`` maps
file-name endings to a format for ``fmt="auto"``. To add a format (e.g. a MIMIC notes CSV), write a
reader and register it::

    READERS["mimic3"] = read_mimic3          # def read_mimic3(path: Path, key: str) -> Iterator[str]
    EXTENSIONS[".csv"] = "mimic3"            # optional: let "auto" pick it

Readers stream (never load a whole file), transparently decompress ``.gz``, and raise
:class:`~toolkit.errors.DataError` naming the file and line for bad input. Empty documents may be
yielded; preprocessing skips them.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path
from typing import Callable, Iterator, TextIO

from toolkit.errors import DataError

Reader = Callable[[Path, str], Iterator[str]]


def open_text(path: str | Path) -> TextIO:
    """Open a UTF-8 text file for reading, decompressing ``*.gz``; a missing file is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: input file not found; check the --input path")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline=None)
    return open(path, encoding="utf-8", newline=None)


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline), with decoding/gzip errors as DataError."""
    lineno = 0
    try:
        with open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                yield lineno, line.rstrip("\n")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno + 1}: not UTF-8 text ({e.reason}); convert the file to UTF-8") from None
    except (gzip.BadGzipFile, EOFError, OSError) as e:
        raise DataError(f"{path}:{lineno + 1}: cannot read file ({e}); the file may be corrupt or truncated") from None


def json_objects(path: Path) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) of each non-blank line of a jsonl file; a line that is not one
    JSON object is a DataError naming it."""
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); each line must be one JSON object"
            ) from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def read_jsonl(path: Path, json_key: str = "text") -> Iterator[str]:
    """One JSON object per line; the document is ``obj[json_key]`` (a string). Blank lines are skipped."""
    for lineno, obj in json_objects(path):
        if json_key not in obj:
            keys = ", ".join(sorted(map(str, obj))[:10]) or "none"
            raise DataError(f"{path}:{lineno}: no key '{json_key}' (keys: {keys}); pass --json-key KEY")
        text = obj[json_key]
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: '{json_key}' must be a string, got {type(text).__name__}")
        yield text


def read_text(path: Path, json_key: str = "text") -> Iterator[str]:
    """Plain text: one document per paragraph block, i.e. per run of non-blank lines.

    Blank (or whitespace-only) lines separate documents; the lines of a block are joined with
    ``"\\n"``. A file without blank lines is a single document. ``json_key`` is ignored.
    """
    block: list[str] = []
    for _, line in text_lines(path):
        if line.strip():
            block.append(line)
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def iter_csv_notes(path: Path, text_column: str = "text", *, skip_errors: bool = True,
                   **equals: str | set[str]) -> Iterator[dict[str, str]]:
    """Rows of a clinical-notes CSV (MIMIC-III ``NOTEEVENTS.csv``, MIMIC-IV ``discharge.csv`` /
    ``radiology.csv``) as dicts, streamed with the csv module (quoted multi-line notes are one field).

    ``text_column`` and the ``equals`` filters (e.g. ``CATEGORY={"Discharge summary"}``) match column
    names case-insensitively; other columns are optional. With ``skip_errors``, rows whose optional
    MIMIC-III ``ISERROR`` column is ``1`` (notes flagged as erroneous) are dropped.
    """
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # discharge notes exceed the 128 KiB default
    want = {k.lower(): ({v} if isinstance(v, str) else set(v)) for k, v in equals.items()}
    row_no = 1
    try:
        with open_text(path) as f:
            reader = csv.reader(f, strict=True)
            header = [h.strip().lower() for h in next(reader, [])]
            missing = [c for c in [text_column.lower(), *want] if c not in header]
            if missing:
                raise DataError(f"{path}:1: no column '{missing[0]}' (columns: {', '.join(header[:12]) or 'none'}); "
                                "pass the text column with --json-key")
            err = header.index("iserror") if skip_errors and "iserror" in header else None
            for row_no, row in enumerate(reader, start=2):
                if len(row) != len(header):
                    raise DataError(f"{path}: record {row_no} (ending on line {reader.line_num}) has {len(row)} "
                                    f"fields, the header {len(header)}; the file is truncated or not a notes CSV")
                rec = dict(zip(header, row))
                if err is not None and row[err].strip() == "1":
                    continue
                if all(rec[k] in v for k, v in want.items()):
                    yield rec
    except csv.Error as e:
        raise DataError(f"{path}: record {row_no}: malformed CSV ({e}); the file may be truncated") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: record {row_no}: not valid UTF-8 ({e.reason}); convert the file to UTF-8") from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise DataError(f"{path}: cannot read file ({e}); the file may be corrupt or truncated") from None


def read_mimic3(path: Path, json_key: str = "text") -> Iterator[str]:
    """MIMIC-III ``NOTEEVENTS.csv[.gz]``: the ``TEXT`` column of every note not flagged ``ISERROR``."""
    for rec in iter_csv_notes(path, json_key):
        yield rec[json_key.lower()]


def read_mimic4(path: Path, json_key: str = "text") -> Iterator[str]:
    """MIMIC-IV-Note ``discharge.csv[.gz]`` / ``radiology.csv[.gz]``: the ``text`` column of every note."""
    for rec in iter_csv_notes(path, json_key, skip_errors=False):
        yield rec[json_key.lower()]


READERS: dict[str, Reader] = {
    "jsonl": read_jsonl,
    "text": read_text,
    "mimic3": read_mimic3,  # MIMIC-III NOTEEVENTS.csv (TEXT column)
    "mimic4": read_mimic4,  # MIMIC-IV-Note discharge.csv / radiology.csv (text column)
}

# Longest endings first when matching, so ".jsonl.gz" wins over ".gz".
EXTENSIONS: dict[str, str] = {
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
    ".json": "jsonl",
    ".json.gz": "jsonl",
    ".ndjson": "jsonl",
    ".txt": "text",
    ".txt.gz": "text",
    ".text": "text",
    ".md": "text",
}


def detect_format(path: str | Path) -> str:
    """The format ``fmt="auto"`` picks for ``path`` from its name."""
    name = Path(path).name.lower()
    for ending in sorted(EXTENSIONS, key=len, reverse=True):
        if name.endswith(ending):
            return EXTENSIONS[ending]
    raise DataError(
        f"{path}: cannot tell the input format from the file name; pass fmt/--format "
        f"(one of {', '.join(sorted(READERS))})"
    )


def get_reader(path: str | Path, fmt: str = "auto") -> Reader:
    """The reader for ``path`` under format ``fmt`` ("auto" picks by extension)."""
    name = detect_format(path) if fmt == "auto" else fmt
    if name not in READERS:
        raise DataError(f"unknown input format '{fmt}'; use auto or one of {', '.join(sorted(READERS))}")
    return READERS[name]


def iter_documents(inputs: list[str | Path], fmt: str = "auto", json_key: str = "text") -> Iterator[str]:
    """Every document of every input file, in order (files checked to exist before reading any)."""
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: input file not found; check the --input path")
    readers = [get_reader(p, fmt) for p in paths]
    for p, reader in zip(paths, readers):
        yield from reader(p, json_key)
