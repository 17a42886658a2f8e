"""Megatron-LM's indexed datasets (``MMapIndexedDataset``, index version 1), read and written.

Megatron-LM, NeMo and GPT-NeoX store tokenized corpora as ``PREFIX.bin`` (token ids back to back)
plus ``PREFIX.idx``, little-endian::

    offset       size   field
    0            9      magic b"MMIDIDX\\x00\\x00"
    9            8      uint64 index version (1)
    17           1      uint8 dtype code (see DTYPE_CODES)
    18           8      uint64 number of sequences S
    26           8      uint64 number of document-index entries D + 1 (D documents)
    34           4·S    int32 sequence lengths, in tokens
    34+4S        8·S    int64 sequence pointers: byte offsets into .bin
    34+12S       8·(D+1) int64 document index: document d holds sequences [doc[d], doc[d+1])
    34+12S+8D+8  0 or S int8 sequence modes (multimodal datasets only; ignored here)

A document is one sequence when it was preprocessed whole (GPT); with ``--split-sentences`` (BERT)
each sentence is a sequence. megaforge reads a Megatron dataset as its documents (the sentences of
one document back to back; :attr:`MegatronIndexedDataset.sequence_lengths` keeps the split) through
the same interface as its own format, and writes the format with :class:`MegatronIndexedDatasetWriter`
(``megaforge preprocess --output-format megatron``). Opening checks, each a one-line DataError: the
header (magic, version, an integer dtype), the index size against its counts, the data size
against the last pointer, the document index's ends, and — one pass over the index — that the
sequences lie back to back as Megatron's preprocessing writes them.
"""

from __future__ import annotations

import struct
from array import array
from pathlib import Path
from typing import Sequence

import numpy as np

from toolkit.data.indexed import (
    _REBUILD,
    IndexedDataset,
    IndexedDatasetWriter,
    _existing_files,
    _memmap,
    index_file_path,
)
from toolkit.data.indexed import DTYPE_CODES as NATIVE_CODES
from toolkit.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, document-index entries
HEADER_SIZE = _HEADER.size  # 34 bytes

#: Megatron's integer DType codes (megatron.core.datasets.indexed_dataset.DType): megaforge's own codes
#: were chosen to agree, less 9 (uint32), which Megatron lacks; its 6 and 7 are float64/float32
DTYPE_CODES: dict[int, np.dtype] = {code: dt for code, dt in NATIVE_CODES.items() if code != 9}
_FLOAT_CODES = {6: "float64", 7: "float32"}
_CODE_OF = {dt: code for code, dt in DTYPE_CODES.items()}


def is_megatron_index(prefix: str | Path) -> bool:
    """Whether ``PREFIX.idx`` starts with Megatron's magic bytes."""
    try:
        with open(index_file_path(prefix), "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def open_indexed(prefix: str | Path) -> IndexedDataset:
    """The dataset at ``prefix`` in whichever format its ``.idx`` is: megaforge's or Megatron-LM's."""
    prefix = str(prefix)
    if prefix.endswith((".bin", ".idx")) and not index_file_path(prefix).exists():
        prefix = prefix[:-4]
    return MegatronIndexedDataset(prefix) if is_megatron_index(prefix) else IndexedDataset(prefix)


class MegatronIndexedDataset(IndexedDataset):
    """A Megatron-LM ``.bin``/``.idx`` pair seen as documents: ``ds[i]`` is document ``i``'s tokens
    (all its sequences), ``ds.sizes`` the document lengths, as for :class:`IndexedDataset`; plus
    Megatron's own ``sequence_lengths`` [S] and ``document_index`` [D + 1]."""

    def _open(self) -> None:
        idx, bin_ = _existing_files(self.prefix)
        idx_size = idx.stat().st_size
        if idx_size < HEADER_SIZE:
            raise DataError(f"{idx}: Megatron index truncated ({idx_size} bytes, header needs {HEADER_SIZE}); {_REBUILD}")
        with open(idx, "rb") as f:
            magic, version, code, n_seq, n_doc_idx = _HEADER.unpack(f.read(HEADER_SIZE))
        if magic != MAGIC:
            raise DataError(f"{idx}: not a Megatron-LM index file (bad magic bytes {magic!r})")
        if version != VERSION:
            raise DataError(f"{idx}: Megatron index version {version} is not supported (megaforge reads {VERSION})")
        if code in _FLOAT_CODES:
            raise DataError(f"{idx}: holds {_FLOAT_CODES[code]} values, not token ids; megaforge trains on token datasets")
        if code not in DTYPE_CODES:
            raise DataError(f"{idx}: unknown Megatron dtype code {code} (corrupt index); {_REBUILD}")
        if n_doc_idx < 1:
            raise DataError(f"{idx}: the document index is empty (corrupt index); {_REBUILD}")
        expected = HEADER_SIZE + 12 * n_seq + 8 * n_doc_idx
        if idx_size not in (expected, expected + n_seq):  # + int8 modes in multimodal datasets
            what = "truncated" if idx_size < expected else "has trailing bytes"
            raise DataError(f"{idx}: Megatron index {what} ({idx_size} bytes, expected {expected} for {n_seq} sequences "
                            f"and {n_doc_idx - 1} documents); {_REBUILD}")
        self.dtype: np.dtype = DTYPE_CODES[code]
        item = self.dtype.itemsize
        lengths = _memmap(idx, np.dtype("<i4"), HEADER_SIZE, n_seq)  # int32 [S]
        pointers = _memmap(idx, np.dtype("<i8"), HEADER_SIZE + 4 * n_seq, n_seq)  # int64 [S], bytes
        doc_index = _memmap(idx, np.dtype("<i8"), HEADER_SIZE + 12 * n_seq, n_doc_idx)  # int64 [D + 1]
        if n_seq and int(lengths.min()) < 0:
            raise DataError(f"{idx}: a sequence length is negative ({int(lengths.min())}; corrupt index); {_REBUILD}")
        bin_size = bin_.stat().st_size
        end = int(pointers[-1]) + int(lengths[-1]) * item if n_seq else 0
        if n_seq and (int(pointers[0]) != 0 or end != bin_size):
            raise DataError(f"{bin_}: size {bin_size} bytes does not match the Megatron index (its last sequence ends "
                            f"at byte {end}); the file is truncated or from another dataset; {_REBUILD}")
        if int(doc_index[0]) != 0 or int(doc_index[-1]) != n_seq:
            raise DataError(f"{idx}: the document index must run from 0 to {n_seq} sequences, got "
                            f"{int(doc_index[0])}..{int(doc_index[-1])} (corrupt index); {_REBUILD}")
        starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])  # int64 [S + 1], in tokens
        if not np.array_equal(pointers, starts[:-1] * item):
            raise DataError(f"{idx}: the sequences are not stored back to back in {bin_.name}; megaforge reads "
                            "Megatron datasets as Megatron's preprocessing writes them")
        if np.any(np.diff(doc_index) < 0):
            raise DataError(f"{idx}: the document index decreases (corrupt index); {_REBUILD}")
        sizes = starts[doc_index[1:]] - starts[doc_index[:-1]]  # int64 [D]: tokens per document
        if sizes.size and sizes.max() > np.iinfo(np.int32).max:
            raise DataError(f"{idx}: a document exceeds 2^31 tokens")
        self.sequence_lengths: np.ndarray = lengths
        self.document_index: np.ndarray = doc_index
        self.num_tokens: int = int(starts[-1])
        self.vocab_size: int | None = None  # Megatron's index does not record it
        self.sizes: np.ndarray = sizes.astype(np.int32)  # int32 [D]
        self.offsets: np.ndarray = starts[doc_index[:-1]]  # int64 [D], in tokens
        self.tokens: np.ndarray = _memmap(bin_, self.dtype, 0, self.num_tokens)  # dtype [T]

    def __repr__(self) -> str:
        return (f"MegatronIndexedDataset({self.prefix!r}, documents={len(self)}, sequences={len(self.sequence_lengths)}, "
                f"tokens={self.num_tokens}, dtype={self.dtype})")


