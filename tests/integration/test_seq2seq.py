"""Seq2seq fine-tuning of T5 (task.type=seq2seq): a short `megaforge finetune` lifts held-out exact
match far above its start and a trivial baseline; `megaforge evaluate` and `megaforge predict` on the
run; batched greedy decoding with the KV cache equals decoding by full re-forward and transformers'
generate on the exported model, token for token, each row stopping at its EOS."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

from tests.conftest import cli_main

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")]


def _until_eos(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos) + 1] if eos in row else row


@torch.no_grad()
def check_decoding(run, tmp_path, inputs: list[str]) -> None:
    """Batched greedy decoding of the tuned model, right-padded inputs of different lengths: the KV-cached
    decoder equals the full re-forward and the exported model's transformers ``generate``, row by row up
    to its EOS, token for token."""
    transformers = pytest.importorskip("transformers")
    from toolkit.checkpoint import load_megaforge_model

    model, _, tok = load_megaforge_model(run / "checkpoints" / "best")
    model.eval()
    ids = [tok.encode(text) + [tok.eos_id] for text in inputs]
    width = max(len(x) for x in ids)
    tokens = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.bool)
    for r, x in enumerate(ids):
        tokens[r, : len(x)], mask[r, : len(x)] = torch.tensor(x), True
    assert len({len(x) for x in ids}) > 1  # padding inside the batch
    eos, n_new = tok.eos_id, 24
    cached = model.generate_seq2seq(tokens, encoder_padding_mask=mask, max_new_tokens=n_new, decoder_start_id=0,
                                    eos_id=eos).tolist()
    prefix = torch.zeros(len(ids), 1, dtype=torch.long)  # uncached: the whole decoder prefix re-run every step
    for _ in range(n_new):
        nxt = model(tokens, prefix, mask)[:, -1].argmax(-1)
        prefix = torch.cat([prefix, nxt[:, None]], dim=1)
    full = prefix[:, 1:].tolist()
    out = cli_main("convert", str(run / "checkpoints" / "best"), str(tmp_path / "hf"), "--to", "hf")
    assert out.returncode == 0, out.stderr[-2000:]
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    theirs = hf.generate(input_ids=tokens, attention_mask=mask.long(), max_new_tokens=n_new, do_sample=False,
                         eos_token_id=eos, pad_token_id=0)[:, 1:].tolist()
    mine = [_until_eos(r, eos) for r in cached]
    assert mine == [_until_eos(r, eos) for r in full] == [_until_eos(r, eos) for r in theirs]
    assert all(r[-1] == eos for r in mine[:-1]) and len({len(r) for r in mine}) > 1  # rows stop at their own EOS
    for row in cached:  # after its EOS a row only repeats EOS
        assert set(row[len(_until_eos(row, eos)):]) <= {eos}


DRUGS = ["aspirin", "metformin", "insulin", "heparin", "warfarin", "lisinopril"]
PROBLEMS = ["asthma", "diabetes", "gout", "anemia", "migraine", "sepsis"]
TINY = ["model.num_layers=2", "model.num_decoder_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
        "model.kv_channels=16", "model.seq_length=32", "model.decoder_seq_length=24", "trainer.micro_batch_size=16",
        "trainer.global_batch_size=16", "optim.lr=1e-2", "optim.lr_warmup_steps=5", "trainer.num_threads=1",
        "logging.plot=false", "logging.progress_bar=false", "logging.wandb.enabled=false"]


def _record(p: str, d: str, age: int) -> dict:
    return {"note": f"summarize: {age} years, seen for {p}, on {d}.", "summary": f"problems: {p}; drugs: {d}"}


def _rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [_record(rng.choice(PROBLEMS), rng.choice(DRUGS), rng.randrange(20, 90)) for _ in range(n)]


def test_finetune_evaluate_predict(tmp_path):
    train = _rows(400, 1)
    seen = {r["note"] for r in train}
    valid = [{**r, "id": i} for i, r in enumerate([r for r in _rows(40, 2) if r["note"] not in seen][:8])]  # held out
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp_path / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in valid))
    run = tmp_path / "run"
    out = cli_main("finetune", "t5-tiny-clinical", f"task.train_file={tmp_path / 'train.jsonl'}",
                   f"task.valid_file={tmp_path / 'valid.jsonl'}", "task.test_file=", "task.input_field=note",
                   "task.target_field=summary", *TINY, "trainer.max_steps=50", "trainer.eval_interval=50",
                   "checkpoint.save_interval=50", f"trainer.run_dir={run}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fine-tuning for seq2seq: 400 training examples, 8 validation examples" in out.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_exact_match" in r]
    assert [r["step"] for r in val] == [50]
    after = {k[4:]: v for k, v in val[-1].items() if k.startswith("val_")}
    # before: the same model as initialized (step 0), scored the same way; and a trivial baseline, the
    # commonest training target for every row
    from toolkit.checkpoint import load_megaforge_model
    from toolkit.evaluation.metrics import generation_metrics, normalize_answer
    from toolkit.models.build import build_initialized_model
    from toolkit.training import seq2seq

    _, cfg, tok = load_megaforge_model(run / "checkpoints" / "best")
    start = seq2seq.evaluate(build_initialized_model(cfg, torch.device("cpu")), cfg, tok, str(tmp_path / "valid.jsonl"),
                             batch_size=16, device="cpu")
    majority = Counter(r["summary"] for r in train).most_common(1)[0][0]
    baseline = generation_metrics([r["summary"] for r in valid], [majority] * len(valid))
    assert start["exact_match"] == 0.0 and baseline["exact_match"] <= 0.125
    assert after["exact_match"] >= 0.5, (start, baseline, after)
    assert after["token_f1"] > max(start["token_f1"] + 0.5, baseline["token_f1"] + 0.15), (start, baseline, after)

    ev = cli_main("evaluate", str(run), "--split", "valid")
    assert ev.returncode == 0, ev.stderr[-2000:]
    scores = json.loads((run / "eval_valid.json").read_text())
    assert scores["num_examples"] == 8 and scores["exact_match"] == after["exact_match"]
    assert scores["num_tokens"] == after["num_tokens"] and abs(scores["loss"] - after["loss"]) < 1e-4

    pred = cli_main("predict", str(run), "--input", str(tmp_path / "valid.jsonl"), "--output", str(tmp_path / "p.jsonl"))
    assert pred.returncode == 0, pred.stderr[-2000:]
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == list(range(8))  # every input line back, in order, its fields kept
    hits = sum(normalize_answer(r["completion"]) == normalize_answer(r["summary"]) for r in lines)
    assert hits / 8 == scores["exact_match"]  # exact strings: predict and evaluate decode alike
    gen = cli_main("generate", str(run), "--prompt", lines[0]["note"], "--temperature", "0", "--max-new-tokens", "24")
    assert gen.returncode == 0 and gen.stdout.strip() == lines[0]["note"] + lines[0]["completion"], gen.stdout  # echo + output

    check_decoding(run, tmp_path, [r["note"] for r in lines] + ["summarize: seen for gout and asthma, on aspirin "
                                                                "and heparin and insulin."])

    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    bad = cli_main("predict", str(run), "--input", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "b.jsonl"))
    assert bad.returncode == 2 and "needs 'note'" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b.jsonl").exists()
