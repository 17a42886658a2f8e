"""Write a megaforge :class:`~toolkit.tokenization.base.Tokenizer` as a Hugging Face tokenizer folder.

The folder loads with ``transformers.AutoTokenizer.from_pretrained(folder)`` and gives the same
token ids as ours (checked on every conversion by :mod:`toolkit.tokenization.fidelity`):

* Hugging Face ``tokenizers`` models (byte-level BPE, WordPiece, any ``tokenizer.json``):
  ``tokenizer.json`` as is (+ ``vocab.txt`` for WordPiece), loaded by ``PreTrainedTokenizerFast``,
  which runs that exact pipeline.
* SentencePiece models (unigram or BPE): ``tokenizer.model`` plus a ``tokenizer.json`` built from
  the model's pieces, normalization table and whitespace rules (:func:`spm_to_tokenizers`), also
  loaded by ``PreTrainedTokenizerFast``.

Both also get ``tokenizer_config.json`` and ``special_tokens_map.json``. The config's settings are
read off the ``tokenizer.json`` written (:func:`pipeline_settings`), never remembered elsewhere:
special tokens, ``model_max_length``, ``do_lower_case`` / ``strip_accents`` (WordPiece, or any
normalizer that lower-cases or strips accents) and ``add_prefix_space`` (byte-level or Metaspace
pre-tokenizers). A model family may ask for its own transformers class (``tokenizer_class``), which
changes what ``AutoTokenizer`` adds around the ids but never the ids; it is used only where the class
rebuilds the same pipeline:

* ``BertTokenizer``: a ``BertNormalizer`` + ``BertPreTokenizer`` + ``##`` WordPiece (100 characters a
  word); ``do_lower_case``, ``strip_accents`` and ``tokenize_chinese_chars`` are the normalizer's;
  ``[CLS] A [SEP] B [SEP]`` and token type ids.
* ``T5Tokenizer``: a unigram SentencePiece model with ``<unk>`` at id 2 and ``</s>`` as EOS, a dummy
  prefix and whitespace cleanup, no byte fallback: the model as ``spiece.model``, ``</s>`` appended to
  every sequence, the ``<extra_id_N>`` sentinels listed as additional special tokens (``extra_ids: 0``:
  they are pieces of the model already, at the ids our tokenizer gives them).

Any other class, or a tokenizer the class does not fit, gets ``PreTrainedTokenizerFast``, which runs
``tokenizer.json`` as is.
Nothing here imports ``transformers``.
"""

from __future__ import annotations

import json
from pathlib import Path

from toolkit.errors import TokenizerError
from toolkit.tokenization.base import Tokenizer

TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
#: our special-id names → transformers' special-token attribute names
_HF_SPECIALS = {"bos": "bos_token", "eos": "eos_token", "unk": "unk_token", "pad": "pad_token",
                "cls": "cls_token", "sep": "sep_token", "mask": "mask_token"}
#: transformers' "no limit" value of model_max_length
VERY_LARGE = int(1e30)


def special_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    """``{"bos_token": "<s>", ...}`` for the special ids this tokenizer has."""
    out: dict[str, str] = {}
    for ours, theirs in _HF_SPECIALS.items():
        idx = getattr(tokenizer, f"{ours}_id", None)
        if idx is not None:
            out[theirs] = tokenizer.id_to_token(idx)
    return out


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """``{"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}`` for a model's config.json.

    The end-of-document id is what generation must stop on, so it is the EOS when there is one.
    """
    ids: dict[str, int] = {}
    bos = tokenizer.bos_id
    eos = tokenizer.eod_id if tokenizer.eod_id is not None else tokenizer.eos_id
    for key, idx in (("bos_token_id", bos), ("eos_token_id", eos), ("pad_token_id", tokenizer.pad_id)):
        if idx is not None:
            ids[key] = int(idx)
    return ids


def export_tokenizer(tokenizer: Tokenizer, folder: str | Path, *, model_max_length: int | None = None,
                     tokenizer_class: str | None = None) -> list[Path]:
    """Write ``tokenizer``'s Hugging Face files into ``folder``; returns the paths written.

    ``tokenizer_class`` (``BertTokenizer``, ``T5Tokenizer``) is used where it fits the tokenizer,
    else ``PreTrainedTokenizerFast`` (see the module docstring). The settings in
    ``tokenizer_config.json`` are read off the ``tokenizer.json`` written (:func:`pipeline_settings`).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = special_tokens(tokenizer)
    config: dict = {**specials, "model_max_length": model_max_length or VERY_LARGE,
                    "clean_up_tokenization_spaces": False}
    if tokenizer.library == "huggingface":
        written = _write_hf(tokenizer, folder, config, bert=tokenizer_class == "BertTokenizer")
    elif tokenizer.library == "sentencepiece":
        written = _write_spm(tokenizer, folder, config, t5=tokenizer_class == "T5Tokenizer")
        if "additional_special_tokens" in config:
            specials["additional_special_tokens"] = config["additional_special_tokens"]
    else:
        raise TokenizerError(f"cannot export a {type(tokenizer).__name__} to Hugging Face files "
                             f"(library {tokenizer.library!r})")
    if tokenizer_class == "T5Tokenizer":  # even where the class did not fit: T5's forward takes no token types
        config["model_input_names"] = ["input_ids", "attention_mask"]
    (folder / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / SPECIAL_TOKENS_MAP).write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    return written + [folder / TOKENIZER_CONFIG, folder / SPECIAL_TOKENS_MAP]


# ---------------------------------------------------------------------------- what a tokenizer.json does


def _steps(node: dict | None, key: str) -> list[dict]:
    """A normalizer / pre-tokenizer and the members of its ``Sequence``, flattened in order."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [step for child in node.get(key) or [] for step in _steps(child, key)]
    return [node]


