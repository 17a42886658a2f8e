"""The one tokenizer interface every model family and the data layer use."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence


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

    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    eod_id: int | None = None
    unk_id: int | None = None
    cls_id: int | None = None
    sep_id: int | None = None
    mask_id: int | None = None
    sentinel_ids: list[int] = []
