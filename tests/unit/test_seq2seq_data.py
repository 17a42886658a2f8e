"""Seq2seq (T5) data: encoder tokens, decoder inputs and labels token by token on hand-built records,
truncation that keeps the EOS and is counted, configurable field names, one-line errors, and the
objective's loss against transformers' T5ForConditionalGeneration on the same batch."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import cli_main
from toolkit.data.tasks.seq2seq import (
    IGNORE_INDEX,
    Seq2SeqDataset,
    encode_seq2seq_examples,
    parse_seq2seq_record,
    read_seq2seq,
)
from toolkit.errors import DataError
from toolkit.tokenization import load_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
TOK = load_tokenizer("english-t5-spm")
EOS, PAD = TOK.eos_id, TOK.pad_id


def test_encoding_token_by_token():
    ex = parse_seq2seq_record({"input": "summarize: takes aspirin", "target": "drugs: aspirin", "id": 7}, "t:1")
    src, tgt = TOK.encode("summarize: takes aspirin"), TOK.encode("drugs: aspirin")
    enc = encode_seq2seq_examples([ex], TOK, seq_length=len(src) + 3, decoder_seq_length=len(tgt) + 4)
    n, m = len(src), len(tgt)
    assert enc.encoder_tokens[0].tolist() == src + [EOS] + [PAD] * 2  # input, EOS, padding
    assert enc.encoder_padding_mask[0].tolist() == [True] * (n + 1) + [False] * 2
    assert enc.labels[0].tolist() == tgt + [EOS] + [IGNORE_INDEX] * 3  # every target token and the EOS are trained
    assert enc.decoder_tokens[0].tolist() == [PAD] + tgt + [EOS] + [PAD] * 2  # shifted right behind the start (pad)
    for j in range(m + 1):  # decoder position j reads label j - 1 and predicts label j
        assert enc.decoder_tokens[0][j] == (PAD if j == 0 else enc.labels[0][j - 1])
    assert (enc.truncated_inputs, enc.truncated_targets) == (0, 0)
    assert ex.record["id"] == 7
    row = Seq2SeqDataset(enc)[0]
    assert set(row) == {"encoder_tokens", "encoder_padding_mask", "decoder_tokens", "labels"}
    assert row["encoder_padding_mask"].dtype == torch.bool


def test_truncation_keeps_eos_and_is_counted():
    long = " ".join(["aspirin"] * 40)
    ex = [parse_seq2seq_record({"input": long, "target": long}, "t:1"),
          parse_seq2seq_record({"input": "short", "target": "ok"}, "t:2")]
    enc = encode_seq2seq_examples(ex, TOK, seq_length=8, decoder_seq_length=6)
    assert enc.encoder_tokens[0].tolist() == TOK.encode(long)[:7] + [EOS]
    assert enc.labels[0].tolist() == TOK.encode(long)[:5] + [EOS]
    assert (enc.truncated_inputs, enc.truncated_targets) == (1, 1)
    assert enc.encoder_padding_mask[1].sum() == len(TOK.encode("short")) + 1


def test_field_names_and_bad_records(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"note": "a b", "summary": "c"}) + "\n" + json.dumps({"note": "x"}) + "\n")
    with pytest.raises(DataError) as e:
        read_seq2seq(path, input_field="note", target_field="summary")
    assert str(e.value).startswith(f"{path}:2: a seq2seq record needs 'note' and 'summary'") and "\n" not in str(e.value)
    assert read_seq2seq(path, input_field="note", target_field=None)[1].input == "x"  # predicting needs inputs only
    with pytest.raises(DataError, match="'target' must be a string"):
        parse_seq2seq_record({"input": "a", "target": 3}, "t:1")


def test_cli_line_without_the_named_field_is_one_line_exit_2(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"input": "a", "target": "b"}) + "\n" + json.dumps({"text": "a"}) + "\n")
    out = cli_main("finetune", "t5-tiny-clinical", f"task.train_file={tmp_path / 'train.jsonl'}", "task.valid_file=",
                   f"trainer.run_dir={tmp_path / 'run'}", "trainer.max_steps=1")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip() == (f"megaforge: error: {tmp_path / 'train.jsonl'}:2: a seq2seq record needs 'input' and 'target' (has "
                                  "['text']); rename the keys or set task.input_field / task.target_field")
    assert not (tmp_path / "run" / "checkpoints").exists()
    out = cli_main("finetune", "gpt-tiny", "task.type=seq2seq", "task.train_file=x.jsonl")
    assert out.returncode == 2 and "model.family=gpt fine-tunes for task.type sft, not seq2seq" in out.stderr


def test_objective_loss_and_decoder_inputs_match_transformers(tmp_path):
    pytest.importorskip("transformers")
    from tests.conversion.conftest import save_hf_model
    from toolkit.checkpoint import load_megaforge_model
    from toolkit.convert import import_hf
    from toolkit.models.t5.objective import seq2seq_lm

    hf = save_hf_model("t5", tmp_path / "hf", vocab_size=TOK.vocab_size)  # tiny, random, v1.0 style
    ours = load_megaforge_model(import_hf(tmp_path / "hf", tmp_path / "mf"))[0].eval()
    records = [{"input": "summarize: takes aspirin daily", "target": "drugs: aspirin"},
               {"input": "no drugs", "target": "problems: none; drugs: none"}]
    enc = encode_seq2seq_examples([parse_seq2seq_record(r, "t") for r in records], TOK, seq_length=16,
                                  decoder_seq_length=10)
    ds = Seq2SeqDataset(enc)
    batch = {k: torch.stack([ds[i][k] for i in range(2)]) for k in ds[0]}
    labels = batch["labels"]
    assert torch.equal(hf._shift_right(labels), batch["decoder_tokens"])  # HF's decoder inputs from the same labels
    theirs = hf(input_ids=batch["encoder_tokens"], attention_mask=batch["encoder_padding_mask"].long(), labels=labels).loss
    with torch.no_grad():
        assert abs(float(seq2seq_lm(ours, batch)) - float(theirs)) < 1e-4
