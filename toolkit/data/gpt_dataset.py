"""GPT pretraining dataset: documents packed into ``seq_length + 1`` token windows (Megatron semantics).

Three index arrays, built with numpy from a seed and cached as ``.npy`` files:

* ``doc_idx`` (int64 [epochs × docs]): the split's document ids, once per epoch, each epoch shuffled
  with ``np.random.RandomState(seed)`` (a frozen, version-stable stream). As many epochs as needed
  to cover ``num_samples × seq_length + 1`` tokens.
* ``sample_idx`` (int64 [num_samples + 1, 2]): ``(position in doc_idx, token offset)`` where sample
  ``j`` starts; sample ``j`` is the ``seq_length + 1`` tokens from ``sample_idx[j]`` through
  ``sample_idx[j + 1]`` inclusive, so consecutive samples share one token and documents are packed
  across boundaries (the stream of ``doc_idx`` documents, back to back).
* ``shuffle_idx`` (int64 [num_samples]): a permutation of the samples, from the same generator.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from toolkit.data.blending import build_blended_splits
from toolkit.data.indexed import IndexedDataset
from toolkit.errors import ConfigError, DataError

log = logging.getLogger(__name__)

INDEX_VERSION = 1  # bump when the index construction changes: invalidates every cache


def build_indices(sizes: np.ndarray, documents: np.ndarray, num_samples: int, seq_length: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(doc_idx, sample_idx, shuffle_idx)`` for ``documents`` (ids into ``sizes``, int32 [N])."""
    docs = np.asarray(documents, dtype=np.int64)  # int64 [D]
    tokens_per_epoch = int(np.asarray(sizes)[docs].astype(np.int64).sum()) if docs.size else 0
    needed = num_samples * seq_length + 1
    if tokens_per_epoch == 0:
        raise DataError(f"the split has no tokens ({docs.size} documents); use more data or change data.splits_string")
    num_epochs = max(1, -(-needed // tokens_per_epoch))
    rng = np.random.RandomState(seed % 2**32)
    doc_idx = np.empty(num_epochs * docs.size, dtype=np.int64)  # int64 [E × D]
    for e in range(num_epochs):
        perm = docs.copy()
        rng.shuffle(perm)
        doc_idx[e * docs.size:(e + 1) * docs.size] = perm
    # starts[k] = global token position where doc_idx[k] begins in the packed stream
    starts = np.zeros(doc_idx.size + 1, dtype=np.int64)  # int64 [E × D + 1]
    np.cumsum(np.asarray(sizes)[doc_idx], out=starts[1:])
    pos = np.arange(num_samples + 1, dtype=np.int64) * seq_length  # int64 [S + 1]
    doc_pos = np.searchsorted(starts, pos, side="right") - 1  # the document holding each position
    sample_idx = np.stack([doc_pos, pos - starts[doc_pos]], axis=1).astype(np.int64)  # int64 [S + 1, 2]
    shuffle_idx = rng.permutation(num_samples).astype(np.int64)  # int64 [S]
    return doc_idx, sample_idx, shuffle_idx


def _cache_key(prefix: str, docs: np.ndarray, doc_sizes: np.ndarray, num_samples: int, seq_length: int,
               seed: int) -> str:
    desc = {
        "version": INDEX_VERSION,
        "prefix": str(Path(prefix).resolve()),
        "documents": hashlib.sha256(np.ascontiguousarray(docs, dtype="<i8").tobytes()).hexdigest(),
        "sizes": hashlib.sha256(np.ascontiguousarray(doc_sizes, dtype="<i4").tobytes()).hexdigest(),
        "num_samples": int(num_samples),
        "seq_length": int(seq_length),
        "seed": int(seed),
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:20]


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class GPTDataset:
    """``num_samples`` packed windows of ``seq_length + 1`` tokens from ``documents`` of ``indexed``.

    ``ds[i] == {"tokens": np.ndarray int64 [seq_length + 1]}``; the model trains on
    ``tokens[:-1] → tokens[1:]``. Identical arguments always give identical samples. The index is
    cached in ``cache_dir`` (default: the folder of the data prefix) and reused when present.
    """

    def __init__(self, indexed: IndexedDataset, documents: Sequence[int] | np.ndarray, num_samples: int,
                 seq_length: int, seed: int, *, cache_dir: str | Path | None = None, name: str = "train") -> None:
        if num_samples <= 0 or seq_length <= 0:
            raise ConfigError(f"GPTDataset needs num_samples > 0 and seq_length > 0, got {num_samples}, {seq_length}")
        self.indexed, self.name = indexed, name
        self.num_samples, self.seq_length, self.seed = int(num_samples), int(seq_length), int(seed)
        self.documents = np.asarray(documents, dtype=np.int64)  # int64 [D]
        if self.documents.size and (self.documents.min() < 0 or self.documents.max() >= len(indexed)):
            raise DataError(f"{indexed.prefix}: document ids out of range for {len(indexed)} documents")
        doc_sizes = np.asarray(indexed.sizes)[self.documents]  # int32 [D]
        key = _cache_key(indexed.prefix, self.documents, doc_sizes, num_samples, seq_length, seed)
        folder = Path(cache_dir) if cache_dir is not None else Path(indexed.prefix).resolve().parent
        stem = f"{Path(indexed.prefix).name}.gpt-{key}"
        self.cache_paths = {k: folder / f"{stem}.{k}.npy" for k in ("doc_idx", "sample_idx", "shuffle_idx")}
        self.loaded_from_cache = self._load_cache()
        if not self.loaded_from_cache:
            self.doc_idx, self.sample_idx, self.shuffle_idx = build_indices(
                indexed.sizes, self.documents, self.num_samples, self.seq_length, self.seed)
            self._save_cache(folder)

    def _load_cache(self) -> bool:
        if not all(p.is_file() for p in self.cache_paths.values()):
            return False
        try:
            arrays = {k: np.load(p, mmap_mode="r", allow_pickle=False) for k, p in self.cache_paths.items()}
        except (ValueError, OSError, EOFError) as e:
            log.warning("ignoring unreadable sample-index cache %s (%s); rebuilding", self.cache_paths["doc_idx"], e)
            return False
        ok = (arrays["sample_idx"].shape == (self.num_samples + 1, 2) and arrays["shuffle_idx"].shape == (self.num_samples,)
              and arrays["doc_idx"].ndim == 1)
        if not ok:
            log.warning("ignoring sample-index cache %s with unexpected shapes; rebuilding", self.cache_paths["doc_idx"])
            return False
        self.doc_idx, self.sample_idx, self.shuffle_idx = arrays["doc_idx"], arrays["sample_idx"], arrays["shuffle_idx"]
        return True

    def _save_cache(self, folder: Path) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for k in ("doc_idx", "sample_idx", "shuffle_idx"):
                _atomic_save(self.cache_paths[k], getattr(self, k))
        except OSError as e:
            log.warning("cannot cache the %s sample index in %s (%s); set data.index_cache_dir to a writable folder",
                        self.name, folder, e)

    def __len__(self) -> int:
        return self.num_samples

    def sample_at(self, j: int) -> np.ndarray:
        """Unshuffled sample ``j`` (position in ``sample_idx``): int64 [seq_length + 1]."""
        d0, o0 = (int(x) for x in self.sample_idx[j])
        d1, o1 = (int(x) for x in self.sample_idx[j + 1])
        get, doc = self.indexed.get, self.doc_idx
        if d0 == d1:
            parts = [get(int(doc[d0]), o0, o1 - o0 + 1)]
        else:
            parts = [get(int(doc[d0]), o0)]
            parts += [self.indexed[int(doc[d])] for d in range(d0 + 1, d1)]
            parts.append(get(int(doc[d1]), 0, o1 + 1))
        return np.concatenate(parts).astype(np.int64)  # int64 [seq_length + 1]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if i < 0:
            i += self.num_samples
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        return {"tokens": self.sample_at(int(self.shuffle_idx[i]))}

    def __repr__(self) -> str:
        return (f"GPTDataset({self.name}: {self.num_samples} samples × {self.seq_length + 1} tokens from "
                f"{self.documents.size} documents of {self.indexed.prefix})")


def build_gpt_datasets(data_prefix: Sequence[Any] | str, *, splits_string: str, seq_length: int, seed: int,
                       num_samples: tuple[int, int, int], cache_dir: str | Path | None = None
                       ) -> tuple[Any | None, Any | None, Any | None]:
    """(train, valid, test) :class:`GPTDataset` splits from ``data.data_prefix`` (a
    :class:`BlendedDataset` per split over several weighted corpora; see
    :func:`~toolkit.data.blending.build_blended_splits`). A split is None when ``num_samples`` for
    it is 0 or no corpus has documents in it.
    """
    return build_blended_splits(
        data_prefix, splits_string=splits_string, num_samples=num_samples, seed=seed,
        make=lambda indexed, docs, n, name: GPTDataset(indexed, docs, n, seq_length, seed, cache_dir=cache_dir,
                                                       name=name))
