"""SentencePiece BPE → WordPiece conversion and the shipped clinical vocabulary."""

import gzip
import json
from pathlib import Path

import pytest

from toolkit.assets import corpora_dir, tokenizers_dir
from toolkit.errors import ConfigError
from toolkit.tokenization import load_tokenizer, train_from_spec
from toolkit.tokenization.sp_to_wordpiece import convert_pieces, is_punctuation, sp_to_wordpiece_vocab
from toolkit.tokenization.spm import SentencePieceTokenizer

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
NOTES = [
    "Patient admitted with chest pain. BP 125/93 mmHg, HR 75 bpm.",
    "Hypertension: continue amlodipine 5mg daily; recheck creatinine in 2 weeks.",
    "Chest X-ray: no acute cardiopulmonary process. Patient stable for discharge.",
    "Nursing note: patient ambulating, pain 3/10, tolerating diet.",
] * 30


def squeeze(text: str) -> str:
    return "".join(text.split())


def test_convert_pieces_rules():
    vocab = convert_pieces(["\u2581the", "\u2581pat", "ient", "s", "\u2581", "mg.", "\u2581.", "\u2581a", "ient"])
    assert vocab[:5] == SPECIALS
    body = vocab[5:]
    # word-start pieces lose ▁, continuations gain ##, the bare ▁ and unreachable "mg." are dropped,
    # repeats keep their first id
    assert body[:5] == ["the", "pat", "##ient", "##s", "."]
    assert "a" in body and "mg." not in body and "##mg." not in body and "" not in body
    for ch in "thepains.":
        assert ch in body and "##" + ch in body  # every character both word-initial and continuing
    assert len(set(vocab)) == len(vocab)


def test_punctuation_matches_bert_pretokenizer():
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.BertPreTokenizer()
    for ch in "abc09.,;:/()[]-+%°µ—'\"#$&*<=>?@\\^_`{|}~²→":
        alone = [w for w, _ in pre.pre_tokenize_str(f"x{ch}x")] == ["x", ch, "x"]
        assert alone == is_punctuation(ch), ch


def _spec(tmp_path: Path, **extra) -> Path:
    corpus = tmp_path / "notes.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in NOTES))
    fields = dict(name="tiny-clinical", library="sentencepiece", model="bpe", convert_to="wordpiece", vocab_size=120,
                  files=["notes.jsonl"], character_coverage=1.0, num_threads=1)
    fields.update(extra)
    spec = tmp_path / "tiny.yaml"
    spec.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in fields.items()) + "\n")
    return spec


def test_train_converts_to_wordpiece(tmp_path):
    out = train_from_spec(_spec(tmp_path), tmp_path / "tok")
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    vocab = (out / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert vocab[:5] == SPECIALS and len(set(vocab)) == len(vocab)
    assert not any(t.startswith("\u2581") or t in ("<unk>", "<s>", "</s>") for t in vocab)
    assert any(t.startswith("##") for t in vocab)
    tok = load_tokenizer(out)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert json.loads((out / "tokenizer_config.json").read_text())["do_lower_case"] is False
    for text in NOTES[:4]:
        ids = tok.encode(text)
        assert tok.unk_id not in ids
        assert squeeze(tok.decode(ids)) == squeeze(text)  # cased, lossless up to spacing
    # the same vocab.txt loaded on its own gives the same ids
    alone = load_tokenizer(out / "vocab.txt")
    assert alone.encode(NOTES[1]) == tok.encode(NOTES[1])


def test_conversion_keeps_every_reachable_piece(tmp_path):
    from toolkit.tokenization.training import _train_sentencepiece, load_spec

    spec, _ = load_spec(_spec(tmp_path))
    sp = _train_sentencepiece(spec.__class__(**{**spec.__dict__, "convert_to": None}), iter(NOTES),
                              normalization_rule_name="identity")
    assert isinstance(sp, SentencePieceTokenizer)
    vocab = set(sp_to_wordpiece_vocab(sp))
    for i in range(sp.vocab_size):
        piece = sp.id_to_token(i)
        if piece in ("<unk>", "<s>", "</s>") or piece == "\u2581":
            continue
        word = piece.lstrip("\u2581")
        if len(word) > 1 and any(is_punctuation(c) for c in word):
            continue
        assert (word if piece.startswith("\u2581") else "##" + piece) in vocab, piece


def test_spec_validation(tmp_path):
    with pytest.raises(ConfigError, match="convert_to"):
        train_from_spec(_spec(tmp_path, convert_to="bpe"), tmp_path / "x")
    spec = _spec(tmp_path)
    spec.write_text(spec.read_text().replace('library: "sentencepiece"', 'library: "huggingface"')
                    .replace('model: "bpe"', 'model: "wordpiece"'))
    with pytest.raises(ConfigError, match="convert_to"):
        train_from_spec(spec, tmp_path / "x")


def test_shipped_clinical_vocab_round_trips_clinical_text():
    tok = load_tokenizer("clinical-wordpiece")
    assert tok.lowercase is False and (tok.cls_id, tok.sep_id, tok.mask_id) == (2, 3, 4)
    assert tok.vocab_size < 8192
    vocab = (tokenizers_dir() / "clinical-wordpiece" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == tok.vocab_size == len(set(vocab)) and vocab[:5] == SPECIALS
    with gzip.open(corpora_dir() / "clinical.jsonl.gz", "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for _, line in zip(range(300), f)]
    docs.append("Pt c/o SOB. SpO2 92% (RA), T 38.4°C; troponin <0.01 ng/mL. Start ceftriaxone 1g IV q24h → reassess.")
    for text in docs:
        ids = tok.encode(text)
        assert tok.unk_id not in ids
        assert squeeze(tok.decode(ids)) == squeeze(text)


def test_shipped_clinical_vocab_is_reproducible(tmp_path):
    out = train_from_spec(tokenizers_dir() / "clinical-wordpiece.yaml", tmp_path / "again")
    shipped = (tokenizers_dir() / "clinical-wordpiece" / "vocab.txt").read_text(encoding="utf-8")
    assert (out / "vocab.txt").read_text(encoding="utf-8") == shipped


def test_shipped_clinical_vocab_matches_transformers_bert_tokenizer():
    transformers = pytest.importorskip("transformers")
    folder = tokenizers_dir() / "clinical-wordpiece"
    ref = transformers.BertTokenizer(str(folder / "vocab.txt"), do_lower_case=False)
    tok = load_tokenizer("clinical-wordpiece")
    text = "Essential (primary) hypertension: BP 125/93 mmHg — poorly controlled; Amlodipine continue."
    assert ref.convert_tokens_to_ids(ref.tokenize(text)) == tok.encode(text)
