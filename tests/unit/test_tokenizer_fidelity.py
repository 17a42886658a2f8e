"""Tokenizer fidelity (toolkit.tokenization.fidelity) and the tokenizer_config.json an export derives
from the tokenizer.json it ships: WordPiece lower-cased and cased, byte-level BPE with and without a
prefix space, SentencePiece unigram and BPE — each built and saved the way transformers users do."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest

from toolkit.tokenization import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from toolkit.tokenization.export import export_tokenizer, pipeline_settings
from toolkit.tokenization.fidelity import (
    PROBE_BATTERY,
    TokenizerFidelityError,
    check_export,
    check_folder,
    check_import,
    check_same,
    probe_texts,
)

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

WORDS = ("patient denies chest pain shortness of breath fever cough nausea the and with was no history "
         "café naïve résumé Zürich mmHg mg tablet daily").split()
TEXT = "Patient denies chest pain"


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) for _ in range(300)]
    return [line.capitalize() + rng.choice([".", "!", ", 120/80 mmHg", " 25mg"]) for line in lines]


def _wordpiece(corpus, normalizer) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def _save_fast(tok: Tokenizer, folder: Path, **specials) -> Path:
    """What a transformers user does: wrap in PreTrainedTokenizerFast and save_pretrained."""
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **specials).save_pretrained(folder)
    return folder


BERT_SPECIALS = dict(unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def _round_trip(source: Path, out: Path, tokenizer_class: str | None) -> tuple[HFTokenizer, dict]:
    """Import (megaforge loads the saved folder; checked against AutoTokenizer on it), then export
    (checked against our tokenizer); returns ours and the exported tokenizer_config.json."""
    ours = load_tokenizer(source)
    check_import(source, ours, result_name="ours").raise_if_failed()
    export_tokenizer(ours, out, model_max_length=64, tokenizer_class=tokenizer_class)
    check_export(ours, out).raise_if_failed()
    check_folder(out).raise_if_failed()  # what publish checks: the config agrees with the files
    return ours, json.loads((out / "tokenizer_config.json").read_text())


def _tokens(folder: Path, text: str = TEXT) -> list[str]:
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    return tok.convert_ids_to_tokens(tok(text)["input_ids"])


# ---------------------------------------------------------------------------- the battery


def test_battery_covers_the_issue_cases_and_every_special_token():
    texts = probe_texts(["[MASK]", "<extra_id_0>"])
    for needle in ("", "120/80 mmHg", "25mg", "a  b   c    d", "line one\nline two\n\nline four\n", "a" * 150):
        assert needle in texts
    assert any(any(ord(c) > 0x1F000 for c in t) for t in texts)  # emoji
    assert any("\u0301" in t for t in texts) and any("東京" in t for t in texts)
    assert texts[: len(PROBE_BATTERY)] == list(PROBE_BATTERY)
    assert texts[len(PROBE_BATTERY):] == ["[MASK]", "before [MASK] after", "<extra_id_0>", "before <extra_id_0> after"]


def test_lowercasing_difference_is_one_line_with_text_and_both_id_lists(corpus):
    lower = HFTokenizer(_wordpiece(corpus, normalizers.BertNormalizer(lowercase=True)))
    cased = HFTokenizer(Tokenizer.from_str(lower.backend.to_str()))
    cased.backend.normalizer = normalizers.BertNormalizer(lowercase=False)
    report = check_same(lower, cased, source_name="source", result_name="result")
    assert not report.ok and report.mismatch[0] == TEXT  # "" and the first text agree only when nothing is cased
    with pytest.raises(TokenizerFidelityError) as e:
        report.raise_if_failed()
    msg = str(e.value)
    assert e.value.exit_code == 1 and "\n" not in msg and repr(TEXT) in msg
    assert str(lower.encode(TEXT)) in msg and str(cased.encode(TEXT)) in msg
    assert check_same(lower, lower, source_name="a", result_name="b").ok


def test_special_token_with_another_id_is_reported(corpus):
    ours = HFTokenizer(_wordpiece(corpus, normalizers.BertNormalizer(lowercase=True)))
    other = HFTokenizer(Tokenizer.from_str(ours.backend.to_str()))
    other.backend.add_special_tokens(["<extra>"])
    report = check_same(other, ours, source_name="a", result_name="b")
    assert report.mismatch == ("<extra>", [ours.vocab_size], None) and report.what == "token"
    assert "special token '<extra>'" in report.message()


# ---------------------------------------------------------------------------- WordPiece


def test_lowercasing_wordpiece_saved_without_do_lower_case(tmp_path, corpus):
    # the issue: PreTrainedTokenizerFast.save_pretrained writes no do_lower_case beside a lower-casing tokenizer.json
    source = _save_fast(_wordpiece(corpus, normalizers.BertNormalizer(lowercase=True)), tmp_path / "src",
                        **BERT_SPECIALS)
    assert "do_lower_case" not in json.loads((source / "tokenizer_config.json").read_text())
    ours, config = _round_trip(source, tmp_path / "out", "BertTokenizer")
    assert ours.lowercase is True
    assert config["tokenizer_class"] == "BertTokenizer" and config["do_lower_case"] is True
    assert config["strip_accents"] is None and config["tokenize_chinese_chars"] is True
    assert config["model_max_length"] == 64 and config["mask_token"] == "[MASK]"
    assert _tokens(tmp_path / "out") == _tokens(source) and "[UNK]" not in _tokens(source)


def test_cased_wordpiece_saved_by_bert_tokenizer(tmp_path, corpus):
    vocab = _wordpiece(corpus, normalizers.BertNormalizer(lowercase=False)).get_vocab()
    transformers.BertTokenizer(vocab=vocab, do_lower_case=False).save_pretrained(tmp_path / "src")
    ours, config = _round_trip(tmp_path / "src", tmp_path / "out", "BertTokenizer")
    assert ours.lowercase is False and config["do_lower_case"] is False
    assert config["tokenizer_class"] == "BertTokenizer"
    assert _tokens(tmp_path / "out", "Café") == _tokens(tmp_path / "src", "Café")


def test_wordpiece_with_a_normalizer_bert_tokenizer_cannot_rebuild(tmp_path, corpus):
    # NFD + Lowercase + StripAccents is not a BertNormalizer: BertTokenizer would rebuild another pipeline
    norm = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    source = _save_fast(_wordpiece(corpus, norm), tmp_path / "src", **BERT_SPECIALS)
    _, config = _round_trip(source, tmp_path / "out", "BertTokenizer")
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["do_lower_case"] is True and config["strip_accents"] is True
    assert _tokens(tmp_path / "out", "Naïve Café")[1:-1] == _tokens(source, "Naïve Café")[1:-1]


# ---------------------------------------------------------------------------- byte-level BPE


@pytest.mark.parametrize("prefix_space", [False, True])
def test_byte_level_bpe_with_and_without_prefix_space(tmp_path, corpus, prefix_space):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    source = _save_fast(tok, tmp_path / "src", bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                        pad_token="<pad>")
    ours, config = _round_trip(source, tmp_path / "out", None)
    assert config["add_prefix_space"] is prefix_space and "do_lower_case" not in config
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    # with a prefix space, "Patient" at the start is tokenized as " Patient"
    assert (ours.encode("Patient") == ours.encode(" Patient")) is prefix_space


# ---------------------------------------------------------------------------- SentencePiece


def _spm_model(corpus, model_type: str) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, model_type=model_type,
                                   vocab_size=100, hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
                                   user_defined_symbols=["<extra_id_0>", "<extra_id_1>"], minloglevel=2)
    return buf.getvalue()


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def spm_model(request, corpus) -> tuple[str, bytes]:
    return request.param, _spm_model(corpus, request.param)


@pytest.mark.parametrize("tokenizer_class", ["T5Tokenizer", None])
def test_megaforge_sentencepiece_exports_faithfully(tmp_path, spm_model, tokenizer_class):
    kind, proto = spm_model
    ours = SentencePieceTokenizer(proto)
    export_tokenizer(ours, tmp_path, model_max_length=64, tokenizer_class=tokenizer_class)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    check_export(ours, tmp_path).raise_if_failed()
    check_folder(tmp_path).raise_if_failed()
    # T5Tokenizer rebuilds a unigram pipeline: a BPE model keeps tokenizer.json's through PreTrainedTokenizerFast
    expected = "T5Tokenizer" if tokenizer_class and kind == "unigram" else "PreTrainedTokenizerFast"
    assert config["tokenizer_class"] == expected and config["add_prefix_space"] is True
    assert config["unk_token"] == "<unk>" and config["model_max_length"] == 64
    assert (tmp_path / ("spiece.model" if expected == "T5Tokenizer" else "tokenizer.model")).is_file()


def test_sentencepiece_saved_by_transformers_round_trips(tmp_path, spm_model):
    kind, proto = spm_model
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "spiece.model").write_bytes(proto)
    (raw / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0}))
    transformers.AutoTokenizer.from_pretrained(str(raw)).save_pretrained(tmp_path / "src")
    ours, config = _round_trip(tmp_path / "src", tmp_path / "out", "T5Tokenizer")
    assert isinstance(ours, HFTokenizer) and config["add_prefix_space"] is True


# ---------------------------------------------------------------------------- settings read off tokenizer.json


def test_pipeline_settings():
    bert = {"normalizer": {"type": "BertNormalizer", "lowercase": True, "strip_accents": None, "clean_text": True,
                           "handle_chinese_chars": False},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "model": {"type": "WordPiece", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100}}
    s = pipeline_settings(bert)
    assert (s["do_lower_case"], s["strip_accents"], s["add_prefix_space"]) == (True, True, None)
    assert s["bert"] == {"do_lower_case": True, "tokenize_chinese_chars": False, "strip_accents": None}
    assert pipeline_settings({**bert, "model": {**bert["model"], "max_input_chars_per_word": 50}})["bert"] is None
    cased = {**bert, "normalizer": {**bert["normalizer"], "lowercase": False, "strip_accents": True}}
    assert pipeline_settings(cased)["do_lower_case"] is False and pipeline_settings(cased)["strip_accents"] is True
    seq = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Split"},
                                                                   {"type": "ByteLevel", "add_prefix_space": True}]}}
    assert pipeline_settings(seq)["add_prefix_space"] is True
    assert pipeline_settings({"pre_tokenizer": {"type": "Metaspace", "prepend_scheme": "never"}})["add_prefix_space"] \
        is False