def pipeline_settings(data: dict) -> dict:
    """What the ``tokenizer.json`` mapping ``data`` does, as ``tokenizer_config.json`` spells it.

    ``do_lower_case`` (a ``BertNormalizer`` with ``lowercase``, or a ``Lowercase`` step),
    ``strip_accents`` (``BertNormalizer.strip_accents``, which follows lower-casing when null, or a
    ``StripAccents`` step), ``add_prefix_space`` (a ``ByteLevel`` pre-tokenizer's, or a
    ``Metaspace`` one that prepends), and ``bert``: the ``BertNormalizer`` settings when the pipeline
    is exactly what ``BertTokenizer`` rebuilds from ``vocab.txt`` (BertNormalizer with ``clean_text``,
    BertPreTokenizer, WordPiece with ``##`` and 100 characters per word), else None.
    """
    norms = _steps(data.get("normalizer"), "normalizers")
    pres = _steps(data.get("pre_tokenizer"), "pretokenizers")
    model = data.get("model") or {}
    bert_norm = next((n for n in norms if n.get("type") == "BertNormalizer"), None)
    lowercase = any(n.get("type") == "Lowercase" for n in norms) or bool(bert_norm and bert_norm.get("lowercase"))
    if bert_norm is not None and bert_norm.get("strip_accents") is not None:
        strip = bool(bert_norm["strip_accents"])
    elif bert_norm is not None:
        strip = bool(bert_norm.get("lowercase"))  # BertNormalizer: null follows lower-casing
    else:
        strip = False
    strip = strip or any(n.get("type") == "StripAccents" for n in norms)
    out: dict = {"do_lower_case": lowercase, "strip_accents": strip, "add_prefix_space": None, "bert": None}
    for pre in pres:
        if pre.get("type") == "ByteLevel":
            out["add_prefix_space"] = bool(pre.get("add_prefix_space"))
        elif pre.get("type") == "Metaspace":
            out["add_prefix_space"] = pre.get("prepend_scheme", "always") != "never"
    fits_bert = (model.get("type") == "WordPiece" and model.get("continuing_subword_prefix", "##") == "##"
                 and model.get("max_input_chars_per_word", 100) == 100 and len(norms) == 1 and bert_norm is not None
                 and bert_norm.get("clean_text", True) and [p.get("type") for p in pres] == ["BertPreTokenizer"])
    if fits_bert:
        out["bert"] = {"do_lower_case": bool(bert_norm.get("lowercase")),
                       "tokenize_chinese_chars": bool(bert_norm.get("handle_chinese_chars", True)),
                       "strip_accents": bert_norm.get("strip_accents")}
    return out


def _write_hf(tokenizer: Tokenizer, folder: Path, config: dict, *, bert: bool = False) -> list[Path]:
    backend = tokenizer.backend  # type: ignore[attr-defined]
    path = folder / "tokenizer.json"
    backend.save(str(path), pretty=True)
    written = [path]
    settings = pipeline_settings(json.loads(path.read_text(encoding="utf-8")))  # the file shipped
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    wordpiece = getattr(tokenizer, "is_wordpiece", False)
    if wordpiece or settings["do_lower_case"] or settings["strip_accents"]:
        config.update(do_lower_case=settings["do_lower_case"], strip_accents=settings["strip_accents"])
    if settings["add_prefix_space"] is not None:
        config["add_prefix_space"] = settings["add_prefix_space"]
    if wordpiece:
        vocab = sorted(backend.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1])
        (folder / "vocab.txt").write_text("".join(f"{tok}\n" for tok, _ in vocab), encoding="utf-8")
        written.append(folder / "vocab.txt")
    plain_added = [t for t in backend.get_added_tokens_decoder().values() if not t.special]
    if bert and settings["bert"] is not None and tokenizer.cls_id is not None and tokenizer.sep_id is not None \
            and not plain_added:
        # BertTokenizer rebuilds its pipeline from the vocabulary and these settings (transformers 5, and 4.x's
        # slow class or a folder without tokenizer.json): they are the BertNormalizer's of tokenizer.json
        config.update({"tokenizer_class": "BertTokenizer", **settings["bert"]})
    return written


