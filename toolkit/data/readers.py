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


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline), with decoding/gzip errors as DataError."""
    lineno = 0
    try:
        with open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                yield lineno, line.rstrip("\n")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno + 1}: not valid UTF-8 ({e.reason}); convert the file to UTF-8") from None
    except (gzip.BadGzipFile, EOFError, OSError) as e:
        raise DataError(f"{path}:{lineno + 1}: cannot read file ({e}); the file may be corrupt or truncated") from None


def read_jsonl(path: Path, json_key: str = "text") -> Iterator[str]:
    """One JSON object per line; the document is ``obj[json_key]`` (a string). Blank lines are skipped."""
    for lineno, line in _lines(path):
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
    for _, line in _lines(path):
        if line.strip():
            block.append(line)
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


READERS: dict[str, Reader] = {
    "jsonl": read_jsonl,
    "text": read_text,
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
