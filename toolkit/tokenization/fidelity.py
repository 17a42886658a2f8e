"""Tokenizer fidelity: two tokenizers that should be the same function of text give the same ids.

Every conversion that carries a tokenizer compares the *source* tokenizer with the *result* on
:func:`probe_texts` — a fixed battery of mixed case, accents and combining marks, non-Latin scripts,
emoji, digits and units, runs of whitespace and newlines, very long words and the empty string —
plus every special and added token of either side, and fails on the first difference
(:class:`TokenizerFidelityError`, exit code 1, naming the text and both id lists):

* import (Hugging Face → megaforge): ``AutoTokenizer`` on the source folder vs the megaforge
  tokenizer loaded back from the written ``tokenizer/``;
* export (megaforge → Hugging Face): the run's tokenizer vs ``AutoTokenizer`` on the export;
* ``checkpoint.init_from``: the source's tokenizer vs the one the run will save and load;
* ``megaforge publish``: the shipped tokenizer files read by megaforge vs ``AutoTokenizer`` (which
  also reads ``tokenizer_config.json``).

Ids are compared without added special tokens (``add_special_tokens=False``): megaforge's
``encode`` never adds them. Special tokens are compared twice: the id each side gives the token
string, and — where both sides match special tokens inside text (every Hugging Face ``tokenizers``
pipeline) — the ids of the token alone and inside a sentence. A megaforge SentencePiece tokenizer
reads control tokens inside text as plain text, as SentencePiece does, so for it only the ids of
the token strings are compared.

``transformers`` is needed only to load a Hugging Face side; without it those checks are skipped
with a note (conversion itself does not need ``transformers``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from toolkit.errors import TokenizerError, first_line
from toolkit.tokenization.base import SPECIAL_NAMES, Tokenizer

logger = logging.getLogger(__name__)

#: the fixed part of the probe battery (special tokens are added per tokenizer pair)
PROBE_BATTERY: tuple[str, ...] = (
    "",
    # mixed case
    "Patient denies chest pain",
    "The QUICK brown Fox; iPhone, McDonald's and NASA.",
    "ALL CAPS NOTE: pt STABLE",
    # accents and diacritics, composed and combining
    "naïve café résumé",
    "Zürich, Ångström, Straße, façade, Ærø",
    "e\u0301clair and cafe\u0301 (combining accents)",
    "ÀÉÎõü ÇÑ",
    # non-Latin scripts
    "東京は日本の首都です",
    "Москва — столица России",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "한국어 텍스트",
    "Ελληνικά κείμενα",
    # emoji
    "🙂 👍🏽 👨‍👩‍👧‍👦 🇺🇸",
    "pain 10/10 😣!!",
    # digits and units
    "120/80 mmHg",
    "25mg",
    "BP 120/80, HR 72 bpm, T 37.5°C, SpO2 98%",
    "3.14159 1,000,000 ½ tab q6h x3d",
    "ＡＢＣ１２３ ﬁne ①",
    # whitespace
    " ",
    "  leading and trailing  ",
    "a  b   c    d",
    "tabs\tand\ttabs",
    "line one\nline two\n\nline four\n",
    "\n\n",
    "windows\r\nline",
    "zero\u200bwidth soft\u00adhyphen non\u00a0breaking",
    # very long words
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "a" * 150,
    "Supercalifragilisticexpialidocious" * 4,
)
#: special and added tokens probed inside text (named specials come first; every one's id is compared)
MAX_TOKENS_IN_TEXT = 256
#: how a special token is placed in text besides alone
_IN_SENTENCE = "before {} after"


class TokenizerFidelityError(TokenizerError):
    """Two tokenizers that should agree give different ids; one line naming the text and both id lists."""

    exit_code = 1


#: text → ids, without added special tokens
Encoder = Callable[[str], list[int]]


@dataclass
class Side:
    """One side of a comparison: a name for messages, its encoder, its token → id lookup, its
    special token strings, and whether it matches special tokens inside text."""

    name: str
    encode: Encoder
    token_to_id: Callable[[str], int | None]
    specials: tuple[str, ...]
    specials_in_text: bool = True


@dataclass
class FidelityReport:
    """The outcome of :func:`compare`: how many probes, and the first difference (or None)."""

    source: str
    result: str
    texts_checked: int
    mismatch: tuple[str, list[int] | None, list[int] | None] | None = None  # (text, source ids, result ids)
    what: str = "text"  # "text", or "token" when a special token string maps to different ids

    @property
    def ok(self) -> bool:
        return self.mismatch is None

    def detail(self) -> str:
        """One line: what matched, or the first differing probe and both id lists."""
        if self.mismatch is None:
            return f"tokenizer ids match on {self.texts_checked} probe texts ({self.source} and {self.result})"
        text, a, b = self.mismatch
        probe = f"special token {text!r}" if self.what == "token" else repr(text)
        return f"tokenizer ids differ on {probe}: {self.source} → {a}, {self.result} → {b}"

    def message(self) -> str:
        return f"tokenizer fidelity check failed: {self.detail()}"

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise TokenizerFidelityError(self.message())


def probe_texts(special_tokens: Iterable[str] = ()) -> list[str]:
    """The battery: :data:`PROBE_BATTERY`, then each special token alone and inside a sentence."""
    texts = list(PROBE_BATTERY)
    for token in dict.fromkeys(t for t in special_tokens if t):
        texts += [token, _IN_SENTENCE.format(token)]
    return texts


def compare(source: Side, result: Side, texts: Sequence[str] | None = None) -> FidelityReport:
    """Compare ``result`` with ``source``: each special token string's id, then the probe texts;
    stops at the first difference."""
    specials = tuple(dict.fromkeys(source.specials + result.specials))
    for token in specials:
        a, b = source.token_to_id(token), result.token_to_id(token)
        if a != b:
            return FidelityReport(source.name, result.name, 0, (token, _as_list(a), _as_list(b)), what="token")
    in_text = specials[:MAX_TOKENS_IN_TEXT] if source.specials_in_text and result.specials_in_text else ()
    texts = list(texts) if texts is not None else probe_texts(in_text)
    for i, text in enumerate(texts):
        a, b = source.encode(text), result.encode(text)
        if a != b:
            return FidelityReport(source.name, result.name, i + 1, (text, a, b))
    return FidelityReport(source.name, result.name, len(texts))


def _as_list(idx: int | None) -> list[int] | None:
    return None if idx is None else [idx]


# ---------------------------------------------------------------------------- sides


def megaforge_side(tokenizer: Tokenizer, name: str = "megaforge's tokenizer") -> Side:
    """A megaforge :class:`~toolkit.tokenization.base.Tokenizer` (``encode`` adds no special tokens)."""
    return Side(name=name, encode=lambda text: [int(i) for i in tokenizer.encode(text)],
                token_to_id=tokenizer.token_to_id, specials=megaforge_specials(tokenizer),
                specials_in_text=tokenizer.library != "sentencepiece")


def megaforge_specials(tokenizer: Tokenizer) -> tuple[str, ...]:
    """Token strings of the named special ids, the sentinels, and every added token (special or not)."""
    ids = [getattr(tokenizer, f"{n}_id", None) for n in SPECIAL_NAMES] + list(tokenizer.sentinel_ids)
    tokens = [tokenizer.id_to_token(i) for i in ids if i is not None]
    backend = getattr(tokenizer, "backend", None)
    if backend is not None:
        tokens += [t.content for _, t in sorted(backend.get_added_tokens_decoder().items())]
    return tuple(dict.fromkeys(tokens))


def transformers_side(hf_tokenizer, name: str) -> Side:
    """A ``transformers`` tokenizer, called with ``add_special_tokens=False``; its special and added tokens."""
    specials = [str(t) for t in getattr(hf_tokenizer, "all_special_tokens", ())]
    specials += list(getattr(hf_tokenizer, "get_added_vocab", dict)())

    def encode(text: str) -> list[int]:
        return [int(i) for i in hf_tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]]

    vocab: dict[str, int] = {}

    def token_to_id(token: str) -> int | None:
        if not vocab:
            vocab.update(hf_tokenizer.get_vocab())
        return vocab.get(token)

    return Side(name=name, encode=encode, token_to_id=token_to_id, specials=tuple(dict.fromkeys(specials)))


def load_auto_tokenizer(folder: str | Path, *, required: bool = True):
    """``transformers.AutoTokenizer`` on ``folder`` (offline), or None when transformers is not
    installed. A folder transformers cannot read is a :class:`TokenizerFidelityError` when
    ``required`` (an export, a folder to publish), else None with a note (an import's source: megaforge
    reads more layouts than ``AutoTokenizer`` does, e.g. a bare ``vocab.txt``)."""
    try:
        import transformers
    except ImportError:
        return None
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # any failure to build the tokenizer is what this check exists to catch
        if not required:
            logger.info(f"note: tokenizer fidelity not checked: transformers cannot load the tokenizer in {folder} "
                        f"({first_line(e)})")
            return None
        raise TokenizerFidelityError(f"tokenizer fidelity check failed: transformers cannot load the tokenizer in "
                                     f"{folder} ({first_line(e)})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)


def _has_transformers() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


def _skipped(what: str) -> None:
    logger.info(f"note: tokenizer fidelity of {what} not checked: it needs transformers (pip install 'megaforge[hf]')")


# ---------------------------------------------------------------------------- the checks conversions run


def check_export(tokenizer: Tokenizer, hf_folder: str | Path) -> FidelityReport | None:
    """Our tokenizer (the source) vs ``AutoTokenizer`` on the exported ``hf_folder``; None without
    transformers."""
    theirs = load_auto_tokenizer(hf_folder)
    if theirs is None:
        _skipped(f"the export {hf_folder}")
        return None
    return compare(megaforge_side(tokenizer, "megaforge's tokenizer"),
                   transformers_side(theirs, f"AutoTokenizer on {hf_folder}"))


def check_import(source_folder: str | Path, tokenizer: Tokenizer, *, result_name: str) -> FidelityReport | None:
    """``AutoTokenizer`` on the Hugging Face ``source_folder`` vs the imported ``tokenizer``; None
    without transformers, or when the source folder has no tokenizer transformers can find."""
    source_folder = Path(source_folder)
    if not has_transformers_tokenizer(source_folder):
        return None
    if not _has_transformers():
        _skipped(f"the import of {source_folder}")
        return None
    theirs = load_auto_tokenizer(source_folder, required=False)
    if theirs is None:
        return None
    return compare(transformers_side(theirs, f"the source tokenizer ({source_folder})"),
                   megaforge_side(tokenizer, result_name))


def check_same(source: Tokenizer, result: Tokenizer, *, source_name: str, result_name: str) -> FidelityReport:
    """Two megaforge tokenizers (a tokenizer and its saved-and-reloaded copy, an override and the
    import written from it)."""
    return compare(megaforge_side(source, source_name), megaforge_side(result, result_name))


def check_folder(folder: str | Path) -> FidelityReport | None:
    """A Hugging Face folder's shipped tokenizer files as megaforge reads them (``tokenizer.json``, or
    the SentencePiece model / ``vocab.txt``) vs ``AutoTokenizer`` on the folder, which also applies
    ``tokenizer_config.json``: whether the config agrees with the files. None without transformers."""
    from toolkit.tokenization.loading import load_tokenizer

    theirs = load_auto_tokenizer(folder)
    if theirs is None:
        _skipped(f"{folder}")
        return None
    ours = load_tokenizer(str(folder))
    return compare(megaforge_side(ours, f"the tokenizer files in {folder}"),
                   transformers_side(theirs, f"AutoTokenizer on {folder}"))


#: files transformers builds a tokenizer from
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                    "sentencepiece.bpe.model")


def has_transformers_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES) or any(folder.glob("*.model"))
