"""Tokenize jsonl/text corpora into an indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``).

Documents stream from the readers in :mod:`toolkit.data.readers`, are tokenized in batches
(in-process with ``workers=1``, else in a ``multiprocessing`` pool whose workers each load the
tokenizer once), and are written in input order by :class:`IndexedDatasetWriter` as results arrive.
At most ``workers × 4`` batches are in flight, so memory stays flat however large the corpus; the
output bytes do not depend on ``workers``.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import pickle
import shutil
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from toolkit.data.indexed import IndexedDatasetWriter, best_dtype
from toolkit.data.megatron_indexed import MegatronIndexedDatasetWriter
from toolkit.data.readers import iter_documents
from toolkit.errors import DataError, TokenizerError
from toolkit.tokenization.base import Tokenizer

log = logging.getLogger(__name__)

BATCH_DOCUMENTS = 64  # documents per task sent to a worker
IN_FLIGHT_PER_WORKER = 4  # tasks queued per worker: bounds memory


def _load(spec: Tokenizer | str | Path) -> Tokenizer:
    if isinstance(spec, Tokenizer):
        return spec
    from toolkit.tokenization import load_tokenizer  # lazy: the data layer needs no tokenizer library

    return load_tokenizer(str(spec))


class _Encoder:
    """Tokenizes a batch of texts into ``(tokens, lengths)``: the documents' ids back to back in the
    output dtype (EOD appended after each non-empty document) and one length per text (0 = empty)."""

    def __init__(self, tokenizer: Tokenizer, eod: int | None, dtype: np.dtype) -> None:
        self.tokenizer, self.eod, self.dtype = tokenizer, eod, np.dtype(dtype)
        info = np.iinfo(self.dtype)
        self.lo, self.hi = info.min, info.max

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        flat: list[int] = []
        lengths = np.zeros(len(texts), dtype=np.int64)  # int64 [batch]
        for k, ids in enumerate(self.tokenizer.encode_batch(texts)):
            if not len(ids):
                continue  # empty after tokenization: skipped by the caller
            flat.extend(ids)
            if self.eod is not None:
                flat.append(self.eod)
            lengths[k] = len(ids) + (self.eod is not None)
        tokens = np.asarray(flat, dtype=np.int64)  # int64 [sum(lengths)]
        if tokens.size and (int(tokens.min()) < self.lo or int(tokens.max()) > self.hi):
            bad = int(tokens.max()) if int(tokens.max()) > self.hi else int(tokens.min())
            raise TokenizerError(f"token id {bad} does not fit the output dtype {self.dtype}; "
                                 "the tokenizer's vocab_size is wrong")
        return tokens.astype(self.dtype), lengths


_worker_encoder: _Encoder | None = None


def _init_worker(spec: Tokenizer | str, eod: int | None, dtype: str) -> None:
    global _worker_encoder
    _worker_encoder = _Encoder(_load(spec), eod, np.dtype(dtype))


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _worker_encoder is not None, "worker not initialized"
    return _worker_encoder(texts)


def _batched(docs: Iterable[str], size: int, skipped: list[int]) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in docs:
        if not text.strip():
            skipped[0] += 1
            continue
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _ordered_map(pool, fn: Callable, items: Iterable, window: int) -> Iterator[Any]:
    """Like ``pool.imap`` (results in input order) but never more than ``window`` tasks pending.

    ``Pool.imap`` drains its input iterator eagerly in a feeder thread, which would read the whole
    corpus into memory when tokenizing is slower than reading; this keeps memory bounded.
    """
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _worker_spec(tokenizer: Tokenizer | str | Path, tmp: list) -> Tokenizer | str:
    """What workers load the tokenizer from: its path/name (or the ``path`` it was loaded from), the
    object itself if it pickles, or a copy saved to a temporary folder (loaded with ``load_tokenizer``)."""
    if not isinstance(tokenizer, Tokenizer):
        return str(tokenizer)
    if getattr(tokenizer, "path", None) is not None:
        return str(tokenizer.path)  # loaded from files: workers load the same files
    try:
        pickle.dumps(tokenizer)
        return tokenizer
    except Exception:
        folder = tempfile.mkdtemp(prefix="megaforge-tok-")
        tmp.append(folder)
        tokenizer.save(folder)
        return folder


#: ``--output-format`` → the writer of that index format
WRITERS = {"megaforge": IndexedDatasetWriter, "megatron": MegatronIndexedDatasetWriter}


def preprocess(
    inputs: list[str | Path] | str | Path,
    output_prefix: str | Path,
    tokenizer: Tokenizer | str,
    *,
    json_key: str = "text",
    fmt: str = "auto",
    workers: int = 1,
    append_eod: bool = True,
    progress: bool = True,
    mp_context: str = "spawn",
    output_format: str = "megaforge",
) -> dict[str, Any]:
    """Tokenize ``inputs`` into ``OUTPUT_PREFIX.bin``/``.idx``.

    Args:
        inputs: jsonl, text, Parquet or MIMIC CSV files, or ``datasets`` save_to_disk folders, read in
            the order given (:data:`toolkit.data.readers.READERS`).
        output_prefix: written as ``PREFIX.bin`` and ``PREFIX.idx`` (parent folders created).
        tokenizer: a :class:`Tokenizer`, or a path/name for ``toolkit.tokenization.load_tokenizer``.
        json_key: the field holding the text in jsonl records.
        fmt: "auto" (by file extension) or a key of :data:`toolkit.data.readers.READERS`.
        workers: tokenizer processes; 1 tokenizes in this process.
        append_eod: append ``tokenizer.eod_id`` after every document.
        progress: show a tqdm bar (documents/s and tokens).
        mp_context: multiprocessing start method for the pool.
        output_format: "megaforge" (the native index) or "megatron" (Megatron-LM's ``MMIDIDX`` index,
            one sequence per document, which Megatron-LM, NeMo and GPT-NeoX read as they are).

    Returns:
        ``{"documents", "tokens", "seconds", "skipped", "prefix", "dtype"}``; ``tokens`` counts EODs.
        Empty documents (blank text, or no tokens) are skipped and counted in ``skipped``.

    Raises:
        DataError: a missing input file, an invalid JSON line or a missing key (file:line named).
        TokenizerError: ``append_eod`` with a tokenizer that has no ``eod_id``.
    """
    from tqdm.auto import tqdm

    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    start = time.perf_counter()
    tok = _load(tokenizer)
    eod = tok.eod_id if append_eod else None
    if append_eod and eod is None:
        raise TokenizerError(
            f"tokenizer {tokenizer!r} has no end-of-document token (eod_id); add one or pass append_eod=False"
        )
    dtype = best_dtype(tok.vocab_size)
    skipped = [0]
    docs = iter_documents(list(inputs), fmt=fmt, json_key=json_key)
    batches = _batched(docs, BATCH_DOCUMENTS, skipped)
    tmp: list[str] = []
    pool = None
    if output_format not in WRITERS:
        raise DataError(f"output format {output_format!r} is not one of {', '.join(WRITERS)}")
    writer = WRITERS[output_format](output_prefix, dtype, vocab_size=tok.vocab_size)
    bar = tqdm(desc=f"preprocess {Path(output_prefix).name}", unit="doc", unit_scale=True, disable=not progress)
    try:
        if workers <= 1:
            encoder = _Encoder(tok, eod, dtype)
            results: Iterator[tuple[np.ndarray, np.ndarray]] = (encoder(b) for b in batches)
        else:
            spec = _worker_spec(tokenizer, tmp)
            pool = mp.get_context(mp_context).Pool(workers, initializer=_init_worker, initargs=(spec, eod, dtype.str))
            results = _ordered_map(pool, _encode_in_worker, batches, workers * IN_FLIGHT_PER_WORKER)
        for tokens, lengths in results:
            nonempty = lengths > 0
            skipped[0] += int(lengths.size - nonempty.sum())
            writer.add_documents(tokens, lengths[nonempty])
            bar.update(len(lengths))
            bar.set_postfix(tokens=f"{writer.num_tokens:,}", refresh=False)
        writer.finalize()
    except BaseException:
        writer.abort()
        if pool is not None:
            pool.terminate()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
        for folder in tmp:
            shutil.rmtree(folder, ignore_errors=True)
    stats = {
        "documents": writer.num_documents,
        "tokens": writer.num_tokens,
        "seconds": time.perf_counter() - start,
        "skipped": skipped[0],
        "prefix": str(output_prefix),
        "dtype": str(dtype),
        "format": output_format,
    }
    log.info("preprocessed %d documents (%d tokens, %d skipped) into %s.{bin,idx} in %.1fs",
             stats["documents"], stats["tokens"], stats["skipped"], output_prefix, stats["seconds"])
    return stats
