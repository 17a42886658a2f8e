"""Convert a SentencePiece BPE model into a BERT WordPiece ``vocab.txt`` (the GatorTron recipe).

GatorTron's vocabulary was trained as a SentencePiece BPE model on clinical text and then written
out as a WordPiece vocabulary with ``##`` continuation pieces, so that BERT tooling (and
``transformers``' ``BertTokenizer``/``MegatronBert``) can use it. The conversion rules:

* SentencePiece marks the start of a word with ``▁``: ``▁word`` becomes the word-initial piece
  ``word``; a piece without the marker continues a word and becomes ``##piece``. The bare ``▁``
  is dropped.
* Control and unknown pieces (``<s>``, ``</s>``, ``<unk>``, ``<pad>``) and byte-fallback pieces
  (``<0x41>``) are dropped; BERT's specials ``[PAD] [UNK] [CLS] [SEP] [MASK]`` take ids 0–4.
* Pieces WordPiece can never match are dropped: BERT's pre-tokenizer splits on whitespace and
  on every punctuation character, so a piece that mixes punctuation with other characters (e.g.
  ``mg.``) never reaches the WordPiece model.
* Every single character of the SentencePiece alphabet is present both as ``c`` and ``##c``, so
  any word made of known characters tokenizes without ``[UNK]`` (greedy longest-match WordPiece
  needs a word-initial piece to start and a continuation piece for every later position).

Pieces keep SentencePiece's order (most frequent merges first) after the specials; characters
added by the last rule come at the end. To make SentencePiece see exactly the text the WordPiece
tokenizer will see, :func:`train_sentencepiece_wordpiece` normalizes the corpus with BERT's own
normalizer and trains SentencePiece with the ``identity`` normalization rule.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from toolkit.tokenization.hf_tokenizers import BERT_SPECIALS, HFTokenizer, build_wordpiece
from toolkit.tokenization.spm import SentencePieceTokenizer

#: SentencePiece's word-start marker (U+2581)
WORD_START = "\u2581"
#: WordPiece's continuation prefix
CONTINUATION = "##"


def is_punctuation(ch: str) -> bool:
    """The punctuation test of BERT's pre-tokenizer: ASCII symbols and Unicode ``P*`` categories."""
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def reachable(word: str) -> bool:
    """Whether BERT's pre-tokenizer can hand ``word`` (a piece without ``##``) to WordPiece whole."""
    if not word or any(ch.isspace() for ch in word):
        return False
    return len(word) == 1 or not any(is_punctuation(ch) for ch in word)


def convert_pieces(pieces: Iterable[str], specials: Sequence[str] = BERT_SPECIALS) -> list[str]:
    """SentencePiece pieces (meta pieces already removed), in id order → WordPiece vocabulary tokens.

    Returns ``specials`` followed by the converted pieces, then any missing single-character
    pieces (``c`` and ``##c``), without duplicates.
    """
    vocab: dict[str, None] = dict.fromkeys(specials)
    alphabet: dict[str, None] = {}
    for piece in pieces:
        if piece.startswith(WORD_START):
            word, token = piece[len(WORD_START):], piece[len(WORD_START):]
        else:
            word, token = piece, CONTINUATION + piece
        if not reachable(word):
            continue
        alphabet.update(dict.fromkeys(word))
        vocab.setdefault(token, None)
    for ch in alphabet:
        vocab.setdefault(ch, None)
        vocab.setdefault(CONTINUATION + ch, None)
    return list(vocab)


def sentencepiece_pieces(sp: SentencePieceTokenizer) -> Iterator[str]:
    """The normal and user-defined pieces of a SentencePiece model, in id order (no control,
    unknown, unused or byte pieces)."""
    proc = sp._sp  # the sentencepiece.SentencePieceProcessor
    for i in range(proc.get_piece_size()):
        if proc.is_control(i) or proc.is_unknown(i) or proc.is_unused(i) or proc.is_byte(i):
            continue
        yield proc.id_to_piece(i)


def sp_to_wordpiece_vocab(sp: SentencePieceTokenizer | str | Path,
                          specials: Sequence[str] = BERT_SPECIALS) -> list[str]:
    """The WordPiece vocabulary (id order) converted from a SentencePiece model or ``.model`` file."""
    if not isinstance(sp, SentencePieceTokenizer):
        sp = SentencePieceTokenizer.from_file(sp)
    return convert_pieces(sentencepiece_pieces(sp), specials)


def write_vocab_txt(tokens: Sequence[str], path: str | Path) -> Path:
    """Write ``vocab.txt``: one token per line, id = line number."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{t}\n" for t in tokens), encoding="utf-8")
    return path


def sp_to_wordpiece(sp: SentencePieceTokenizer | str | Path, *, lowercase: bool = False,
                    specials: Sequence[str] = BERT_SPECIALS) -> HFTokenizer:
    """A WordPiece :class:`HFTokenizer` (BERT normalizer and pre-tokenizer, ``##`` pieces) whose
    vocabulary is converted from the SentencePiece model ``sp``; ``save()`` writes its vocab.txt."""
    tokens = sp_to_wordpiece_vocab(sp, specials)
    vocab = {t: i for i, t in enumerate(tokens)}
    return HFTokenizer(build_wordpiece(vocab, lowercase), lowercase=lowercase)


def bert_normalize(docs: Iterable[str], lowercase: bool) -> Iterator[str]:
    """``docs`` as BERT's normalizer leaves them (control characters removed, CJK spaced, and
    lower-cased with accents stripped when ``lowercase``)."""
    from tokenizers import normalizers

    norm = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=lowercase)
    for doc in docs:
        yield norm.normalize_str(doc)


def train_sentencepiece_wordpiece(spec, docs: Iterable[str], *, train_sentencepiece) -> HFTokenizer:
    """Train the SentencePiece model ``spec`` describes on BERT-normalized ``docs`` (identity rule,
    no user-defined symbols) with ``train_sentencepiece(spec, docs, normalization_rule_name=...)``
    (``toolkit.tokenization.training``), then convert it to WordPiece. The spec's ``special_tokens``
    (default BERT's five) become the WordPiece specials."""
    specials = spec.special_tokens or list(BERT_SPECIALS)
    sp_spec = dataclasses.replace(spec, special_tokens=[], lowercase=False)
    sp = train_sentencepiece(sp_spec, bert_normalize(docs, spec.lowercase), normalization_rule_name="identity")
    return sp_to_wordpiece(sp, lowercase=spec.lowercase, specials=specials)
