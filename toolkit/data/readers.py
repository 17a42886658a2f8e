"""Input readers for preprocessing: one function per format, each streaming documents as strings.

``READERS`` maps a format name to ``reader(path, json_key) -> Iterator[str]``; ``EXTENSIONS`` maps
file-name endings to a format for ``fmt="auto"``. To add a format (e.g. a MIMIC notes CSV), write a
reader and register it::

    READERS["mimic3"] = read_mimic3          # def read_mimic3(path: Path, key: str) -> Iterator[str]
    EXTENSIONS[".csv"] = "mimic3"            # optional: let "auto" pick it

Readers stream (never load a whole file), transparently decompress ``.gz``, and raise
:class:`~toolkit.errors.DataError` naming the file and line for bad input. Empty documents may be
yielded; preprocessing skips them.

Columnar inputs, Parquet files and Hugging Face ``datasets`` folders written by ``save_to_disk``, are
read with ``pyarrow`` (imported only when such an input is read) one record batch at a time: the text
column is ``json_key``. A folder input is accepted only for the formats in ``FOLDER_FORMATS``.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from toolkit.errors import DataError

Reader = Callable[[Path, str], Iterator[str]]

#: what a damaged gzip stream raises (bad header or CRC, cut short, or a corrupt deflate stream)
GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


def shown(name: object) -> str:
    """A key or column name as an error message quotes it: as is, or escaped (``'a\\nb'``) when it holds
    a line break or another unprintable character, so the message stays one line."""
    text = str(name)
    return text if text.isprintable() else repr(text)


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
    except (*GZIP_ERRORS, OSError) as e:
        raise DataError(f"{path}:{lineno + 1}: cannot read file ({_one_line(e)}); the file may be corrupt or "
                        "truncated") from None


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
            keys = ", ".join(shown(k) for k in sorted(map(str, obj))[:10]) or "none"
            raise DataError(f"{path}:{lineno}: no key '{shown(json_key)}' (keys: {keys}); pass --json-key KEY")
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
                columns = ", ".join(shown(h) for h in header[:12]) or "none"
                raise DataError(f"{path}:1: no column '{shown(missing[0])}' (columns: {columns}); "
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
        raise DataError(f"{path}: record {row_no}: malformed CSV ({_one_line(e)}); the file may be truncated") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: record {row_no}: not valid UTF-8 ({e.reason}); convert the file to UTF-8") from None
    except GZIP_ERRORS as e:
        raise DataError(f"{path}: cannot read file ({_one_line(e)}); the file may be corrupt or truncated") from None


def read_mimic3(path: Path, json_key: str = "text") -> Iterator[str]:
    """MIMIC-III ``NOTEEVENTS.csv[.gz]``: the ``TEXT`` column of every note not flagged ``ISERROR``."""
    for rec in iter_csv_notes(path, json_key):
        yield rec[json_key.lower()]


def read_mimic4(path: Path, json_key: str = "text") -> Iterator[str]:
    """MIMIC-IV-Note ``discharge.csv[.gz]`` / ``radiology.csv[.gz]``: the ``text`` column of every note."""
    for rec in iter_csv_notes(path, json_key, skip_errors=False):
        yield rec[json_key.lower()]


# Rows converted to Python strings at a time by the columnar readers: bounds their memory whatever
# the size of the file's row groups or record batches.
BATCH_ROWS = 1024


def _pyarrow() -> Any:
    """``pyarrow``, imported on first use so that ``import toolkit`` stays fast."""
    try:
        import pyarrow
    except ImportError:  # pragma: no cover - a declared dependency
        raise DataError("Parquet and datasets-folder input need pyarrow; pip install 'pyarrow>=14.0.1'") from None
    return pyarrow


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _text_column(where: Path, schema: Any, json_key: str) -> int:
    """Index of the string column ``json_key`` in an Arrow ``schema``; DataError if absent or not text."""
    pa = _pyarrow()
    names = list(schema.names)
    if json_key not in names:
        cols = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise DataError(f"{where}: no column '{json_key}' (columns: {cols or 'none'}); pass --json-key COLUMN")
    index = names.index(json_key)
    typ = schema.field(index).type
    value_type = typ.value_type if pa.types.is_dictionary(typ) else typ
    is_view = getattr(pa.types, "is_string_view", lambda t: False)
    if not (pa.types.is_string(value_type) or pa.types.is_large_string(value_type) or is_view(value_type)):
        raise DataError(f"{where}: column '{json_key}' holds {typ}, not strings; pass --json-key with a text column")
    return index


def _strings(column: Any, batch_size: int) -> Iterator[str]:
    """The non-null values of an Arrow string array, converted ``batch_size`` rows at a time."""
    for start in range(0, len(column), batch_size):
        for text in column.slice(start, batch_size).to_pylist():
            if text is not None:
                yield text


def read_parquet(path: Path, json_key: str = "text", *, batch_size: int = BATCH_ROWS) -> Iterator[str]:
    """A Parquet file: the string column ``json_key``, read ``batch_size`` rows at a time (only that
    column, one row group at most in memory). Null values are skipped, like ``null`` in jsonl."""
    pa = _pyarrow()
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: input file not found; check the --input path")
    try:
        pf = pq.ParquetFile(path)
        _text_column(path, pf.schema_arrow, json_key)
        for batch in pf.iter_batches(batch_size=batch_size, columns=[json_key]):
            yield from _strings(batch.column(0), batch_size)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read Parquet ({_one_line(e)}); the file may be corrupt, truncated "
                        "or not Parquet") from None


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the {what} ({_one_line(e)}); re-save the dataset with "
                        "save_to_disk") from None


def _read_arrow_stream(path: Path, json_key: str, batch_size: int) -> Iterator[str]:
    """The column ``json_key`` of one Arrow IPC file of a datasets folder, memory-mapped, batch by
    batch. ``datasets`` writes the stream format; the random-access file format is read too."""
    pa = _pyarrow()
    if not path.is_file():
        raise DataError(f"{path}: data file listed in state.json not found; the folder is incomplete, "
                        "re-save it with save_to_disk")
    try:
        with pa.memory_map(str(path)) as source:
            if source.read(6) == b"ARROW1":
                source.seek(0)
                reader = pa.ipc.open_file(source)
                batches: Iterator[Any] = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                source.seek(0)
                reader = pa.ipc.open_stream(source)
                batches = iter(reader)
            index = _text_column(path, reader.schema, json_key)
            for batch in batches:
                yield from _strings(batch.column(index), batch_size)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read Arrow data ({_one_line(e)}); the file may be corrupt or "
                        "truncated, re-save the dataset with save_to_disk") from None


def _dataset_folder(path: Path) -> Path:
    """The ``Dataset`` folder to read: ``path`` itself, or for a ``DatasetDict`` folder its ``train``
    split (or its only split); DataError when ``path`` is neither."""
    if (path / "dataset_dict.json").is_file():
        info = _read_json(path / "dataset_dict.json", "DatasetDict index")
        splits = info.get("splits") if isinstance(info, dict) else None
        if not isinstance(splits, list) or not splits or not all(isinstance(s, str) for s in splits):
            raise DataError(f"{path / 'dataset_dict.json'}: no list of splits; re-save the dataset with save_to_disk")
        split = "train" if "train" in splits else splits[0] if len(splits) == 1 else None
        if split is None:
            raise DataError(f"{path}: DatasetDict with splits {', '.join(splits)} and no 'train'; "
                            f"pass one split's folder, e.g. --input {path / splits[0]}")
        if not (path / split / "state.json").is_file():
            raise DataError(f"{path / split}: split '{split}' listed in dataset_dict.json has no state.json; "
                            "the folder is incomplete, re-save it with save_to_disk")
        return path / split
    if not (path / "state.json").is_file():
        raise DataError(f"{path}: not a Hugging Face datasets folder (no state.json or dataset_dict.json); "
                        "pass a folder written by Dataset.save_to_disk or DatasetDict.save_to_disk")
    return path


def read_hf_dataset(path: Path, json_key: str = "text", *, batch_size: int = BATCH_ROWS) -> Iterator[str]:
    """A Hugging Face ``datasets`` folder written by ``save_to_disk``: the string column ``json_key``
    of its Arrow data files, in the order ``state.json`` lists them, batch by batch (memory-mapped).

    A ``DatasetDict`` folder (``dataset_dict.json``) is read through its ``train`` split, or its only
    split; to read another split pass the split's folder (``folder/test``), itself a Dataset folder.
    Null values are skipped.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: not a folder; a Hugging Face datasets input is the folder written by save_to_disk")
    folder = _dataset_folder(path)
    state = _read_json(folder / "state.json", "dataset state")
    files = state.get("_data_files") if isinstance(state, dict) else None
    if (not isinstance(files, list) or not files
            or not all(isinstance(f, dict) and isinstance(f.get("filename"), str) for f in files)):
        raise DataError(f"{folder / 'state.json'}: no '_data_files' list of Arrow files; "
                        "re-save the dataset with save_to_disk")
    for f in files:
        yield from _read_arrow_stream(folder / f["filename"], json_key, batch_size)


