"""BERT pretraining dataset (Megatron semantics): sentence pairs with masked-LM targets.

Preprocessing writes one token stream per document (ending with the tokenizer's EOD, ``[SEP]``
for WordPiece), so the dataset first cuts documents into **segments** ("sentences"):

* a segment ends after a sentence-ending punctuation token (``.``, ``!``, ``?`` by default —
  BERT's pre-tokenizer makes each a token of its own);
* a segment longer than ``max_segment_tokens`` (default ``(seq_length - 3) // 2``, so two always
  fit one sample) is cut into chunks of that length;
* the trailing EOD token of a document is dropped.

Samples are then built as Megatron does: walking each document's segments, consecutive segments
are grouped until they reach a target length (``seq_length - 3``, or with probability
``short_seq_prob`` a random length in ``[2, seq_length - 3]``); a group needs two segments when
the binary head is on. One such pass over the split is an epoch; each epoch draws new target
lengths and is shuffled; epochs are appended until ``num_samples`` groups exist. The segment table
and the sample table are built with numpy from the seed and cached next to the data.

Sample ``i`` is a pure function of ``(seed, i)`` and those tables (its RNG is
``RandomState([seed, i])``), so a resumed run sees exactly the samples it would have seen:

* the group is split at a random segment boundary into A and B; with probability 0.5 the pair is
  made "random" (label 1): ``pair_task="sop"`` swaps A and B (Megatron-BERT's sentence-order task),
  ``"nsp"`` replaces B by segments from another document (original BERT's next-sentence task);
  a run takes it from ``data.bert_pair_task``;
* the pair is truncated to ``seq_length - 3`` tokens by dropping tokens from the longer side, at
  its front or back at random, and laid out as ``[CLS] A [SEP] B [SEP]`` with token types 0 for
  ``[CLS] A [SEP]`` and 1 for ``B [SEP]`` (without the binary head: ``[CLS] A [SEP]``, all type 0);
* ``round(masked_lm_prob × n)`` of the ``n`` non-special tokens (at least one) are chosen —
  whole words (a token and its ``##`` continuations) with ``whole_word_masking`` — and replaced by
  ``[MASK]`` 80%, a random non-special token 10%, or kept 10% of the time;
* the sample is right-padded with ``[PAD]`` to ``seq_length``.

``ds[i]`` is ``{"tokens", "token_types", "labels", "padding_mask"}`` (int64 ``[seq_length]``;
labels are -100 except at masked positions; padding_mask is 1 on real tokens) plus ``"is_random"``
(int64 scalar, 0 when B truly follows A).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from toolkit.data.blending import build_blended_splits
from toolkit.data.gpt_dataset import _atomic_save
from toolkit.data.indexed import IndexedDataset
from toolkit.errors import ConfigError, DataError

log = logging.getLogger(__name__)

INDEX_VERSION = 1  # bump when the segment or sample tables change: invalidates every cache
IGNORE_INDEX = -100
PAIR_TASKS = ("sop", "nsp")
SENTENCE_END = (".", "!", "?")


class NoSamplesError(DataError):
    """No document of a split has enough segments for one sample."""


@dataclass(frozen=True)
class BertTokenInfo:
    """What the dataset needs to know about the tokenizer (ids only, so it pickles cheaply)."""

    cls_id: int
    sep_id: int
    mask_id: int
    pad_id: int
    vocab_size: int
    eod_id: int | None = None  # dropped from the end of documents
    boundary_ids: tuple[int, ...] = ()  # segments end after these tokens
    continuation: np.ndarray | None = field(default=None, compare=False)  # bool [vocab]: piece continues a word
    special_ids: tuple[int, ...] = ()  # never masked, never drawn as random replacements

    @classmethod
    def from_tokenizer(cls, tok: Any) -> "BertTokenInfo":
        missing = [n for n in ("cls", "sep", "mask", "pad") if getattr(tok, f"{n}_id", None) is None]
        if missing:
            raise ConfigError(f"model.family=bert needs a tokenizer with [CLS], [SEP], [MASK] and [PAD]; {tok!r} has no "
                              f"{', '.join(missing)} token; use a WordPiece tokenizer such as english-wordpiece")
        tokens = [tok.id_to_token(i) for i in range(tok.vocab_size)]
        if any(t.startswith("##") for t in tokens):  # WordPiece
            cont = np.array([t.startswith("##") for t in tokens], dtype=bool)
        elif any(t.startswith("\u2581") for t in tokens):  # SentencePiece marks word starts instead
            cont = np.array([not t.startswith("\u2581") for t in tokens], dtype=bool)
        else:
            cont = None
        boundary = tuple(i for i in (tok.token_to_id(t) for t in SENTENCE_END) if i is not None)
        specials = tuple(sorted({i for i in tok.special_ids().values() if i is not None}))
        return cls(cls_id=tok.cls_id, sep_id=tok.sep_id, mask_id=tok.mask_id, pad_id=tok.pad_id,
                   vocab_size=tok.vocab_size, eod_id=tok.eod_id, boundary_ids=boundary, continuation=cont,
                   special_ids=specials)


def build_segments(indexed: IndexedDataset, documents: np.ndarray, info: BertTokenInfo,
                   max_segment_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Segment table int64 [n_seg, 3] of ``(document id, start offset, length)`` and the CSR
    ``doc_first`` int64 [D + 1]: the segments of ``documents[k]`` are rows ``doc_first[k]:doc_first[k+1]``."""
    m = max(1, int(max_segment_tokens))
    boundary = np.asarray(info.boundary_ids, dtype=np.int64)
    rows, counts = [], np.zeros(len(documents), dtype=np.int64)
    for k, d in enumerate(np.asarray(documents, dtype=np.int64)):
        toks = indexed[int(d)]
        n = len(toks)
        if n and info.eod_id is not None and int(toks[-1]) == info.eod_id:
            n -= 1
        if n == 0:
            continue
        ends = np.flatnonzero(np.isin(toks[:n], boundary)) + 1 if boundary.size else np.zeros(0, np.int64)
        bounds = np.unique(np.concatenate([[0], ends, [n]]).astype(np.int64))  # segment starts + n
        starts, lens = bounds[:-1], np.diff(bounds)
        chunks = -(-lens // m)  # chunks per segment
        first = np.repeat(np.cumsum(chunks) - chunks, chunks)  # [sum chunks]
        pos = np.repeat(starts, chunks) + m * (np.arange(int(chunks.sum())) - first)
        seg_len = np.minimum(m, np.repeat(starts + lens, chunks) - pos)
        rows.append(np.stack([np.full(pos.size, d), pos, seg_len], axis=1))
        counts[k] = pos.size
    table = np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 3), np.int64)
    doc_first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return table, doc_first


