"""The clinical path of docs/clinical.md, its five steps run end to end on the tiny recipes (fewer
steps): clinical vocabulary → pretrain gatortron-tiny → fine-tune clinical NER from it →
evaluate / predict → export to transformers (verified) and publish --dry-run."""

from __future__ import annotations

import json

from tests.conftest import run_cli

QUICK = ["trainer.num_threads=1", "logging.plot=false", "logging.progress_bar=false", "logging.wandb.enabled=false"]
NOTE = ("ASSESSMENT:\n1. Essential (primary) hypertension: BP 150/90 mmHg — poorly controlled; Amlodipine continue.\n\n"
        "PLAN:\nContinue current medications: Amlodipine, Metformin, Atorvastatin\n")


def test_clinical_path_in_five_steps(tmp_path):
    # 1. a clinical WordPiece vocabulary (SentencePiece BPE on the shipped notes, converted)
    vocab = tmp_path / "vocab"
    out = run_cli("tokenizer", "train", "tokenizers/clinical-wordpiece.yaml", "--output", str(vocab))
    assert out.returncode == 0, out.stderr[-2000:]
    assert (vocab / "vocab.txt").is_file() and (vocab / "tokenizer.json").is_file()

    # 2. pretrain gatortron-tiny with it
    pre = tmp_path / "gatortron-tiny"
    out = run_cli("train", "gatortron-tiny", f"tokenizer.path={vocab}", f"trainer.run_dir={pre}", *QUICK,
                  "trainer.max_steps=3", "trainer.micro_batch_size=4", "trainer.global_batch_size=4",
                  "trainer.eval_interval=0")
    assert out.returncode == 0, out.stderr[-2000:]

    # 3. fine-tune clinical NER (the shipped synthetic task) from the pretraining run
    ner = tmp_path / "clinical-ner"
    out = run_cli("finetune", "gatortron-tiny-clinical-ner", f"checkpoint.init_from={pre}", f"trainer.run_dir={ner}",
                  *QUICK, "trainer.max_steps=4", "trainer.micro_batch_size=8", "trainer.global_batch_size=8",
                  "trainer.eval_interval=4", "trainer.eval_iters=1", "checkpoint.save_interval=4")
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"tokenizer {pre / 'tokenizer'}" in out.stdout  # the vocabulary of step 1 came along
    assert "labels O, B-DRUG, I-DRUG, B-PROBLEM, I-PROBLEM" in out.stdout
    assert "initialized fresh (not in the source): classifier.bias, classifier.weight" in out.stdout

    # 4. evaluate on the test split and predict over a note
    out = run_cli("evaluate", str(ner), "--split", "test")
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads((ner / "eval_test.json").read_text())
    assert metrics["data"] == "clinical-ner:test" and 0 <= metrics["f1_strict"] <= 1
    assert set(metrics["per_type"]) <= {"DRUG", "PROBLEM"}
    (tmp_path / "note.txt").write_text(NOTE)
    out = run_cli("predict", str(ner), "--input", str(tmp_path / "note.txt"), "--output", str(tmp_path / "ents.jsonl"))
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads((tmp_path / "ents.jsonl").read_text())
    assert doc["text"] == NOTE
    for e in doc["entities"]:  # whatever a 4-step model finds, it points into the original text
        assert NOTE[e["start"]:e["end"]] == e["text"] and e["label"] in {"DRUG", "PROBLEM"}

    # 5. export to transformers (verified) and publish, dry run
    hf = tmp_path / "hf"
    out = run_cli("convert", str(ner / "checkpoints" / "best"), str(hf), "--to", "hf", "--verify")
    assert out.returncode == 0 and "verification passed" in out.stdout, out.stderr[-2000:]
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["MegatronBertForTokenClassification"]
    assert config["id2label"] == {"0": "O", "1": "B-DRUG", "2": "I-DRUG", "3": "B-PROBLEM", "4": "I-PROBLEM"}
    out = run_cli("publish", str(hf), "you/gatortron-tiny-clinical-ner", "--dry-run")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Labels: `O`, `B-DRUG`, `I-DRUG`, `B-PROBLEM`, `I-PROBLEM`." in out.stdout
    assert f"| f1_strict | {metrics['f1_strict']:.4f} |" in out.stdout  # the card reports step 4's test metrics