def is_hf_dataset_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    path = Path(path)
    return path.is_dir() and ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()
                              or (path / "dataset_dict.json").is_file())


READERS: dict[str, Reader] = {
    "jsonl": read_jsonl,
    "text": read_text,
    "mimic3": read_mimic3,  # MIMIC-III NOTEEVENTS.csv (TEXT column)
    "mimic4": read_mimic4,  # MIMIC-IV-Note discharge.csv / radiology.csv (text column)
    "parquet": read_parquet,  # a string column (--json-key) of a Parquet file
    "hf_datasets": read_hf_dataset,  # a string column of a datasets save_to_disk folder
}

# Formats whose input is a folder rather than a file.
FOLDER_FORMATS: set[str] = {"hf_datasets"}

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
    ".parquet": "parquet",
}


def detect_format(path: str | Path) -> str:
    """The format ``fmt="auto"`` picks for ``path``: ``hf_datasets`` for a datasets folder, else by its name."""
    if Path(path).is_dir():
        if is_hf_dataset_folder(path):
            return "hf_datasets"
        raise DataError(f"{path}: a folder, but not a Hugging Face datasets folder (no state.json and "
                        "dataset_info.json, nor dataset_dict.json); pass input files or a save_to_disk folder")
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
    """Every document of every input, in order (inputs checked to exist before reading any). An input
    is a file, or a folder for the formats in ``FOLDER_FORMATS`` (a datasets ``save_to_disk`` folder)."""
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.exists():
            raise DataError(f"{p}: input file not found; check the --input path")
        if p.is_dir() and fmt != "auto" and fmt not in FOLDER_FORMATS:
            raise DataError(f"{p}: a folder, but --format {fmt} reads files; pass the files, or a datasets "
                            f"folder with --format {' or '.join(sorted(FOLDER_FORMATS | {'auto'}))}")
    readers = [get_reader(p, fmt) for p in paths]
    for p, reader in zip(paths, readers):
        yield from reader(p, json_key)
