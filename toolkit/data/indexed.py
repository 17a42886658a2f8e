"""Memory-mapped indexed datasets: ``PREFIX.bin`` (token ids) + ``PREFIX.idx`` (document index).

``PREFIX.bin`` holds the token ids of every document, back to back, in one dtype (no header).
``PREFIX.idx`` is little-endian::

    offset  size      field
    0       8         magic b"MFRGIDX\\0"
    8       4         uint32 format version (1)
    12      1         uint8 dtype code (see DTYPE_CODES)
    13      3         reserved, zero
    16      8         uint64 number of documents N
    24      8         uint64 number of tokens T (elements in .bin)
    32      8         uint64 vocabulary size of the tokenizer (0 = unknown)
    40      4·N       int32 document lengths, in tokens
    40+4N   0 or 4    zero padding so the next array starts on an 8-byte boundary
    …       8·N       int64 document start offsets, in elements (tokens) into .bin

The writer streams to temporary names and renames both files only in :meth:`finalize`, so an
interrupted preprocess never leaves a valid-looking pair. Every inconsistency the reader can check
in O(1) (missing file, magic, version, dtype, sizes of both files, last offset) raises
:class:`~toolkit.errors.DataError` with one line naming the file and what to do.
"""

from __future__ import annotations

import os
import struct
from array import array
from pathlib import Path
from typing import Sequence

import numpy as np

from toolkit.errors import DataError

MAGIC = b"MFRGIDX\x00"
VERSION = 1
_HEADER = struct.Struct("<8sIB3xQQQ")  # magic, version, dtype code, docs, tokens, vocab size
HEADER_SIZE = _HEADER.size  # 40 bytes

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    8: np.dtype(np.uint16),
    9: np.dtype(np.uint32),
}
_CODE_OF = {dt: code for code, dt in DTYPE_CODES.items()}

_REBUILD = "re-run `megaforge preprocess` to rebuild it"