class MegatronIndexedDatasetWriter(IndexedDatasetWriter):
    """Write Megatron-LM's format: each document one sequence, or several with ``sequence_lengths``
    (sentences, as Megatron's ``--split-sentences`` writes for BERT). Same temporary-name and rename
    discipline as :class:`IndexedDatasetWriter`."""

    def __init__(self, prefix: str | Path, dtype: np.dtype | type | str = np.uint16, *,
                 vocab_size: int | None = None) -> None:
        if np.dtype(dtype) not in _CODE_OF:
            raise DataError(f"Megatron-LM datasets hold {', '.join(str(d) for d in DTYPE_CODES.values())} token ids, "
                            f"not {np.dtype(dtype)}")
        super().__init__(prefix, dtype, vocab_size=vocab_size)
        self._doc_ends = array("q", [0])  # the document index: sequences written at each document end

    @property
    def num_documents(self) -> int:
        return len(self._doc_ends) - 1

    def add_document(self, ids: np.ndarray | Sequence[int], sequence_lengths: Sequence[int] | None = None) -> None:
        """One document: its tokens as one sequence (none when empty, as Megatron writes an empty
        document), or split into ``sequence_lengths`` (summing to its length)."""
        tokens = np.asarray(ids).reshape(-1)
        if sequence_lengths is None:
            sequence_lengths = [tokens.size] if tokens.size else []
        lengths = self._check_lengths(tokens, sequence_lengths)
        self._write(tokens)
        self._sizes.extend(lengths.astype(np.int32).tolist())
        self._doc_ends.append(len(self._sizes))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray | Sequence[int]) -> None:
        """Several one-sequence documents: ``tokens`` back to back, split by ``lengths``."""
        before = len(self._sizes)
        super().add_documents(tokens, lengths)
        self._doc_ends.extend(range(before + 1, len(self._sizes) + 1))

    def _write_index(self, f) -> None:
        n = len(self._sizes)
        f.write(_HEADER.pack(MAGIC, VERSION, _CODE_OF[self.dtype], n, len(self._doc_ends)))
        sizes = np.frombuffer(self._sizes, dtype=np.int32) if n else np.zeros(0, np.int32)
        f.write(sizes.astype("<i4", copy=False).tobytes())
        start = 0
        chunk = 1 << 20  # pointers written in chunks: memory stays at 8 MiB whatever S
        for i in range(0, n, chunk):
            part = sizes[i:i + chunk].astype(np.int64) * self.dtype.itemsize  # bytes per sequence
            pointers = np.cumsum(part) - part + start  # int64 [chunk], byte offsets
            start = int(pointers[-1] + part[-1])
            f.write(pointers.astype("<i8", copy=False).tobytes())
        f.write(np.frombuffer(self._doc_ends, dtype=np.int64).astype("<i8", copy=False).tobytes())
