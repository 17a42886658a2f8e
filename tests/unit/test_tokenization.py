"""Tokenizer layer: SentencePiece and Hugging Face tokenizers, loading, special ids, training."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from toolkit.assets import corpora_dir, tokenizers_dir
from toolkit.errors import ConfigError, DataError, TokenizerError
from toolkit.tokenization import (
    HFTokenizer,
    SentencePieceTokenizer,
    detect_special_ids,
    load_tokenizer,
    train_from_spec,
)

PARAGRAPH = (
    "It was a bright cold day in April, and the clocks were striking thirteen. The rain fell "
    "softly on the old stone walls of the castle; nobody answered when the guard called out.\n\n"
    "\"Who's there?\" asked the young soldier -- twice, then a third time (louder).  Numbers: 1, 22, 333."
)
WORDS = (
    "the a king queen castle night day sword crown river forest speak answer wonder silent bright "
    "cold warm garden letter friend enemy honest gentle storm ship island music father mother"
).split()


def _write_text(path: Path, lines: int = 1500, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(lines):
            words = [rng.choice(WORDS) for _ in range(rng.randint(5, 14))]
            f.write(" ".join(words).capitalize() + rng.choice([".", "!", "?", ","]) + "\n")
    return path


def _write_spec(folder: Path, name: str, **fields) -> Path:
    import yaml

    spec = {"name": name, **fields}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    return _write_text(tmp_path_factory.mktemp("corpus") / "small.txt")


# ---------------------------------------------------------------------------- SentencePiece


@pytest.mark.parametrize("model", ["bpe", "unigram"])
def test_sentencepiece_train_roundtrip_save_load(tmp_path, text_file, model):
    spec = _write_spec(
        tmp_path, f"spm-{model}", library="sentencepiece", model=model, vocab_size=100,
        files=[str(text_file)], special_tokens=["<pad>", "<|endoftext|>", "<mask>"], character_coverage=1.0,
    )
    out = train_from_spec(spec, tmp_path / "out")
    assert (out / "tokenizer.model").is_file()
    tok = load_tokenizer(out)
    assert isinstance(tok, SentencePieceTokenizer) and tok.library == "sentencepiece"
    assert tok.vocab_size == 100
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert tok.eod_id == tok.token_to_id("<|endoftext|>") == 4
    assert tok.mask_id == 5 and tok.token_to_id("no-such-piece") is None

    text = "The king speak to the queen in the silent garden."
    ids = tok.encode(text)
    assert ids and all(i not in (tok.bos_id, tok.eos_id) for i in ids)  # nothing added
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eod_id, tok.eos_id, tok.pad_id]) == text  # specials dropped
    assert tok.encode_batch([text, "a storm"]) == [ids, tok.encode("a storm")]

    saved = tok.save(tmp_path / "copy")
    assert [p.name for p in saved] == ["tokenizer.model"]
    again = load_tokenizer(saved[0])  # the file itself
    assert again.encode(PARAGRAPH) == tok.encode(PARAGRAPH)
    assert load_tokenizer(tmp_path / "copy", type="sentencepiece").encode(text) == ids


def test_sentencepiece_training_is_deterministic(tmp_path, text_file):
    spec = _write_spec(tmp_path, "det", library="sentencepiece", model="unigram", vocab_size=100, files=[str(text_file)])
    a = train_from_spec(spec, tmp_path / "a") / "tokenizer.model"
    b = train_from_spec(spec, tmp_path / "b") / "tokenizer.model"
    assert a.read_bytes() == b.read_bytes()


# ---------------------------------------------------------------------------- Hugging Face


def test_shipped_english_bpe_by_name_roundtrips():
    tok = load_tokenizer("english-bpe")
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 8192
    assert tok.eod_id == tok.token_to_id("<|endoftext|>") == 0
    assert tok.bos_id == tok.eos_id == 0 and tok.pad_id == 1 and tok.unk_id is None
    ids = tok.encode(PARAGRAPH)
    assert 0 not in ids and 1 not in ids
    assert tok.decode(ids) == PARAGRAPH
    assert tok.decode([tok.eod_id, *ids, tok.pad_id]) == PARAGRAPH
    assert tokenizers_dir().joinpath("english-bpe", "tokenizer.json").stat().st_size < 1_000_000


def test_byte_level_training_is_deterministic_and_saves(tmp_path, text_file):
    spec = _write_spec(
        tmp_path, "bl", library="huggingface", model="byte_level_bpe", vocab_size=400,
        files=[str(text_file)], special_tokens=["<|endoftext|>", "<pad>"],
    )
    a = train_from_spec(spec, tmp_path / "a")
    b = train_from_spec(spec, tmp_path / "b")
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    tok = load_tokenizer(a, type="huggingface")
    assert tok.decode(tok.encode(PARAGRAPH)) == PARAGRAPH
    tok.save(tmp_path / "copy")
    assert load_tokenizer(str(tmp_path / "copy")).encode(PARAGRAPH) == tok.encode(PARAGRAPH)


def _bert_vocab() -> list[str]:
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "king", "queen", "un", "##believ", "##able",
            "speak", "##s", ".", ",", "The", "King"]


def test_wordpiece_vocab_folder_cased_and_lowercased(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(_bert_vocab()) + "\n", encoding="utf-8")
    tok = load_tokenizer(folder)
    assert isinstance(tok, HFTokenizer)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.eod_id == 3 and tok.eos_id is None and tok.bos_id is None
    assert tok.encode("The king speaks unbelievable.") == [15, 6, 11, 12, 8, 9, 10, 13]  # cased, no [CLS]/[SEP]
    assert tok.encode("THE") == [1]  # unknown when cased
    assert tok.decode([2, 15, 6, 11, 12, 3]) == "The king speaks"

    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    lower = load_tokenizer(folder)
    assert lower.encode("THE KING") == [5, 6]

    lower.save(tmp_path / "saved")
    assert {p.name for p in (tmp_path / "saved").iterdir()} >= {"tokenizer.json", "vocab.txt", "tokenizer_config.json"}
    assert (tmp_path / "saved" / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1] == _bert_vocab()
    assert load_tokenizer(tmp_path / "saved").encode("THE KING speaks") == lower.encode("THE KING speaks")
    (tmp_path / "saved" / "tokenizer.json").unlink()  # vocab.txt + config alone give the same tokenizer
    assert load_tokenizer(tmp_path / "saved").encode("THE KING speaks") == lower.encode("THE KING speaks")


def test_tokenizer_json_folder_with_sentinels(tmp_path):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "hello": 3, "world": 4}
    raw = HFTok(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.add_special_tokens([f"<extra_id_{n}>" for n in (2, 0, 10, 1)])  # deliberately out of order
    folder = tmp_path / "hf"
    folder.mkdir()
    raw.save(str(folder / "tokenizer.json"))

    tok = load_tokenizer(folder)
    assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.eod_id, tok.bos_id) == (0, 1, 2, 1, None)
    ids = {n: tok.token_to_id(f"<extra_id_{n}>") for n in (0, 1, 2, 10)}
    assert tok.sentinel_ids == [ids[0], ids[1], ids[2], ids[10]]
    assert tok.encode("hello world") == [3, 4]
    assert tok.decode([3, ids[0], 4, 1]) == "hello world"


def test_detect_special_ids_by_name():
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "<extra_id_1>": 7, "<extra_id_0>": 9,
             "<extra_id_11>": 5, "<extra_id_2>": 8}
    found = detect_special_ids(vocab)
    assert (found["pad"], found["unk"], found["cls"], found["sep"], found["mask"]) == (0, 1, 2, 3, 4)
    assert found["eod"] == 3 and found["eos"] is None
    assert found["sentinel"] == [9, 7, 8, 5]
    gpt = detect_special_ids({"<|endoftext|>": 50256, "a": 0})
    assert gpt["eod"] == gpt["eos"] == gpt["bos"] == 50256 and gpt["pad"] is None
    roberta = detect_special_ids({"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4})
    assert (roberta["bos"], roberta["eos"], roberta["eod"], roberta["cls"], roberta["sep"], roberta["mask"]) == (0, 2, 2, 0, 2, 4)


# ---------------------------------------------------------------------------- errors


def test_missing_path_raises(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(str(tmp_path / "nowhere" / "tok.model"))
    with pytest.raises(TokenizerError, match="no tokenizer files"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="unknown tokenizer type"):
        load_tokenizer("english-bpe", type="spm")


def test_corrupt_files_raise(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"')
    with pytest.raises(TokenizerError, match="corrupt") as info:
        load_tokenizer(tmp_path)
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)
    bad_model = tmp_path / "bad.model"
    bad_model.write_bytes(b"\x00\x01 definitely not a protobuf")
    with pytest.raises(TokenizerError, match="corrupt"):
        load_tokenizer(bad_model)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "vocab.txt").write_text("")
    with pytest.raises(TokenizerError, match="empty"):
        load_tokenizer(tmp_path / "empty")


def test_unknown_name_suggests_closest():
    with pytest.raises(TokenizerError, match="did you mean 'english-bpe'"):
        load_tokenizer("englsh-bpe")


def test_bad_spec_raises_config_error(tmp_path, text_file):
    base = dict(library="huggingface", model="byte_level_bpe", vocab_size=300, files=[str(text_file)])
    with pytest.raises(ConfigError, match=r"unknown key 'vocab_sise'.*did you mean 'vocab_size'"):
        train_from_spec(_write_spec(tmp_path, "a", **{**base, "vocab_sise": 3}))
    with pytest.raises(ConfigError, match=r"b\.yaml: key 'vocab_size' must be a positive integer"):
        train_from_spec(_write_spec(tmp_path, "b", **{**base, "vocab_size": "big"}))
    with pytest.raises(ConfigError, match=r"key 'model'"):
        train_from_spec(_write_spec(tmp_path, "c", **{**base, "model": "unigram"}))
    with pytest.raises(ConfigError, match=r"key 'corpus'.*did you mean 'english'"):
        train_from_spec(_write_spec(tmp_path, "d", **{**base, "files": None, "corpus": "englsh"}))
    with pytest.raises(ConfigError, match="not found"):
        train_from_spec(tmp_path / "missing.yaml")


@pytest.mark.parametrize("library,model", [("sentencepiece", "bpe"), ("huggingface", "byte_level_bpe")])
def test_bad_corpus_line_raises_data_error(tmp_path, library, model):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "hello world"}\nnot json\n', encoding="utf-8")
    spec = _write_spec(tmp_path, "bad", library=library, model=model, vocab_size=300, files=["bad.jsonl"])
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        train_from_spec(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- shipped files


def test_tokenizers_folder_is_not_a_python_package():
    import tokenizers

    root = tokenizers_dir()
    assert not list(root.rglob("*.py")) and not list(root.rglob("*.pyc"))
    assert "site-packages" in Path(tokenizers.__file__).parts or "dist-packages" in Path(tokenizers.__file__).parts


def test_shipped_specs_are_valid_and_corpus_present():
    from toolkit.tokenization import load_spec

    for name in ("english-bpe", "english-spm"):
        spec, _ = load_spec(tokenizers_dir() / f"{name}.yaml")
        assert spec.name == name and spec.corpus == "english"
    assert (corpora_dir() / "english.jsonl.gz").is_file()
