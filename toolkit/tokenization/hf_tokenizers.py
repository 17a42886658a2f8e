"""Tokenizers built on the Hugging Face ``tokenizers`` library (byte-level BPE, WordPiece, any
``tokenizer.json``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer as HFTokenizerObject
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
from toolkit.errors import TokenizerError, first_line
from toolkit.tokenization.base import SPECIAL_NAMES, Tokenizer, detect_special_ids
from toolkit.tokenization.export import pipeline_settings

#: the file every Hugging Face tokenizer folder holds
TOKENIZER_JSON = "tokenizer.json"
#: a BERT-style WordPiece vocabulary, one token per line, id = line number
VOCAB_TXT = "vocab.txt"
#: transformers' tokenizer settings (``do_lower_case``, special tokens, tokenizer class)
TOKENIZER_CONFIG = "tokenizer_config.json"
#: transformers files copied along when a tokenizer loaded from a folder is saved again
_COMPANIONS = (TOKENIZER_CONFIG, "special_tokens_map.json")
#: BERT's special tokens, in the order a WordPiece vocabulary usually lists them
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")



class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer``. Special ids are found in its vocabulary by name; ``decode`` drops
    them and every added token marked special."""

    library = "huggingface"

    def __init__(self, tokenizer: HFTokenizerObject, path: Path | None = None, lowercase: bool | None = None) -> None:
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tok = tokenizer
        self.path = path
        #: whether input is lower-cased (None where unknown); written as ``do_lower_case``
        self.lowercase = lowercase
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values(), default=-1) + 1
        self._set_special_ids(detect_special_ids(vocab))
        marked = {i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special}
        named = {getattr(self, f"{n}_id") for n in SPECIAL_NAMES} - {None, self.unk_id}
        self._drop_on_decode = frozenset(marked | named | set(self.sentinel_ids))

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_file(cls, path: str | Path) -> "HFTokenizer":
        """Load a ``tokenizer.json`` file."""
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"{TOKENIZER_JSON} not found: {path}; check the path")
        try:
            tok = HFTokenizerObject.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exception with a serde message
            raise TokenizerError(
                f"{path} is corrupt or not a Hugging Face tokenizer.json ({first_line(exc)}); "
                "re-copy or re-train the tokenizer"
            ) from None
        return cls(tok, path=path, lowercase=lowercases(tok))

    @classmethod
    def from_wordpiece_vocab(cls, vocab_file: str | Path, lowercase: bool | None = None) -> "HFTokenizer":
        """Build a BERT-style WordPiece tokenizer from ``vocab.txt`` (``##`` continuation pieces).

        ``lowercase`` defaults to ``do_lower_case`` from a ``tokenizer_config.json`` beside the
        vocabulary, else cased.
        """
        vocab_file = Path(vocab_file)
        try:
            lines = vocab_file.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise TokenizerError(f"WordPiece vocabulary not found: {vocab_file}; check the path") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"cannot read WordPiece vocabulary {vocab_file} ({first_line(exc)})") from None
        vocab: dict[str, int] = {}
        for i, line in enumerate(lines):
            token = line.rstrip("\r\n")
            if token:
                vocab[token] = i  # like transformers' BertTokenizer: a repeated token keeps its last line
        if not vocab:
            raise TokenizerError(f"WordPiece vocabulary {vocab_file} is empty; re-copy or re-train the tokenizer")
        if lowercase is None:
            lowercase = bool(_read_do_lower_case(vocab_file.parent))
        tok = build_wordpiece(vocab, lowercase)
        return cls(tok, path=vocab_file, lowercase=lowercase)

    # ---------------------------------------------------------------- interface

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def backend(self) -> HFTokenizerObject:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def is_wordpiece(self) -> bool:
        return isinstance(self._tok.model, models.WordPiece)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    #: ``encode_batch`` runs on the library's Rust thread pool (``RAYON_NUM_THREADS`` threads, default
    #: one per core) with the GIL released
    threaded_batch = True

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets, which ids do not need
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` and each token's ``(start, end)`` character span in it."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, list(enc.offsets)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids if int(i) not in self._drop_on_decode], skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, idx: int) -> str:
        token = self._tok.id_to_token(idx)
        if token is None:
            raise IndexError(f"token id {idx} is outside the vocabulary (size {self.vocab_size})")
        return token

    def save(self, folder: str | Path) -> list[Path]:
        """Write ``tokenizer.json`` (plus ``vocab.txt`` for WordPiece) and ``tokenizer_config.json``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = [folder / TOKENIZER_JSON]
        self._tok.save(str(written[0]), pretty=True)
        if self.is_wordpiece:
            written.append(folder / VOCAB_TXT)
            ordered = sorted(self._tok.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1])
            written[-1].write_text("".join(f"{tok}\n" for tok, _ in ordered), encoding="utf-8")
        source = self.path.parent if self.path is not None else None
        copied = False
        for name in _COMPANIONS:
            src = source / name if source is not None else None
            if src is not None and src.is_file() and src.resolve() != (folder / name).resolve():
                shutil.copyfile(src, folder / name)
                written.append(folder / name)
                copied = copied or name == TOKENIZER_CONFIG
        if not copied and not (folder / TOKENIZER_CONFIG).is_file():
            written.append(folder / TOKENIZER_CONFIG)
            written[-1].write_text(json.dumps(self.transformers_config(), indent=2) + "\n", encoding="utf-8")
        return written

    def transformers_config(self) -> dict:
        """A minimal ``tokenizer_config.json`` so ``transformers.AutoTokenizer`` loads the folder."""
        config: dict = {"tokenizer_class": "PreTrainedTokenizerFast"}
        for name in ("bos", "eos", "unk", "pad", "cls", "sep", "mask"):
            idx = getattr(self, f"{name}_id")
            if idx is not None:
                config[f"{name}_token"] = self.id_to_token(idx)
        if self.is_wordpiece and self.lowercase is not None:
            config["do_lower_case"] = self.lowercase
        return config


def lowercases(tok: HFTokenizerObject) -> bool:
    """Whether ``tok``'s normalizer lower-cases (a ``BertNormalizer`` with ``lowercase``, or a
    ``Lowercase`` step): what the pipeline does, whatever a ``tokenizer_config.json`` beside it says."""
    if tok.normalizer is None:
        return False
    return bool(pipeline_settings({"normalizer": json.loads(tok.normalizer.__getstate__())})["do_lower_case"])


def _read_do_lower_case(folder: Path) -> bool | None:
    """``do_lower_case`` from ``folder/tokenizer_config.json``, or None when absent/unreadable."""
    config = folder / TOKENIZER_CONFIG
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("do_lower_case")
    except (OSError, ValueError, AttributeError):
        raise TokenizerError(f"{config} is not valid JSON; fix or delete it") from None
    return bool(value) if value is not None else None


def build_wordpiece(vocab: dict[str, int], lowercase: bool, unk_token: str = "[UNK]") -> HFTokenizerObject:
    """A BERT-style WordPiece pipeline over ``vocab`` (BertNormalizer, BertPreTokenizer, ``##``)."""
    if unk_token not in vocab:
        unk_token = next((t for t in ("[UNK]", "<unk>") if t in vocab), unk_token)
    tok = HFTokenizerObject(models.WordPiece(vocab, unk_token=unk_token, continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    present = [t for t in BERT_SPECIALS if t in vocab]
    if present:
        tok.add_special_tokens(present)
    if "[CLS]" in vocab and "[SEP]" in vocab:
        # For transformers users only: our encode() never adds special tokens.
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
    return tok
