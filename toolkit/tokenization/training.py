"""Train a tokenizer from a YAML spec (``tokenizers/*.yaml``) on a shipped corpus or on files.

The corpus is streamed document by document; the libraries keep only what they need (word counts
for Hugging Face trainers, the sentence sample for SentencePiece). The same spec always gives the
same files.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

from toolkit.assets import corpora_dir, tokenizers_dir
from toolkit.errors import ConfigError, DataError, TokenizerError, closest, first_line
from toolkit.tokenization.base import Tokenizer
from toolkit.tokenization.hf_tokenizers import HFTokenizer, build_wordpiece
from toolkit.tokenization.sp_to_wordpiece import train_sentencepiece_wordpiece
from toolkit.tokenization.spm import SentencePieceTokenizer

#: library → the model types it can train
MODELS = {"sentencepiece": ("bpe", "unigram"), "huggingface": ("byte_level_bpe", "wordpiece")}
#: special tokens used when a spec lists none
DEFAULT_SPECIALS = {
    "byte_level_bpe": ["<|endoftext|>"],
    "wordpiece": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "bpe": [],
    "unigram": [],
}
#: SentencePiece's own meta pieces (the model keeps dedicated ids for them)
_SPM_META = ("<unk>", "<s>", "</s>", "<pad>")
_BATCH = 1000  # documents handed to a Hugging Face trainer at a time
#: files of an earlier tokenizer that a new training removes from the output folder
_TOKENIZER_FILES = {"tokenizer.json", "vocab.txt", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"}


@dataclass
class TokenizerSpec:
    """How to train one tokenizer; the fields of a ``tokenizers/<name>.yaml`` file."""

    name: str  # the tokenizer's name; default output folder is tokenizers_dir()/<name>
    library: str  # sentencepiece | huggingface
    model: str  # bpe | unigram (sentencepiece); byte_level_bpe | wordpiece (huggingface)
    vocab_size: int  # size of the final vocabulary, special tokens included
    corpus: str | None = None  # name of a shipped corpus (toolkit/data/corpora/<corpus>.jsonl.gz)
    files: list[str] | None = None  # or: .jsonl[.gz] / .txt[.gz] paths, relative to the spec file
    json_key: str = "text"  # field holding the text in jsonl records
    special_tokens: list[str] | None = None  # special tokens, given the first ids in this order
    lowercase: bool = False  # lower-case the input before tokenizing
    character_coverage: float = 0.9995  # sentencepiece: share of characters kept in the vocabulary
    byte_fallback: bool = False  # sentencepiece: spell unknown characters as UTF-8 byte pieces
    max_sentence_length: int = 4192  # sentencepiece: longer lines (bytes) are skipped
    max_sentences: int | None = None  # sentencepiece: sample at most this many lines (seeded)
    num_threads: int = 4  # sentencepiece: trainer threads; part of the result, so fixed here
    min_frequency: int = 2  # huggingface: a merge/piece must occur at least this often
    max_documents: int | None = None  # read at most this many documents (all sources together)
    seed: int = 0  # random seed (sentencepiece sentence sampling)
    # sentencepiece: ids of the meta pieces unk/bos/eos/pad (-1 = absent), e.g. T5's {pad: 0, eos: 1, unk: 2, bos: -1};
    # None → unk 0, bos 1, eos 2, pad 3 (pad only when "<pad>" is in special_tokens)
    meta_piece_ids: dict[str, int] | None = None
    # wordpiece: convert the trained sentencepiece bpe into a WordPiece vocab.txt with ## continuation
    # pieces (GatorTron's recipe; toolkit/tokenization/sp_to_wordpiece.py); None → keep the library's format
    convert_to: str | None = None

    @property
    def specials(self) -> list[str]:
        return list(self.special_tokens) if self.special_tokens is not None else list(DEFAULT_SPECIALS[self.model])


#: what a spec's ``name`` may be: it names the output folder ``tokenizers/<name>/``
SPEC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def load_spec(spec_path: str | Path) -> tuple[TokenizerSpec, Path]:
    """Read and validate a spec file; returns the spec and the file's resolved path."""
    path = Path(spec_path).expanduser()
    if not path.is_file():
        raise ConfigError(f"tokenizer spec not found: {path}; pass a YAML file such as tokenizers/english-bpe.yaml")
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc}); fix the file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a tokenizer spec must be a mapping of keys (name, library, model, …)")
    return _validate(raw, path), path.resolve()