def build_samples(seg_len: np.ndarray, doc_first: np.ndarray, num_samples: int, max_num_tokens: int,
                  short_seq_prob: float, min_segments: int, seed: int) -> np.ndarray:
    """Sample table int64 [num_samples, 3] of ``(first segment, end segment, target length)``."""
    lens = np.asarray(seg_len, dtype=np.int64).tolist()
    bounds = np.asarray(doc_first, dtype=np.int64).tolist()
    epochs: list[np.ndarray] = []
    total, epoch = 0, 0
    while total < num_samples:
        rng = np.random.RandomState([seed % 2**32, epoch])

        def target(rng: np.random.RandomState = rng) -> int:  # this epoch's generator
            if short_seq_prob > 0 and rng.random_sample() < short_seq_prob:
                return int(rng.randint(2, max_num_tokens + 1))
            return max_num_tokens

        found: list[tuple[int, int, int]] = []
        for k in range(len(bounds) - 1):
            lo, hi = bounds[k], bounds[k + 1]
            if hi - lo < min_segments:
                continue
            start, size, want = lo, 0, target()
            for s in range(lo, hi):
                size += lens[s]
                if (size >= want or s == hi - 1) and s + 1 - start >= min_segments:
                    found.append((start, s + 1, want))
                    start, size, want = s + 1, 0, target()
        if not found:
            raise NoSamplesError(f"no document has {min_segments} or more segments to build BERT samples from; "
                                 "use more (or longer) documents")
        arr = np.asarray(found, dtype=np.int64)  # int64 [epoch samples, 3]
        epochs.append(arr[rng.permutation(len(arr))])
        total += len(arr)
        epoch += 1
    return np.concatenate(epochs)[:num_samples]