def best_dtype(vocab_size: int | None) -> np.dtype:
    """Smallest token dtype for ``vocab_size`` ids: uint16 below 65500, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def data_file_path(prefix: str | Path) -> Path:
    """``PREFIX.bin``."""
    return Path(f"{prefix}.bin")


def index_file_path(prefix: str | Path) -> Path:
    """``PREFIX.idx``."""
    return Path(f"{prefix}.idx")


def _offsets_start(num_docs: int) -> int:
    """Byte position of the int64 offsets array in the .idx file (8-byte aligned)."""
    start = HEADER_SIZE + 4 * num_docs
    return (start + 7) // 8 * 8


def index_file_size(num_docs: int) -> int:
    """Exact size in bytes of a valid .idx file holding ``num_docs`` documents."""
    return _offsets_start(num_docs) + 8 * num_docs


class IndexedDatasetWriter:
    """Append documents to ``PREFIX.bin``/``PREFIX.idx``; nothing appears under those names until
    :meth:`finalize`.

    Use as a context manager to finalize on success and discard the temporary files on error::

        with IndexedDatasetWriter("data/corpus", best_dtype(tok.vocab_size)) as w:
            for ids in documents:
                w.add_document(ids)
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype | type | str = np.uint16, *,
                 vocab_size: int | None = None) -> None:
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise DataError(f"unsupported token dtype {self.dtype}; use one of "
                            f"{', '.join(str(d) for d in DTYPE_CODES.values())}")
        self.vocab_size = int(vocab_size or 0)
        info = np.iinfo(self.dtype)
        self._lo, self._hi = info.min, info.max
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        tag = f".tmp-{os.getpid()}"
        self._bin_tmp = Path(f"{data_file_path(self.prefix)}{tag}")
        self._idx_tmp = Path(f"{index_file_path(self.prefix)}{tag}")
        self._bin = open(self._bin_tmp, "wb")
        self._sizes = array("i")  # int32 per document: 4 bytes of memory per document
        self._num_tokens = 0
        self._done = False

    @property
    def num_documents(self) -> int:
        return len(self._sizes)

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    def add_document(self, ids: np.ndarray | Sequence[int]) -> None:
        """Append one document's token ids (any integer array or list; cast to the writer dtype)."""
        self._sizes.append(self._write(ids))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray | Sequence[int]) -> None:
        """Append several documents at once: ``tokens`` (1-D, all documents back to back) split by
        ``lengths`` (one entry per document; zero-length entries add empty documents)."""
        lengths = self._check_lengths(tokens, lengths)
        self._write(tokens)
        self._sizes.extend(lengths.astype(np.int32).tolist())

    def _check_lengths(self, tokens, lengths) -> np.ndarray:
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(tokens) or (lengths.size and lengths.min() < 0):
            raise DataError(f"{self.prefix}: document lengths sum to {int(lengths.sum())}, not {len(tokens)} tokens")
        if lengths.size and lengths.max() > np.iinfo(np.int32).max:
            raise DataError(f"{self.prefix}: a document exceeds the int32 length field")
        return lengths

    def _write(self, ids: np.ndarray | Sequence[int]) -> int:
        """Append token ids to the data file (range-checked, cast to the writer dtype); their count."""
        if self._done:
            raise RuntimeError("add_document() after finalize()")
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise DataError(f"{self.prefix}: a document must be a 1-D sequence of token ids, got shape {arr.shape}")
        if arr.size > np.iinfo(np.int32).max:
            raise DataError(f"{self.prefix}: document of {arr.size} tokens exceeds the int32 length field")
        if arr.size:
            if arr.dtype != self.dtype:
                if arr.dtype.kind not in "iu":
                    raise DataError(f"{self.prefix}: token ids must be integers, got dtype {arr.dtype}")
                lo, hi = int(arr.min()), int(arr.max())
                if lo < self._lo or hi > self._hi:
                    raise DataError(
                        f"{self.prefix}: token id {hi if hi > self._hi else lo} does not fit dtype {self.dtype}; "
                        "use a wider dtype (best_dtype(vocab_size))"
                    )
                arr = arr.astype(self.dtype)
            self._bin.write(np.ascontiguousarray(arr).tobytes(order="C"))
        self._num_tokens += int(arr.size)
        return int(arr.size)

    def finalize(self) -> None:
        """Write the index, fsync both files and rename them to their final names."""
        if self._done:
            return
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        with open(self._idx_tmp, "wb") as f:
            self._write_index(f)
            f.flush()
            os.fsync(f.fileno())
        bin_path, idx_path = data_file_path(self.prefix), index_file_path(self.prefix)
        # Remove an older index first: at any crash point either no .idx exists or both are new.
        idx_path.unlink(missing_ok=True)
        os.replace(self._bin_tmp, bin_path)
        os.replace(self._idx_tmp, idx_path)
        self._done = True

    def _write_index(self, f) -> None:
        """The .idx layout of the module docstring."""
        n = len(self._sizes)
        f.write(_HEADER.pack(MAGIC, VERSION, _CODE_OF[self.dtype], n, self._num_tokens, self.vocab_size))
        sizes = np.frombuffer(self._sizes, dtype=np.int32) if n else np.zeros(0, np.int32)
        f.write(sizes.astype("<i4", copy=False).tobytes())
        f.write(b"\x00" * (_offsets_start(n) - HEADER_SIZE - 4 * n))
        start = 0
        chunk = 1 << 20  # offsets written in chunks: memory stays at 8 MiB whatever N
        for i in range(0, n, chunk):
            part = sizes[i:i + chunk].astype(np.int64)
            offsets = np.cumsum(part) - part + start  # int64 [chunk]
            start = int(offsets[-1] + part[-1])
            f.write(offsets.astype("<i8", copy=False).tobytes())

    def abort(self) -> None:
        """Close and delete the temporary files (the final names are never touched)."""
        if self._done:
            return
        self._bin.close()
        self._bin_tmp.unlink(missing_ok=True)
        self._idx_tmp.unlink(missing_ok=True)
        self._done = True

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def _existing_files(prefix: str) -> tuple[Path, Path]:
    """(``PREFIX.idx``, ``PREFIX.bin``), or a one-line DataError naming the missing one."""
    idx, bin_ = index_file_path(prefix), data_file_path(prefix)
    for path in (idx, bin_):
        if not path.is_file():
            raise DataError(
                f"{path}: indexed dataset file not found; check the data prefix or create it with "
                "`megaforge preprocess --input FILE --output-prefix PREFIX`"
            )
    return idx, bin_


