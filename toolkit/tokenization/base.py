"""The one tokenizer interface every model family and the data layer use."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Mapping, Sequence


class Tokenizer(ABC):
    """Text ↔ token ids, with the special tokens the model families need.

    Special ids are ``None`` where a tokenizer has no such token. ``eod_id`` is the token appended
    after every document by preprocessing (GPT); ``cls/sep/mask`` serve BERT; ``sentinel_ids`` are
    T5's ``<extra_id_0>``, ``<extra_id_1>``, … in that order.
    """

    #: "sentencepiece" or "huggingface"
    library: str = ""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (special tokens included)."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without any special tokens added."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens are dropped."""

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Id of one token string, or None."""

    @abstractmethod
    def id_to_token(self, idx: int) -> str:
        """Token string of one id."""

    @abstractmethod
    def save(self, folder: str | Path) -> list[Path]:
        """Copy the tokenizer's files into ``folder`` so :func:`load_tokenizer` can load it from there."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    #: whether :meth:`encode_batch` tokenizes on threads of its own and releases the GIL meanwhile
    #: (preprocessing then overlaps it with reading in one process instead of starting a process pool)
    threaded_batch: bool = False

    #: where the tokenizer was loaded from (a file or folder), if anywhere
    path: Path | None = None

    def special_ids(self) -> dict[str, int | None]:
        """The named special ids (``bos``, ``eos``, ``pad``, ``eod``, ``unk``, ``cls``, ``sep``, ``mask``)."""
        return {name: getattr(self, f"{name}_id") for name in SPECIAL_NAMES}

    def _set_special_ids(self, found: Mapping[str, object]) -> None:
        """Set the ``<name>_id`` attributes and ``sentinel_ids`` from :func:`detect_special_ids` output."""
        for name in SPECIAL_NAMES:
            setattr(self, f"{name}_id", found.get(name))
        self.sentinel_ids = list(found.get("sentinel") or [])  # type: ignore[call-overload]

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        ids = ", ".join(f"{k}={v}" for k, v in self.special_ids().items() if v is not None)
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, {ids}, path={str(self.path)!r})"

    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    eod_id: int | None = None
    unk_id: int | None = None
    cls_id: int | None = None
    sep_id: int | None = None
    mask_id: int | None = None
    sentinel_ids: list[int] = []


#: the named special ids every tokenizer exposes as ``<name>_id``
SPECIAL_NAMES = ("bos", "eos", "pad", "eod", "unk", "cls", "sep", "mask")

# Token strings recognised for each special id, most specific first.
_CANDIDATES: dict[str, tuple[str, ...]] = {
    "bos": ("<s>", "<bos>", "[BOS]", "<|endoftext|>"),
    "eos": ("</s>", "<eos>", "[EOS]", "<|endoftext|>"),
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
    "unk": ("<unk>", "[UNK]", "<|unk|>"),
    "cls": ("[CLS]", "<cls>", "<s>"),
    "sep": ("[SEP]", "<sep>", "</s>"),
    "mask": ("[MASK]", "<mask>"),
}
_SENTINEL = re.compile(r"^<extra_id_(\d+)>$")


def detect_special_ids(vocab: Mapping[str, int]) -> dict[str, int | None | list[int]]:
    """Special ids found in ``vocab`` (token → id) by their common names.

    Returns the keys of :data:`SPECIAL_NAMES` plus ``sentinel`` (the ids of ``<extra_id_N>`` ordered
    by N). ``eod`` is ``<|endoftext|>`` if present, else the eos token, else ``[SEP]``.
    """
    found: dict[str, int | None | list[int]] = {}
    for name, candidates in _CANDIDATES.items():
        found[name] = next((vocab[c] for c in candidates if c in vocab), None)
    eod = vocab.get("<|endoftext|>")
    if eod is None:
        eod = found["eos"] if found["eos"] is not None else vocab.get("[SEP]")
    found["eod"] = eod
    sentinels = sorted((int(m.group(1)), i) for t, i in vocab.items() if (m := _SENTINEL.match(t)))
    found["sentinel"] = [i for _, i in sentinels]
    return found