def truncate_pair(a: list[int], b: list[int], max_tokens: int, rng: np.random.RandomState) -> None:
    """Drop tokens (in place) from the longer of ``a``/``b``, at its front or back at random."""
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        if rng.random_sample() < 0.5:
            del longer[0]
        else:
            longer.pop()


def mask_tokens(tokens: np.ndarray, candidates: np.ndarray, info: BertTokenInfo, rng: np.random.RandomState,
                masked_lm_prob: float, whole_word: bool) -> tuple[np.ndarray, np.ndarray]:
    """Masked inputs and labels for ``tokens`` int64 [s]; only ``candidates`` positions may be masked."""
    labels = np.full(tokens.shape, IGNORE_INDEX, dtype=np.int64)
    out = tokens.copy()
    if candidates.size == 0:
        return out, labels
    units: list[list[int]] = []
    cont = info.continuation if whole_word else None
    for p in candidates.tolist():
        if cont is not None and units and units[-1][-1] == p - 1 and cont[tokens[p]]:
            units[-1].append(p)  # a ## piece joins the word before it
        else:
            units.append([p])
    want = min(candidates.size, max(1, int(round(candidates.size * masked_lm_prob))))
    chosen: list[int] = []
    for u in rng.permutation(len(units)).tolist():
        if len(chosen) + len(units[u]) > want:
            continue
        chosen.extend(units[u])
        if len(chosen) == want:
            break
    chosen.sort()
    for p in chosen:
        labels[p] = tokens[p]
        r = rng.random_sample()
        if r < 0.8:
            out[p] = info.mask_id
        elif r >= 0.9:
            out[p] = _random_token(info, rng)
    return out, labels


def _random_token(info: BertTokenInfo, rng: np.random.RandomState) -> int:
    while True:
        t = int(rng.randint(info.vocab_size))
        if t not in info.special_ids:
            return t


def _cache_key(**desc: Any) -> str:
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:20]


def _digest(arr: np.ndarray, dtype: str) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr, dtype=dtype).tobytes()).hexdigest()