def _memmap(path: Path, dtype: np.dtype, offset: int, count: int) -> np.ndarray:
    """Read-only memmap of ``count`` items, or an empty array (mmap cannot map zero bytes)."""
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


class IndexedDataset:
    """Read-only view of ``PREFIX.bin``/``PREFIX.idx`` through numpy memmaps.

    ``ds[i]`` is document ``i`` as a 1-D array of ``ds.dtype`` (a view into the memmap);
    ``ds.sizes`` is the int32 array of document lengths. Pickles as its prefix, so DataLoader
    workers re-open the files instead of copying them.
    """

    def __init__(self, prefix: str | Path) -> None:
        prefix = str(prefix)
        if prefix.endswith((".bin", ".idx")) and not index_file_path(prefix).exists():
            prefix = prefix[:-4]  # accept 'corpus.bin' for 'corpus'
        self.prefix = prefix
        self._open()

    def _open(self) -> None:
        idx, bin_ = _existing_files(self.prefix)
        idx_size = idx.stat().st_size
        if idx_size < HEADER_SIZE:
            raise DataError(f"{idx}: index truncated ({idx_size} bytes, header needs {HEADER_SIZE}); {_REBUILD}")
        with open(idx, "rb") as f:
            magic, version, code, n, tokens, vocab = _HEADER.unpack(f.read(HEADER_SIZE))
        if magic != MAGIC:
            raise DataError(f"{idx}: neither a megaforge nor a Megatron-LM index file (bad magic bytes {magic!r}); "
                            f"{_REBUILD}")
        if version != VERSION:
            raise DataError(
                f"{idx}: unsupported index format version {version} (this megaforge reads {VERSION}); "
                f"upgrade megaforge or {_REBUILD}"
            )
        if code not in DTYPE_CODES:
            raise DataError(f"{idx}: unknown token dtype code {code} (corrupt index); {_REBUILD}")
        expected = index_file_size(n)
        if idx_size != expected:
            what = "truncated" if idx_size < expected else "has trailing bytes"
            raise DataError(f"{idx}: index {what} ({idx_size} bytes, expected {expected} for {n} documents); {_REBUILD}")
        self.dtype: np.dtype = DTYPE_CODES[code]
        bin_size = bin_.stat().st_size
        if bin_size != tokens * self.dtype.itemsize:
            raise DataError(
                f"{bin_}: size {bin_size} bytes does not match the index ({tokens} tokens × "
                f"{self.dtype.itemsize} bytes); the file is truncated or from another run; {_REBUILD}"
            )
        self.num_tokens: int = int(tokens)
        self.vocab_size: int | None = int(vocab) or None
        self.sizes: np.ndarray = _memmap(idx, np.dtype("<i4"), HEADER_SIZE, n)  # int32 [N]
        self.offsets: np.ndarray = _memmap(idx, np.dtype("<i8"), _offsets_start(n), n)  # int64 [N]
        if n and (int(self.offsets[0]) != 0 or int(self.offsets[-1]) + int(self.sizes[-1]) != tokens):
            raise DataError(f"{idx}: document offsets disagree with the token count (corrupt index); {_REBUILD}")
        self.tokens: np.ndarray = _memmap(bin_, self.dtype, 0, int(tokens))  # dtype [T]

    def __len__(self) -> int:
        return int(self.sizes.shape[0])

    def _check(self, i: int) -> int:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"document {i} out of range for {n} documents in {self.prefix}")
        return i

    def __getitem__(self, i: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = self._check(int(i))
        start = int(self.offsets[i])
        return self.tokens[start:start + int(self.sizes[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of document ``i`` (to its end when length is None)."""
        i = self._check(int(i))
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for document {i} of {size} tokens")
        start = int(self.offsets[i]) + offset
        return self.tokens[start:start + length]

    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.prefix = state["prefix"]
        self._open()

    def __repr__(self) -> str:
        return f"IndexedDataset({self.prefix!r}, documents={len(self)}, tokens={self.num_tokens}, dtype={self.dtype})"


def exists(prefix: str | Path) -> bool:
    """Whether both files of an indexed dataset exist (says nothing about their validity)."""
    return data_file_path(prefix).is_file() and index_file_path(prefix).is_file()
