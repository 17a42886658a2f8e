"""Tokenize jsonl/text corpora into an indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``).

Documents stream from the readers in :mod:`toolkit.data.readers`, are tokenized in batches and are
written in input order by :class:`IndexedDatasetWriter` as results arrive. Two ways to tokenize:

* **Thread-parallel tokenizers** (``Tokenizer.threaded_batch``: Hugging Face ``tokenizers``, whose
  ``encode_batch`` runs on its own Rust thread pool of ``RAYON_NUM_THREADS`` threads, and
  SentencePiece, whose batch ``encode`` runs on its own C++ threads, both with the GIL released):
  one process. A background thread tokenizes batch *k+1* while this thread parses batch *k+2*, packs
  the ids of batch *k* into arrays and writes them, so reading, JSON parsing, packing and writing
  hide behind tokenizing. ``workers`` starts no processes here (a pool of N processes each running N
  threads would oversubscribe the cores); ``megaforge preprocess --workers N`` sets
  ``RAYON_NUM_THREADS=N`` before the first batch (:func:`set_tokenizer_threads`).
* **Other tokenizers** (custom Python ones): in this process with ``workers=1``, else in a
  ``multiprocessing`` pool whose workers each load the tokenizer once.

Memory is flat in corpus size: at most :data:`THREAD_WINDOW` batches (thread-parallel tokenizers) or
``workers ×`` :data:`IN_FLIGHT_PER_WORKER` batches (pool) are in flight — parsed but not yet
written — plus the one being written; a batch holds at most :data:`THREADED_BATCH_DOCUMENTS`
(threads) or :data:`BATCH_DOCUMENTS` (pool) documents and :data:`BATCH_CHARS` characters (a longer
document is a batch of its own), so with the shipped tokenizers the peak RSS grows by ~70 MiB
whatever the corpus size; beyond that only the index's 4 bytes per document grow. The output
bytes do not depend on ``workers`` or the batch sizes.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import os
import pickle
import shutil
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from toolkit.data.indexed import IndexedDatasetWriter, best_dtype
from toolkit.data.megatron_indexed import MegatronIndexedDatasetWriter
from toolkit.data.readers import iter_documents
from toolkit.errors import DataError, TokenizerError
from toolkit.tokenization.base import Tokenizer

log = logging.getLogger(__name__)

BATCH_DOCUMENTS = 64  # documents per batch sent to a pool worker
THREADED_BATCH_DOCUMENTS = 1024  # documents per batch of a thread-parallel tokenizer (more: better balanced threads)
BATCH_CHARS = 1 << 20  # characters per batch at most (a longer document is a batch of its own): bounds memory
IN_FLIGHT_PER_WORKER = 4  # batches queued per pool worker: bounds memory
THREAD_WINDOW = 2  # batches in flight with a thread-parallel tokenizer: one tokenizing, one parsed ahead


def set_tokenizer_threads(threads: int) -> None:
    """Have thread-parallel tokenizers (Hugging Face ``tokenizers``) tokenize on ``threads`` threads.

    Sets ``RAYON_NUM_THREADS``, which the library reads once, when it first tokenizes a batch in
    parallel: call this before (``megaforge preprocess --workers N`` does). Without it the library
    uses one thread per core.
    """
    os.environ["RAYON_NUM_THREADS"] = str(max(1, int(threads)))


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
        return self.pack(self.tokenizer.encode_batch(texts))

    def pack(self, ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """The ids of a batch's documents as ``(tokens, lengths)``."""
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))  # int64 [batch]
        if self.eod is not None:
            lengths[lengths > 0] += 1  # an empty document stays empty (skipped by the caller); no EOD
            eod = [self.eod]
            ids = itertools.chain.from_iterable((x, eod) if len(x) else (x,) for x in ids)
        # one pass over the ids straight into an array: no intermediate Python list of all tokens
        tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
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


def _batched(docs: Iterable[str], size: int, skipped: list[int], chars: int) -> Iterator[list[str]]:
    """Non-blank documents in lists of at most ``size`` documents and (but for a longer document,
    alone in its list) ``chars`` characters; blank ones are counted in ``skipped[0]``."""
    batch: list[str] = []
    held = 0
    for text in docs:
        if not text.strip():
            skipped[0] += 1
            continue
        if batch and held + len(text) > chars:
            yield batch
            batch, held = [], 0
        batch.append(text)
        held += len(text)
        if len(batch) == size:
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


def _ordered_map(submit: Callable[[Callable, Any], Callable[[], Any]], fn: Callable, items: Iterable,
                 window: int) -> Iterator[Any]:
    """``fn(item)`` for each item, in input order, computed by ``submit(fn, item)`` (which starts the
    work and returns a function that waits for its result), never more than ``window`` pending.

    Unlike ``Pool.imap``, whose feeder thread drains its input eagerly (the whole corpus in memory
    when tokenizing is slower than reading), this reads an item only when a slot is free.
    """
    pending: deque = deque()
    for item in items:
        pending.append(submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft()()
    while pending:
        yield pending.popleft()()


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
        workers: tokenizer processes for tokenizers that are not thread-parallel; 1 tokenizes in this
            process. A thread-parallel tokenizer (``threaded_batch``) always tokenizes in this process,
            on ``RAYON_NUM_THREADS`` threads (see :func:`set_tokenizer_threads`).
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
    threaded = bool(getattr(tok, "threaded_batch", False))
    batches = _batched(docs, THREADED_BATCH_DOCUMENTS if threaded else BATCH_DOCUMENTS, skipped, BATCH_CHARS)
    tmp: list[str] = []
    pool = None
    thread = None
    if output_format not in WRITERS:
        raise DataError(f"output format {output_format!r} is not one of {', '.join(WRITERS)}")
    writer = WRITERS[output_format](output_prefix, dtype, vocab_size=tok.vocab_size)
    bar = tqdm(desc=f"preprocess {Path(output_prefix).name}", unit="doc", unit_scale=True, disable=not progress)
    try:
        results: Iterator[tuple[np.ndarray, np.ndarray]]
        if threaded:  # tokenize on a background thread (the library's threads) while this one reads, packs, writes
            thread = ThreadPoolExecutor(1, thread_name_prefix="megaforge-tokenize")
            encoder = _Encoder(tok, eod, dtype)
            ids = _ordered_map(lambda fn, b: thread.submit(fn, b).result, tok.encode_batch, batches, THREAD_WINDOW)
            results = map(encoder.pack, ids)
        elif workers <= 1:
            encoder = _Encoder(tok, eod, dtype)
            results = (encoder(b) for b in batches)
        else:
            spec = _worker_spec(tokenizer, tmp)
            pool = mp.get_context(mp_context).Pool(workers, initializer=_init_worker, initargs=(spec, eod, dtype.str))
            results = _ordered_map(lambda fn, b: pool.apply_async(fn, (b,)).get, _encode_in_worker, batches,
                                   workers * IN_FLIGHT_PER_WORKER)
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
        if thread is not None:
            thread.shutdown(wait=True, cancel_futures=True)  # waits for the batch being tokenized, if any
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
