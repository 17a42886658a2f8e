"""SentencePiece tokenizers (BPE or unigram ``.model`` files)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import sentencepiece as spm

from toolkit.errors import TokenizerError, first_line
from toolkit.tokenization.base import Tokenizer, detect_special_ids

#: file name :meth:`SentencePieceTokenizer.save` writes the model under
MODEL_FILE = "tokenizer.model"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model. ``bos/eos/pad/unk`` come from the model itself (``-1`` → ``None``);
    the other special ids are found in its pieces by name (see :func:`detect_special_ids`)."""

    library = "sentencepiece"

    def __init__(self, model: bytes, path: Path | None = None) -> None:
        self.path = path
        where = str(path) if path is not None else "<bytes>"
        if not model:
            raise TokenizerError(f"SentencePiece model {where} is empty; re-copy or re-train the tokenizer")
        self._proto = model
        try:
            self._sp = spm.SentencePieceProcessor()
            self._sp.LoadFromSerializedProto(model)
        except Exception as exc:  # the library raises RuntimeError/OSError with C++ messages
            msg = first_line(exc)
            raise TokenizerError(
                f"SentencePiece model {where} is corrupt or not a SentencePiece model ({msg}); "
                "re-copy or re-train the tokenizer"
            ) from None
        size = self._sp.get_piece_size()
        vocab = {self._sp.id_to_piece(i): i for i in range(size)}
        found = detect_special_ids(vocab)
        # The model's own ids win over names for the four ids SentencePiece defines.
        for name in ("bos", "eos", "pad", "unk"):
            own = getattr(self._sp, f"{name}_id")()
            found[name] = own if own >= 0 else None
        eod = vocab.get("<|endoftext|>")
        found["eod"] = eod if eod is not None else (found["eos"] if found["eos"] is not None else vocab.get("[SEP]"))
        self._set_special_ids(found)
        named = {v for k, v in found.items() if k != "sentinel" and v is not None}
        control = {i for i in range(size) if self._sp.is_control(i)}
        self._drop_on_decode = frozenset(named | control | set(self.sentinel_ids)) - {self.unk_id}

    @classmethod
    def from_file(cls, path: str | Path) -> "SentencePieceTokenizer":
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise TokenizerError(f"SentencePiece model not found: {path}; check the path") from None
        except OSError as exc:
            raise TokenizerError(f"cannot read SentencePiece model {path}: {exc.strerror}") from None
        return cls(data, path=path)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text, out_type=int))

    #: ``encode_batch`` of a list runs on the library's C++ threads (one per core) with the GIL released
    threaded_batch = True

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids if int(i) not in self._drop_on_decode])

    def token_to_id(self, token: str) -> int | None:
        idx = self._sp.piece_to_id(token)
        # piece_to_id answers unk for unknown pieces; only a real match counts.
        return idx if 0 <= idx < self.vocab_size and self._sp.id_to_piece(idx) == token else None

    def id_to_token(self, idx: int) -> str:
        if not 0 <= idx < self.vocab_size:
            raise IndexError(f"token id {idx} is outside the vocabulary (size {self.vocab_size})")
        return self._sp.id_to_piece(idx)

    def save(self, folder: str | Path) -> list[Path]:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / MODEL_FILE
        target.write_bytes(self._proto)
        return [target]

    @property
    def model_proto(self) -> bytes:
        """The serialized model (the bytes of the ``.model`` file)."""
        return self._proto