def _fits_t5(tokenizer: Tokenizer, m) -> bool:
    """Whether ``T5Tokenizer`` rebuilds this SentencePiece model's pipeline: a unigram model with
    ``<unk>`` at id 2 and ``</s>`` as EOS, no byte fallback, a dummy prefix, whitespace cleanup and
    splitting (transformers 5 hard-codes these)."""
    trainer, norm = m.trainer_spec, m.normalizer_spec
    unigram = type(trainer).ModelType.Value("UNIGRAM")
    return (trainer.model_type == unigram and trainer.unk_id == 2 and not trainer.byte_fallback
            and norm.add_dummy_prefix and norm.remove_extra_whitespaces and trainer.split_by_whitespace
            and tokenizer.eos_id is not None and tokenizer.id_to_token(tokenizer.eos_id) == "</s>")


def _write_spm(tokenizer: Tokenizer, folder: Path, config: dict, *, t5: bool = False) -> list[Path]:
    proto: bytes = tokenizer.model_proto  # type: ignore[attr-defined]
    fast = spm_to_tokenizers(proto)
    if t5 and tokenizer.eos_id is not None:
        from sentencepiece import sentencepiece_model_pb2 as pb

        from tokenizers import processors

        eos = tokenizer.id_to_token(tokenizer.eos_id)
        fast.post_processor = processors.TemplateProcessing(  # T5 appends </s> to every sequence
            single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tokenizer.eos_id)])
        config["additional_special_tokens"] = [tokenizer.id_to_token(i) for i in tokenizer.sentinel_ids]
        if _fits_t5(tokenizer, pb.ModelProto.FromString(proto)):
            config.update({"tokenizer_class": "T5Tokenizer", "extra_ids": 0})
    t5_class = config.get("tokenizer_class") == "T5Tokenizer"
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    path = folder / ("spiece.model" if t5_class else "tokenizer.model")  # T5Tokenizer's vocab_file name
    path.write_bytes(proto)
    for stale in ("tokenizer.model", "spiece.model"):  # an earlier export into the same folder
        if folder / stale != path and (folder / stale).exists():
            (folder / stale).unlink()
    fast.save(str(folder / "tokenizer.json"), pretty=True)
    settings = pipeline_settings(json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")))
    config["add_prefix_space"] = bool(settings["add_prefix_space"])
    return [path, folder / "tokenizer.json"]


def spm_to_tokenizers(proto: bytes):
    """A ``tokenizers.Tokenizer`` running the same pipeline as a SentencePiece model (unigram or BPE):
    its normalization table, whitespace cleanup, dummy prefix and pieces.

    Known difference: literal user-defined/control token strings inside text (``<extra_id_0>``,
    ``</s>``) are matched as whole tokens, where SentencePiece may first emit a separate ``▁``.
    """
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:
        raise TokenizerError("exporting a SentencePiece tokenizer needs the protobuf package (pip install protobuf)") \
            from None
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as FastTokenizer

    m = pb.ModelProto.FromString(proto)
    trainer, norm = m.trainer_spec, m.normalizer_spec
    unigram, bpe = pb.TrainerSpec.ModelType.Value("UNIGRAM"), pb.TrainerSpec.ModelType.Value("BPE")
    if trainer.model_type == unigram:
        model = models.Unigram([(p.piece, p.score) for p in m.pieces], trainer.unk_id,
                               byte_fallback=trainer.byte_fallback)
    elif trainer.model_type == bpe:
        vocab = {p.piece: i for i, p in enumerate(m.pieces)}
        unk = m.pieces[trainer.unk_id].piece if trainer.unk_id >= 0 else None
        model = models.BPE(vocab, _spm_merges(m, vocab), unk_token=unk, fuse_unk=True,
                           byte_fallback=trainer.byte_fallback)
    else:
        raise TokenizerError("only unigram and BPE SentencePiece models can be exported to tokenizer.json")
    fast = FastTokenizer(model)
    steps = [normalizers.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    fast.normalizer = normalizers.Sequence(steps)
    scheme = "always" if norm.add_dummy_prefix else "never"
    fast.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme,
                                                  split=trainer.split_by_whitespace)
    fast.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme=scheme)
    kinds = {pb.ModelProto.SentencePiece.Type.Value(kind) for kind in ("CONTROL", "USER_DEFINED", "UNKNOWN")}
    fast.add_special_tokens([AddedToken(p.piece, special=True, normalized=False) for p in m.pieces if p.type in kinds])
    return fast


def _spm_merges(m, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges from SentencePiece pieces: a piece's splits into two known pieces, by piece score."""
    normal = type(m.pieces[0]).Type.Value("NORMAL")
    merges: list[tuple[str, str]] = []
    for _, _, piece in sorted((-p.score, i, p.piece) for i, p in enumerate(m.pieces) if p.type == normal):
        splits = sorted((vocab[piece[:k]], vocab[piece[k:]], k) for k in range(1, len(piece))
                        if piece[:k] in vocab and piece[k:] in vocab)
        merges += [(piece[:k], piece[k:]) for _, _, k in splits]
    return merges
