"""Supervised fine-tuning of a tiny GPT through `megaforge finetune` (task.type=sft): prompt/completion
and chat records together; the validation loss falls far below its start, and the tuned model
answers held-out prompts and then stops by itself (the end token was trained)."""

from __future__ import annotations

import json
import random

from tests.conftest import cli_main, run_cli

COLORS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red", "sun": "yellow"}
QUICK = ["model.seq_length=64", "trainer.micro_batch_size=16", "trainer.global_batch_size=16", "optim.lr=3e-3",
         "trainer.num_threads=1", "logging.plot=false", "logging.progress_bar=false", "logging.wandb.enabled=false"]


def test_sft_learns_answers_that_end_by_themselves(tmp_path):
    rng = random.Random(0)
    lines = []
    for i in range(300):
        k = rng.choice(sorted(COLORS))
        if i % 2:
            lines.append({"prompt": f"What color is the {k}? Answer:", "completion": f" {COLORS[k]}"})
        else:
            lines.append({"messages": [{"role": "user", "content": f"What color is the {k}?"},
                                       {"role": "assistant", "content": COLORS[k]}]})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "valid.jsonl").write_text("".join(
        json.dumps({"prompt": f"What color is the {k}? Answer:", "completion": f" {v}"}) + "\n" for k, v in COLORS.items()))
    run = tmp_path / "run"
    out = run_cli("finetune", "gpt-tiny", "task.type=sft", f"task.train_file={tmp_path / 'train.jsonl'}",
                  f"task.valid_file={tmp_path / 'valid.jsonl'}", *QUICK, "trainer.max_steps=50", "trainer.eval_interval=10",
                  "checkpoint.save_interval=50", f"trainer.run_dir={run}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fine-tuning for sft: 300 training examples, 6 validation examples" in out.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert val[-1] < 0.2 * val[0], val
    from toolkit.checkpoint import load_megaforge_model
    from toolkit.generation import generate_text

    model, _, tok = load_megaforge_model(run / "checkpoints" / "best")
    answered = 0
    for k, v in COLORS.items():  # greedy: the answer, then the end token and nothing more
        answered += generate_text(model, tok, f"What color is the {k}? Answer:", max_new_tokens=8, temperature=0.0) == f" {v}"
    assert answered >= 5, answered
    chat = run_cli("generate", str(run), "--chat", "--prompt", "What color is the grass?", "--temperature", "0",
                   "--max-new-tokens", "8")  # a user turn, rendered with the template the chat records trained on
    assert chat.returncode == 0 and chat.stdout.strip() == "green", chat.stdout + chat.stderr[-2000:]
    # evaluate: the masked loss on the split's answers
    ev = run_cli("evaluate", str(run), "--split", "valid")
    assert ev.returncode == 0, ev.stderr[-2000:]
    scores = json.loads((run / "eval_valid.json").read_text())
    assert scores["num_tokens"] == sum(len(tok.encode(f" {v}")) + 1 for v in COLORS.values())  # answers + end tokens
    assert scores["loss"] < 0.2 * val[0]
    assert scores["exact_match"] >= 5 / 6 and scores["num_examples"] == 6  # greedy answers, scored
    # export: the plain causal LM, with the chat template it was trained with in tokenizer_config.json
    transformers = __import__("pytest").importorskip("transformers")
    hf = tmp_path / "hf"
    out = run_cli("convert", str(run / "checkpoints" / "best"), str(hf), "--to", "hf", "--verify")
    assert out.returncode == 0 and "verification passed" in out.stdout, out.stderr[-2000:]
    assert json.loads((hf / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    from toolkit.data.tasks.sft import DEFAULT_CHAT_TEMPLATE, encode_sft, parse_sft_record

    assert json.loads((hf / "tokenizer_config.json").read_text())["chat_template"] == DEFAULT_CHAT_TEMPLATE
    theirs = transformers.AutoTokenizer.from_pretrained(str(hf)).apply_chat_template(lines[0]["messages"], tokenize=True)
    theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
    ours, _ = encode_sft(parse_sft_record(lines[0], "t:1"), tok, None)
    assert list(theirs) == ours
    card = run_cli("publish", str(hf), "you/gpt-tiny-colors", "--dry-run")
    assert card.returncode == 0, card.stderr[-2000:]
    assert "Fine-tuned for instruction following" in card.stdout
    assert f"| exact_match | {scores['exact_match']:.4f} |" in card.stdout  # evaluate's scores on the card
    pred = cli_main("predict", str(run), "--input", str(tmp_path / "valid.jsonl"), "--output", str(tmp_path / "p.jsonl"),
                    "--max-new-tokens", "8")  # batched greedy answers, each line written back with its completion
    assert pred.returncode == 0, pred.stderr
    got = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [g["prompt"] for g in got] == [f"What color is the {k}? Answer:" for k in COLORS]
    assert sum(g["completion"] == f" {v}" for g, v in zip(got, COLORS.values())) >= 5


def test_sft_is_for_decoders_and_token_classification_is_for_encoders():
    out = cli_main("finetune", "gpt-tiny", "task.type=token_classification", "task.train_file=x.conll")
    assert out.returncode == 2 and "model.family=gpt fine-tunes for task.type sft, not token_classification" in out.stderr
    out = cli_main("finetune", "bert-tiny-ncbi-disease", "task.type=sft")
    assert out.returncode == 2 and "not sft" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = cli_main("finetune", "bert-tiny-ncbi-disease", "task.packing=true")
    assert out.returncode == 2 and "task.packing=true packs SFT samples" in out.stderr
