"""``load_tokenizer``: one entry point for every tokenizer file layout and the shipped names."""

from __future__ import annotations

from pathlib import Path

from toolkit.assets import tokenizers_dir
from toolkit.errors import TokenizerError, closest
from toolkit.tokenization.base import Tokenizer
from toolkit.tokenization.hf_tokenizers import TOKENIZER_JSON, VOCAB_TXT, HFTokenizer
from toolkit.tokenization.spm import MODEL_FILE, SentencePieceTokenizer

#: accepted values of ``type``
TYPES = ("auto", "sentencepiece", "huggingface")
#: SentencePiece file names preferred when a folder holds several ``*.model`` files
_SPM_PREFERRED = (MODEL_FILE, "spiece.model", "sentencepiece.bpe.model", "sentencepiece.model")
_LAYOUTS = (
    "a SentencePiece .model file, a folder with tokenizer.json, a folder with a *.model file, "
    "a folder with vocab.txt, or a shipped tokenizer name"
)


def shipped_tokenizers() -> list[str]:
    """Names of the trained tokenizers shipped with megaforge (folders under ``tokenizers_dir()``)."""
    try:
        root = tokenizers_dir()
    except FileNotFoundError:
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _has_tokenizer_files(p))


def shipped_specs() -> list[str]:
    """Names of the tokenizer specs (``<name>.yaml``) shipped with megaforge."""
    try:
        root = tokenizers_dir()
    except FileNotFoundError:
        return []
    return sorted(p.stem for p in root.glob("*.yaml"))


def load_tokenizer(path_or_name: str | Path, type: str = "auto") -> Tokenizer:  # noqa: A002 - public name
    """Load a tokenizer from a file, a folder, or the name of a shipped tokenizer.

    ``type`` is ``auto`` (decide from the files), ``sentencepiece`` or ``huggingface``.
    Raises :class:`~toolkit.errors.TokenizerError` with one line for anything missing or corrupt.
    """
    if type not in TYPES:
        hint = closest(str(type), TYPES)
        raise TokenizerError(
            f"unknown tokenizer type {type!r}; use one of {', '.join(TYPES)}" + (f" (did you mean {hint!r}?)" if hint else "")
        )
    text = str(path_or_name)
    if not text.strip():
        raise TokenizerError(f"no tokenizer given; pass {_LAYOUTS}")
    path = Path(text).expanduser()
    if path.is_file():
        return _load_file(path, type)
    if path.is_dir():
        return _load_folder(path, type)
    if _looks_like_name(text):
        return _load_shipped(text, type)
    raise TokenizerError(f"tokenizer path not found: {path}; pass {_LAYOUTS}")


def _looks_like_name(text: str) -> bool:
    return "/" not in text and "\\" not in text and not text.startswith((".", "~")) and not Path(text).suffix


def _load_file(path: Path, type: str) -> Tokenizer:
    if type == "sentencepiece" or (type == "auto" and path.suffix == ".model"):
        return SentencePieceTokenizer.from_file(path)
    if path.suffix == ".json":
        return HFTokenizer.from_file(path)
    if path.name == VOCAB_TXT or path.suffix == ".txt":
        return HFTokenizer.from_wordpiece_vocab(path)
    if type == "huggingface":
        return HFTokenizer.from_file(path)
    raise TokenizerError(f"cannot tell what kind of tokenizer {path} is; pass {_LAYOUTS}, or set type")


def _load_folder(folder: Path, type: str) -> Tokenizer:
    if type in ("auto", "huggingface") and (folder / TOKENIZER_JSON).is_file():
        return HFTokenizer.from_file(folder / TOKENIZER_JSON)
    if type in ("auto", "sentencepiece"):
        model = _find_spm_model(folder)
        if model is not None:
            return SentencePieceTokenizer.from_file(model)
    if type in ("auto", "huggingface") and (folder / VOCAB_TXT).is_file():
        return HFTokenizer.from_wordpiece_vocab(folder / VOCAB_TXT)
    wanted = {
        "auto": "tokenizer.json, a *.model file or vocab.txt",
        "sentencepiece": "a *.model file",
        "huggingface": "tokenizer.json or vocab.txt",
    }[type]
    raise TokenizerError(f"no tokenizer files in {folder}: expected {wanted}; check the folder or re-save the tokenizer")


def _find_spm_model(folder: Path) -> Path | None:
    models = sorted(p for p in folder.glob("*.model") if p.is_file())
    if not models:
        return None
    for name in _SPM_PREFERRED:
        if folder / name in models:
            return folder / name
    if len(models) > 1:
        names = ", ".join(p.name for p in models)
        raise TokenizerError(f"{folder} holds several SentencePiece models ({names}); pass the .model file itself")
    return models[0]


def _has_tokenizer_files(folder: Path) -> bool:
    return (folder / TOKENIZER_JSON).is_file() or (folder / VOCAB_TXT).is_file() or any(folder.glob("*.model"))


def _load_shipped(name: str, type: str) -> Tokenizer:
    try:
        root = tokenizers_dir()
    except FileNotFoundError as exc:
        raise TokenizerError(f"shipped tokenizers are missing from this install ({exc}); reinstall megaforge") from None
    folder = root / name
    if folder.is_dir():
        return _load_folder(folder, type)
    if name in shipped_specs():
        raise TokenizerError(
            f"shipped tokenizer {name!r} is a spec without trained files; "
            f"train it with `megaforge tokenizer train {root / (name + '.yaml')}`"
        )
    names = shipped_tokenizers()
    hint = closest(name, names + shipped_specs())
    raise TokenizerError(
        f"unknown tokenizer {name!r}: not a file, folder or shipped name"
        + (f"; did you mean {hint!r}?" if hint else "")
        + (f" (shipped: {', '.join(names)})" if names else "")
    )