def _validate(raw: dict[str, Any], path: Path) -> TokenizerSpec:
    fields = {f.name: f for f in dataclasses.fields(TokenizerSpec)}
    for key in raw:
        if key not in fields:
            hint = closest(str(key), fields)
            raise ConfigError(f"{path}: unknown key {key!r}" + (f"; did you mean {hint!r}?" if hint else ""))
    for key in ("name", "library", "model", "vocab_size"):
        if raw.get(key) is None:
            raise ConfigError(f"{path}: missing required key {key!r}")

    def bad(key: str, want: str) -> ConfigError:
        return ConfigError(f"{path}: key {key!r} must be {want} (got {raw[key]!r})")

    for key in ("name", "library", "model", "corpus", "json_key"):
        if raw.get(key) is not None and (not isinstance(raw[key], str) or not raw[key].strip()):
            raise bad(key, "a non-empty string")
    for key in ("vocab_size", "max_sentence_length", "max_sentences", "num_threads", "min_frequency", "max_documents"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise bad(key, "a positive integer")
    if "seed" in raw and (not isinstance(raw["seed"], int) or isinstance(raw["seed"], bool) or raw["seed"] < 0):
        raise bad("seed", "a non-negative integer")
    for key in ("lowercase", "byte_fallback"):
        if key in raw and not isinstance(raw[key], bool):
            raise bad(key, "true or false")
    cov = raw.get("character_coverage")
    if cov is not None and (isinstance(cov, bool) or not isinstance(cov, (int, float)) or not 0 < cov <= 1):
        raise bad("character_coverage", "a number in (0, 1]")
    for key in ("files", "special_tokens"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) and v for v in value)):
            raise bad(key, "a list of non-empty strings")
    if not SPEC_NAME.fullmatch(raw["name"]):  # the output folder tokenizers/<name>/: never '..', '.' or a path
        raise bad("name", "a plain name of letters, digits, '.', '_' and '-' that starts with a letter or digit")
    if raw["library"] not in MODELS:
        raise bad("library", " or ".join(MODELS))
    if raw["model"] not in MODELS[raw["library"]]:
        raise bad("model", f"one of {', '.join(MODELS[raw['library']])} for library {raw['library']}")
    if (raw.get("corpus") is None) == (raw.get("files") is None) or raw.get("files") == []:
        raise ConfigError(f"{path}: give exactly one of 'corpus' (a shipped corpus name) or 'files' (a list of paths)")
    spec = TokenizerSpec(**raw)
    specials = spec.specials
    if len(set(specials)) != len(specials):
        raise bad("special_tokens", "a list without repeats")
    if spec.model == "wordpiece" and "[UNK]" not in specials:
        raise ConfigError(f"{path}: key 'special_tokens' must include '[UNK]' for a wordpiece model")
    ids = raw.get("meta_piece_ids")
    if ids is not None and (spec.library != "sentencepiece" or not isinstance(ids, dict)
                            or not set(ids) <= {"unk", "bos", "eos", "pad"} or ids.get("unk", 0) < 0
                            or any(not isinstance(v, int) or isinstance(v, bool) or v < -1 for v in ids.values())
                            or len([v for v in ids.values() if v >= 0]) != len({v for v in ids.values() if v >= 0})):
        raise bad("meta_piece_ids", "a mapping of unk/bos/eos/pad to distinct ids (-1 = absent; unk required), "
                  "for library sentencepiece")
    if spec.convert_to is not None and (spec.convert_to != "wordpiece" or spec.library != "sentencepiece"
                                        or spec.model != "bpe"):
        raise bad("convert_to", "wordpiece, with library sentencepiece and model bpe")
    if spec.convert_to == "wordpiece" and spec.special_tokens and "[UNK]" not in specials:
        raise ConfigError(f"{path}: key 'special_tokens' must include '[UNK]' when converting to wordpiece")
    if spec.vocab_size <= len(specials) + (len(_SPM_META) if spec.library == "sentencepiece" else 0):
        raise bad("vocab_size", "larger than the number of special tokens")
    return spec


# ---------------------------------------------------------------------------- corpus streaming


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _sources(spec: TokenizerSpec, spec_file: Path) -> list[Path]:
    if spec.corpus is not None:
        found = corpora_dir() / f"{spec.corpus}.jsonl.gz"
        if not found.is_file():
            names = sorted(p.name[: -len(".jsonl.gz")] for p in corpora_dir().glob("*.jsonl.gz"))
            hint = closest(spec.corpus, names)
            raise ConfigError(
                f"{spec_file}: key 'corpus': no shipped corpus named {spec.corpus!r}"
                + (f"; did you mean {hint!r}?" if hint else f"; shipped: {', '.join(names) or 'none'}")
            )
        return [found]
    paths = []
    for name in spec.files or []:
        p = Path(name).expanduser()
        p = p if p.is_absolute() else spec_file.parent / p
        if not p.is_file():
            raise ConfigError(f"{spec_file}: key 'files': {p} not found")
        paths.append(p)
    return paths


