"""Write a megaforge :class:`~toolkit.tokenization.base.Tokenizer` as a Hugging Face tokenizer folder.

The folder loads with ``transformers.AutoTokenizer.from_pretrained(folder)`` and gives the same
token ids as ours (checked by ``toolkit.convert.verify``):

* Hugging Face ``tokenizers`` models (byte-level BPE, WordPiece, any ``tokenizer.json``):
  ``tokenizer.json`` as is (+ ``vocab.txt`` for WordPiece), loaded by ``PreTrainedTokenizerFast``,
  which runs that exact pipeline.
* SentencePiece models (unigram or BPE): ``tokenizer.model`` plus a ``tokenizer.json`` built from
  the model's pieces, normalization table and whitespace rules (:func:`spm_to_tokenizers`), also
  loaded by ``PreTrainedTokenizerFast``.

Both also get ``tokenizer_config.json`` (class, special tokens, ``model_max_length``) and
``special_tokens_map.json``. A model family may ask for its own transformers class
(``tokenizer_class``), which changes what ``AutoTokenizer`` adds around the ids but never the ids:

* ``BertTokenizer`` (WordPiece only): ``do_lower_case``; ``[CLS] A [SEP] B [SEP]`` and token type ids.
* ``T5Tokenizer`` (SentencePiece with ``</s>`` only): the model as ``spiece.model``, ``</s>``
  appended to every sequence, the ``<extra_id_N>`` sentinels listed as additional special tokens
  (``extra_ids: 0``: they are pieces of the model already, at the ids our tokenizer gives them).

Any other class, or a tokenizer the class does not fit, gets ``PreTrainedTokenizerFast``.
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
    else ``PreTrainedTokenizerFast`` (see the module docstring).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = special_tokens(tokenizer)
    config: dict = {**specials, "model_max_length": model_max_length or VERY_LARGE,
                    "clean_up_tokenization_spaces": False}
    if tokenizer.library == "huggingface":
        written = _write_hf(tokenizer, folder, config, bert=tokenizer_class == "BertTokenizer")
    elif tokenizer.library == "sentencepiece":
        t5 = tokenizer_class == "T5Tokenizer" and tokenizer.eos_id is not None
        written = _write_spm(tokenizer, folder, config, t5=t5)
        if t5:
            specials["additional_special_tokens"] = config["additional_special_tokens"]
    else:
        raise TokenizerError(f"cannot export a {type(tokenizer).__name__} to Hugging Face files "
                             f"(library {tokenizer.library!r})")
    if tokenizer_class == "T5Tokenizer":  # even where the class did not fit: T5's forward takes no token types
        config["model_input_names"] = ["input_ids", "attention_mask"]
    (folder / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / SPECIAL_TOKENS_MAP).write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    return written + [folder / TOKENIZER_CONFIG, folder / SPECIAL_TOKENS_MAP]


def _write_hf(tokenizer: Tokenizer, folder: Path, config: dict, *, bert: bool = False) -> list[Path]:
    backend = tokenizer.backend  # type: ignore[attr-defined]
    path = folder / "tokenizer.json"
    backend.save(str(path), pretty=True)
    written = [path]
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if getattr(tokenizer, "is_wordpiece", False):
        vocab = sorted(backend.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1])
        (folder / "vocab.txt").write_text("".join(f"{tok}\n" for tok, _ in vocab), encoding="utf-8")
        written.append(folder / "vocab.txt")
        lowercase = getattr(tokenizer, "lowercase", None)
        if lowercase is not None:
            config["do_lower_case"] = bool(lowercase)
        if bert and tokenizer.cls_id is not None and tokenizer.sep_id is not None:
            # BertTokenizer also builds its pipeline from vocab.txt + these settings (transformers 4.x slow
            # class, or a folder without tokenizer.json): the same BertNormalizer our WordPiece runs
            config.update({"tokenizer_class": "BertTokenizer", "do_lower_case": bool(lowercase),
                           "tokenize_chinese_chars": True, "strip_accents": None})
    return written


def _write_spm(tokenizer: Tokenizer, folder: Path, config: dict, *, t5: bool = False) -> list[Path]:
    proto: bytes = tokenizer.model_proto  # type: ignore[attr-defined]
    path = folder / ("spiece.model" if t5 else "tokenizer.model")  # T5Tokenizer's vocab_file name
    path.write_bytes(proto)
    for stale in ("tokenizer.model", "spiece.model"):  # an earlier export into the same folder
        if folder / stale != path and (folder / stale).exists():
            (folder / stale).unlink()
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    fast = spm_to_tokenizers(proto)
    if t5:
        from tokenizers import processors

        eos = tokenizer.id_to_token(tokenizer.eos_id)  # type: ignore[arg-type]
        fast.post_processor = processors.TemplateProcessing(  # T5 appends </s> to every sequence
            single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tokenizer.eos_id)])
        config.update({"tokenizer_class": "T5Tokenizer", "extra_ids": 0,
                       "additional_special_tokens": [tokenizer.id_to_token(i) for i in tokenizer.sentinel_ids]})
    fast.save(str(folder / "tokenizer.json"), pretty=True)
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
    kinds = {pb.ModelProto.SentencePiece.Type.Value("CONTROL"), pb.ModelProto.SentencePiece.Type.Value("USER_DEFINED")}
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