class BertDataset:
    """``num_samples`` BERT pretraining samples from ``documents`` of ``indexed`` (see the module doc)."""

    def __init__(self, indexed: IndexedDataset, documents: Sequence[int] | np.ndarray, num_samples: int,
                 seq_length: int, seed: int, info: BertTokenInfo, *, masked_lm_prob: float = 0.15,
                 short_seq_prob: float = 0.1, whole_word_masking: bool = False, binary_head: bool = True,
                 pair_task: str = "sop", max_segment_tokens: int | None = None,
                 cache_dir: str | Path | None = None, name: str = "train") -> None:
        if num_samples <= 0 or seq_length < 5:
            raise ConfigError(f"BertDataset needs num_samples > 0 and seq_length >= 5, got {num_samples}, {seq_length}")
        if pair_task not in PAIR_TASKS:
            raise ConfigError(f"pair_task={pair_task!r} is not one of {', '.join(PAIR_TASKS)}")
        if not 0.0 < masked_lm_prob < 1.0:
            raise ConfigError(f"data.masked_lm_prob must be in (0, 1), got {masked_lm_prob}")
        if whole_word_masking and info.continuation is None:
            raise ConfigError("data.whole_word_masking needs a WordPiece (##) or SentencePiece (▁) vocabulary")
        self.indexed, self.name, self.info = indexed, name, info
        self.num_samples, self.seq_length, self.seed = int(num_samples), int(seq_length), int(seed)
        self.masked_lm_prob, self.whole_word = float(masked_lm_prob), bool(whole_word_masking)
        self.binary_head, self.pair_task = bool(binary_head), pair_task
        self.max_num_tokens = self.seq_length - (3 if self.binary_head else 2)
        self.max_segment_tokens = int(max_segment_tokens or max(1, (self.seq_length - 3) // 2))
        self.documents = np.asarray(documents, dtype=np.int64)  # int64 [D]
        if self.documents.size and (self.documents.min() < 0 or self.documents.max() >= len(indexed)):
            raise DataError(f"{indexed.prefix}: document ids out of range for {len(indexed)} documents")
        seg_key = _cache_key(version=INDEX_VERSION, prefix=str(Path(indexed.prefix).resolve()),
                             documents=_digest(self.documents, "<i8"),
                             sizes=_digest(np.asarray(indexed.sizes)[self.documents], "<i4"),
                             eod=info.eod_id, boundary=list(info.boundary_ids), max_segment=self.max_segment_tokens)
        smp_key = _cache_key(segments=seg_key, num_samples=self.num_samples, max_num_tokens=self.max_num_tokens,
                             short_seq_prob=float(short_seq_prob), binary_head=self.binary_head, seed=self.seed)
        folder = Path(cache_dir) if cache_dir is not None else Path(indexed.prefix).resolve().parent
        stem = Path(indexed.prefix).name
        paths = {"segments": folder / f"{stem}.bert-{seg_key}.segments.npy",
                 "doc_first": folder / f"{stem}.bert-{seg_key}.doc_first.npy",
                 "samples": folder / f"{stem}.bert-{smp_key}.samples.npy"}
        arrays = self._load(paths)
        built: dict[str, np.ndarray] = {}  # tables built now (written to the cache)
        if "segments" not in arrays or "doc_first" not in arrays:
            built["segments"], built["doc_first"] = build_segments(indexed, self.documents, info,
                                                                   self.max_segment_tokens)
            arrays.update(built)
        if "samples" not in arrays or arrays["samples"].shape != (self.num_samples, 3):
            built["samples"] = arrays["samples"] = build_samples(
                arrays["segments"][:, 2], arrays["doc_first"], self.num_samples, self.max_num_tokens,
                float(short_seq_prob), 2 if self.binary_head else 1, self.seed)
        self._save({k: paths[k] for k in built}, built, folder)
        self.segments, self.doc_first, self.samples = arrays["segments"], arrays["doc_first"], arrays["samples"]
        self._nonempty: np.ndarray | None = None  # documents with segments (for NSP), built lazily

    def _load(self, paths: dict[str, Path]) -> dict[str, np.ndarray]:
        out = {}
        for k, p in paths.items():
            if p.is_file():
                try:
                    out[k] = np.load(p, mmap_mode="r", allow_pickle=False)
                except (ValueError, OSError, EOFError) as e:
                    log.warning("ignoring unreadable BERT index cache %s (%s); rebuilding", p, e)
        return out

    def _save(self, paths: dict[str, Path], arrays: dict[str, np.ndarray], folder: Path) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for k, p in paths.items():
                _atomic_save(p, arrays[k])
        except OSError as e:
            log.warning("cannot cache the BERT %s index in %s (%s); set data.index_cache_dir to a writable folder",
                        self.name, folder, e)

    def __len__(self) -> int:
        return self.num_samples

    def _tokens(self, first: int, end: int) -> list[list[int]]:
        return [self.indexed.get(int(d), int(o), int(n)).astype(np.int64).tolist()
                for d, o, n in self.segments[first:end]]

    def _random_segments(self, rng: np.random.RandomState, avoid_doc: int, want: int) -> list[int]:
        """Tokens of consecutive segments, from a random segment on, of a random other document (NSP's B)."""
        if self._nonempty is None:
            self._nonempty = np.flatnonzero(np.diff(self.doc_first) > 0)  # documents with segments
        for _ in range(10):  # a few draws to avoid the sample's own document (deterministic under rng)
            k = int(self._nonempty[rng.randint(len(self._nonempty))])
            lo, hi = int(self.doc_first[k]), int(self.doc_first[k + 1])
            if int(self.segments[lo, 0]) != avoid_doc:
                break
        out: list[int] = []
        for seg in self._tokens(int(rng.randint(lo, hi)), hi):
            out.extend(seg)
            if len(out) >= want:
                break
        return out

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if i < 0:
            i += self.num_samples
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        first, end, target = (int(x) for x in self.samples[i])
        rng = np.random.RandomState([self.seed % 2**32, i % 2**32])
        segs = self._tokens(first, end)
        info = self.info
        is_random = 0
        if self.binary_head:
            cut = int(rng.randint(1, len(segs)))
            a = [t for s in segs[:cut] for t in s]
            b = [t for s in segs[cut:] for t in s]
            if rng.random_sample() < 0.5:
                is_random = 1
                if self.pair_task == "sop":
                    a, b = b, a
                else:
                    b = self._random_segments(rng, int(self.segments[first, 0]), max(1, target - len(a)))
            truncate_pair(a, b, self.max_num_tokens, rng)
            seq = [info.cls_id, *a, info.sep_id, *b, info.sep_id]
            types = [0] * (len(a) + 2) + [1] * (len(b) + 1)
            special_pos = [0, len(a) + 1, len(seq) - 1]
        else:
            a = [t for s in segs for t in s]
            truncate_pair(a, [], self.max_num_tokens, rng)
            seq = [info.cls_id, *a, info.sep_id]
            types = [0] * len(seq)
            special_pos = [0, len(seq) - 1]
        n = len(seq)
        tokens = np.full(self.seq_length, info.pad_id, dtype=np.int64)  # int64 [seq_length]
        tokens[:n] = seq
        special = np.zeros(n, dtype=bool)
        special[special_pos] = True
        masked, labels = mask_tokens(tokens, np.flatnonzero(~special), info, rng, self.masked_lm_prob, self.whole_word)
        token_types = np.zeros(self.seq_length, dtype=np.int64)
        token_types[:n] = types
        padding_mask = np.zeros(self.seq_length, dtype=np.int64)
        padding_mask[:n] = 1
        return {"tokens": masked, "token_types": token_types, "labels": labels, "padding_mask": padding_mask,
                "is_random": np.int64(is_random)}

    def __repr__(self) -> str:
        return (f"BertDataset({self.name}: {self.num_samples} samples × {self.seq_length} tokens from "
                f"{self.documents.size} documents of {self.indexed.prefix})")


def build_bert_datasets(data_prefix: Sequence[Any] | str, *, info: BertTokenInfo, splits_string: str,
                        seq_length: int, seed: int, num_samples: tuple[int, int, int],
                        cache_dir: str | Path | None = None, **options: Any) -> tuple[Any | None, Any | None, Any | None]:
    """(train, valid, test) :class:`BertDataset` splits (a :class:`BlendedDataset` per split when
    ``data_prefix`` names several weighted corpora). ``options`` go to :class:`BertDataset`
    (masked_lm_prob, short_seq_prob, whole_word_masking, binary_head, pair_task, max_segment_tokens).
    A split is None when its ``num_samples`` is 0 or it has no documents."""
    return build_blended_splits(
        data_prefix, splits_string=splits_string, num_samples=num_samples, seed=seed, skippable=(NoSamplesError,),
        make=lambda indexed, docs, n, name: BertDataset(indexed, docs, n, seq_length, seed, info, cache_dir=cache_dir,
                                                        name=name, **options))


def bert_datasets_for_run(cfg: Any, tokenizer: Any, prefixes: list, num_samples: tuple[int, int, int]):
    """The ``ModelSpec.datasets`` builder: ``(cfg, tokenizer, prefixes, num_samples) -> (train, valid, test)``;
    the sentence-pair task is ``data.bert_pair_task``."""
    d, m = cfg.data, cfg.model
    return build_bert_datasets(prefixes, info=BertTokenInfo.from_tokenizer(tokenizer), splits_string=d.splits_string,
                               seq_length=m.seq_length, seed=cfg.trainer.seed, num_samples=num_samples,
                               cache_dir=d.index_cache_dir, masked_lm_prob=d.masked_lm_prob,
                               short_seq_prob=d.short_seq_prob, whole_word_masking=d.whole_word_masking,
                               binary_head=m.bert_binary_head, pair_task=d.bert_pair_task)