def iter_documents(paths: list[Path], json_key: str = "text", limit: int | None = None) -> Iterator[str]:
    """Stream the documents of jsonl files (one ``json_key`` text per line) and plain text files
    (one document per line), in order; at most ``limit`` documents."""
    count = 0
    for path in paths:
        is_jsonl = any(s in (".jsonl", ".json", ".ndjson") for s in path.suffixes)
        try:
            with _open_text(path) as handle:
                for lineno, line in enumerate(handle, 1):
                    if limit is not None and count >= limit:
                        return
                    if is_jsonl:
                        if not line.strip():
                            continue
                        try:
                            text = json.loads(line)[json_key]
                        except (ValueError, KeyError, TypeError):
                            raise DataError(
                                f"{path}:{lineno}: expected a JSON object with a string {json_key!r} field; "
                                "fix the line or set json_key"
                            ) from None
                        if not isinstance(text, str):
                            raise DataError(f"{path}:{lineno}: field {json_key!r} is not a string")
                    else:
                        text = line.rstrip("\n")
                    if text.strip():
                        count += 1
                        yield text
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: cannot read ({exc}); the file is corrupt or truncated") from None


# ---------------------------------------------------------------------------- trainers


def _train_sentencepiece(spec: TokenizerSpec, docs: Iterator[str], normalization_rule_name: str | None = None
                         ) -> Tokenizer:
    import sentencepiece as spm

    failure: list[Exception] = []

    def lines() -> Iterator[str]:
        try:
            for doc in docs:
                for line in doc.split("\n"):
                    if line.strip():
                        yield line
        except Exception as exc:  # SentencePiece would wrap it in a RuntimeError; keep the original
            failure.append(exc)
            raise

    specials = spec.specials
    options: dict[str, Any] = dict(
        model_type=spec.model,
        vocab_size=spec.vocab_size,
        character_coverage=spec.character_coverage,
        byte_fallback=spec.byte_fallback,
        max_sentence_length=spec.max_sentence_length,
        num_threads=spec.num_threads,
        normalization_rule_name=normalization_rule_name or ("nmt_nfkc_cf" if spec.lowercase else "nmt_nfkc"),
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3 if "<pad>" in specials else -1,
        user_defined_symbols=[t for t in specials if t not in _SPM_META],
        minloglevel=2,
    )
    options.update({f"{k}_id": v for k, v in (spec.meta_piece_ids or {}).items()})  # e.g. T5: pad 0, eos 1, unk 2
    if spec.max_sentences is not None:
        options.update(input_sentence_size=spec.max_sentences, shuffle_input_sentence=True)
    spm.set_random_generator_seed(spec.seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=lines(), model_writer=model, **options)
    except (RuntimeError, OSError) as exc:
        if failure:
            raise failure[0] from None
        raise TokenizerError(f"SentencePiece training of {spec.name!r} failed: {first_line(exc)}") from None
    return SentencePieceTokenizer(model.getvalue())


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == _BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _train_huggingface(spec: TokenizerSpec, docs: Iterator[str]) -> Tokenizer:
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = spec.specials
    if spec.model == "byte_level_bpe":
        tok = HFTok(models.BPE())
        if spec.lowercase:
            tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=spec.vocab_size,
            min_frequency=spec.min_frequency,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_batches(docs), trainer=trainer)
        return HFTokenizer(tok, lowercase=spec.lowercase)
    tok = HFTok(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=spec.lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=spec.min_frequency,
        special_tokens=specials,
        continuing_subword_prefix="##",
        show_progress=False,
    )
    tok.train_from_iterator(_batches(docs), trainer=trainer)
    # Rebuild through the vocab.txt path so a trained and a loaded WordPiece are the same pipeline.
    return HFTokenizer(build_wordpiece(tok.get_vocab(with_added_tokens=True), spec.lowercase), lowercase=spec.lowercase)


def train_tokenizer(spec: TokenizerSpec, spec_file: Path = Path("<spec>")) -> Tokenizer:
    """Train the tokenizer ``spec`` describes and return it (nothing is written)."""
    docs = iter_documents(_sources(spec, spec_file), spec.json_key, spec.max_documents)
    if spec.convert_to == "wordpiece":

        return train_sentencepiece_wordpiece(spec, docs, train_sentencepiece=_train_sentencepiece)
    if spec.library == "sentencepiece":
        return _train_sentencepiece(spec, docs)
    return _train_huggingface(spec, docs)


def train_from_spec(spec_path: str | Path, output: str | Path | None = None) -> Path:
    """Train the tokenizer a YAML spec describes and save it; returns the output folder.

    ``output`` defaults to ``tokenizers_dir()/<name>``. Files are written only once training has
    succeeded; tokenizer files of an earlier tokenizer in that folder are replaced, others are kept.
    """
    spec, spec_file = load_spec(spec_path)
    tokenizer = train_tokenizer(spec, spec_file)
    target = Path(output).expanduser() if output is not None else tokenizers_dir() / spec.name
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".train-", dir=target) as tmp:
            written = {p.name for p in tokenizer.save(tmp)}
            for name in _TOKENIZER_FILES - written:
                (target / name).unlink(missing_ok=True)
            for name in sorted(written):
                os.replace(Path(tmp) / name, target / name)
    except OSError as exc:
        raise TokenizerError(f"cannot write tokenizer to {target} ({exc.strerror or exc}); pass another output folder") from None
    return target
