"""Fine-tuning end to end through the CLI on small synthetic tasks a tiny encoder learns in seconds:
finetune → validation metrics and checkpoints/best → evaluate → predict (long notes, character
offsets), beating the majority-class baseline on held-out data; bad input is one line, exit 2."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.conftest import cli_main, run_cli
from toolkit.data.tasks import read_examples
from toolkit.evaluation.metrics import majority_baseline

DRUGS = ["aspirin", "metformin", "lisinopril", "warfarin", "insulin", "heparin"]
FILLER = ["the", "patient", "was", "seen", "today", "and", "is", "doing", "well", "with", "no", "new", "pain"]
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
        "model.seq_length=32", "model.max_position_embeddings=32", "model.hidden_dropout=0.0",
        "model.attention_dropout=0.0", "trainer.micro_batch_size=16", "trainer.global_batch_size=16",
        "optim.lr=3e-3", "optim.lr_warmup_steps=5", "trainer.eval_iters=2", "trainer.num_threads=1",
        "logging.plot=false", "logging.progress_bar=false", "task.stride=8"]


def sentence(rng: random.Random) -> tuple[list[str], list[str]]:
    words = rng.sample(FILLER, 5)
    tags = ["O"] * 5
    at = rng.randrange(6)
    words.insert(at, rng.choice(DRUGS))
    tags.insert(at, "B-Drug")
    return words, tags


def conll(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words, tags = sentence(rng)
        lines += [f"{w}\t{t}" for w, t in zip(words, tags)] + [""]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def ner_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ner")
    train, valid = conll(root / "train.conll", 400, 0), conll(root / "valid.conll", 60, 1)
    run = root / "run"
    out = run_cli("finetune", "bert-tiny-ncbi-disease", *TINY, f"task.train_file={train}", f"task.valid_file={valid}",
                  "task.test_file=null", "trainer.max_steps=40", "trainer.eval_interval=20",
                  "checkpoint.save_interval=20", f"trainer.run_dir={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    return root, run, out


def save_tiny_hf_model(cls, tokenizer: str, folder: Path, **config_kw):
    """A tiny random transformers BERT-family model of class ``cls`` with the shipped ``tokenizer``,
    saved to ``folder`` as a published model would be; returns the model (eval)."""
    import torch

    from toolkit.tokenization import load_tokenizer
    from toolkit.tokenization.export import export_tokenizer

    tok = load_tokenizer(tokenizer)
    config = cls.config_class(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0, **config_kw)
    torch.manual_seed(0)
    model = cls(config).eval()
    model.save_pretrained(folder)
    export_tokenizer(tok, folder, model_max_length=64, tokenizer_class="BertTokenizer")
    return model


def test_finetune_validates_and_keeps_the_best(ner_run):
    root, run, out = ner_run
    assert "labels O, B-Drug, I-Drug" in out.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_f1_strict" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert (run / "checkpoints" / "best" / ".metadata").is_file()
    best = json.loads((run / "checkpoints" / "best" / "trainer_state.json").read_text())
    assert best["metric"] == "f1_strict" and best["best_metric"] == max(r["val_f1_strict"] for r in evals)
    assert "labels:" in (run / "config.yaml").read_text() and "B-Drug" in (run / "config.yaml").read_text()


def test_evaluate_beats_the_majority_baseline(ner_run):
    root, run, _ = ner_run
    out = run_cli("evaluate", str(run), "--split", "valid")
    assert out.returncode == 0, out.stderr[-2000:]
    scores = json.loads((run / "eval_valid.json").read_text())
    for key in ("f1_strict", "precision_strict", "recall_strict", "f1_lenient", "token_accuracy", "per_type"):
        assert key in scores
    gold_train = [e.tags for e in read_examples(root / "train.conll")]
    gold_valid = [e.tags for e in read_examples(root / "valid.conll")]
    base = majority_baseline(gold_train, gold_valid, "token_classification")
    assert base["f1_strict"] == 0.0 and base["token_accuracy"] == pytest.approx(5 / 6)
    assert scores["f1_strict"] > base["f1_strict"] + 0.5, scores
    assert scores["token_accuracy"] > base["token_accuracy"], scores
    assert scores["per_type"]["Drug"]["support"] == 60


def test_predict_long_note_gives_offsets_into_the_text(ner_run, tmp_path):
    _, run, _ = ner_run
    rng = random.Random(7)
    parts = [" ".join(sentence(rng)[0]) + "." for _ in range(30)]  # ~200 words: many 32-token windows
    note = "  ".join(parts)
    (tmp_path / "note.txt").write_text(note)
    out = run_cli("predict", str(run), "--input", str(tmp_path / "note.txt"), "--output", str(tmp_path / "p.jsonl"))
    assert out.returncode == 0, out.stderr[-2000:]
    (doc,) = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert doc["text"] == note
    found = [e for e in doc["entities"]]
    assert all(note[e["start"]:e["end"]] == e["text"] and e["label"] == "Drug" and 0 < e["score"] <= 1 for e in found)
    expected = [(i, i + len(w)) for w in DRUGS for i in _find_all(note, w)]
    hits = {(e["start"], e["end"]) for e in found} & set(expected)
    assert len(hits) >= 0.8 * len(expected), (len(hits), len(expected))
    brat = tmp_path / "brat"
    assert run_cli("predict", str(run), "--input", str(tmp_path / "note.txt"), "--output", str(brat)).returncode == 0
    assert (brat / "note.txt").read_text() == note and (brat / "note.ann").read_text().startswith("T1\tDrug ")


def _find_all(text: str, word: str) -> list[int]:
    out, i = [], text.find(word)
    while i >= 0:
        out.append(i)
        i = text.find(word, i + 1)
    return out


def test_sequence_classification_beats_the_majority_baseline(tmp_path):
    rng = random.Random(3)

    def rows(n):
        out = []
        for i in range(n):
            words, _ = sentence(rng)
            label = "medication" if i % 3 else "none"
            if label == "none":
                words = rng.sample(FILLER, 6)
            out.append({"text": " ".join(words), "label": label})
        return out

    for name, n in (("train", 300), ("valid", 60)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(n)))
    run = tmp_path / "run"
    out = run_cli("finetune", "bert-tiny-ncbi-disease", *TINY, "task.type=sequence_classification",
                  f"task.train_file={tmp_path / 'train.jsonl'}", f"task.valid_file={tmp_path / 'valid.jsonl'}",
                  "task.test_file=null", "trainer.max_steps=40", "trainer.eval_interval=40", f"trainer.run_dir={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert run_cli("evaluate", str(run)).returncode == 0
    scores = json.loads((run / "eval_valid.json").read_text())
    assert scores["accuracy"] > 2 / 3 + 0.2 and scores["macro_f1"] > 0.8, scores  # majority: 2/3 accuracy
    # exported as BertForSequenceClassification, transformers' pipeline gives megaforge predict's labels
    transformers = pytest.importorskip("transformers")
    hf = tmp_path / "hf"
    out = run_cli("convert", str(run), str(hf), "--to", "hf", "--verify")
    assert out.returncode == 0 and "verification passed" in out.stdout, out.stderr[-2000:]
    assert json.loads((hf / "config.json").read_text())["problem_type"] == "single_label_classification"
    texts = [r["text"] for r in rows(12)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert run_cli("predict", str(run), "--input", str(tmp_path / "in.jsonl"), "--output",
                   str(tmp_path / "p.jsonl")).returncode == 0
    ours = [json.loads(line)["label"] for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    classify = transformers.pipeline("text-classification", model=str(hf), device="cpu")
    assert [r["label"] for r in classify(texts)] == ours


def test_unseen_valid_label_is_one_line(tmp_path):
    train = conll(tmp_path / "train.conll", 20, 0)
    (tmp_path / "valid.conll").write_text("x\tO\n\naspirin\tB-Chemical\n")
    out = run_cli("finetune", "bert-tiny-ncbi-disease", *TINY, f"task.train_file={train}",
                  f"task.valid_file={tmp_path / 'valid.conll'}", f"trainer.run_dir={tmp_path / 'run'}")
    assert out.returncode == 2
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "valid.conll:3: tag 'B-Chemical' does not occur in the training data" in lines[0]


def test_finetune_needs_a_task_section():
    out = cli_main("finetune", "bert-tiny")
    assert out.returncode == 2 and "has no task section" in out.stderr


def test_recipes_lists_finetuning_recipes_with_their_task():
    out = run_cli("recipes")
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()}
    for name in ("bert-tiny-ncbi-disease", "gatortron-tiny-ncbi-disease", "gatortron-tiny-clinical-ner"):
        assert rows[name][1:3] == ["bert", "token_classification"]
    for name in ("gatortron-tiny-clinical-note-type", "gatortron-tiny-clinical-nli"):
        assert rows[name][1:3] == ["bert", "sequence_classification"]
    assert rows["gatortron-tiny-clinical-sts"][1:3] == ["bert", "regression"]
    assert rows["bert-tiny"][2] == "pretrain"


def test_interrupted_finetune_resumes_bitwise(tmp_path):
    from tests.conftest import assert_bitwise_same_run

    train, valid = conll(tmp_path / "train.conll", 100, 0), conll(tmp_path / "valid.conll", 20, 1)
    args = [*TINY, f"task.train_file={train}", f"task.valid_file={valid}", "task.test_file=null",
            "trainer.max_steps=8", "trainer.eval_interval=4", "model.hidden_dropout=0.1", "checkpoint.save_interval=4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_cli("finetune", "bert-tiny-ncbi-disease", *args, f"trainer.run_dir={straight}").returncode == 0
    first = run_cli("finetune", "bert-tiny-ncbi-disease", *args, "trainer.exit_interval=4", f"trainer.run_dir={resumed}")
    assert first.returncode == 0 and "stopping at step 4" in first.stdout
    again = run_cli("finetune", "bert-tiny-ncbi-disease", *args, f"trainer.run_dir={resumed}")
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-2000:]
    assert_bitwise_same_run(resumed, straight)


def test_init_from_a_pretraining_run_keeps_the_encoder_and_starts_a_fresh_head(tmp_path):
    import torch

    from toolkit.checkpoint import load_megaforge_model

    pre = tmp_path / "pre"
    shape = [a for a in TINY if a.startswith("model.")] + ["trainer.num_threads=1", "logging.plot=false",
                                                           "logging.wandb.enabled=false", "logging.progress_bar=false"]
    out = run_cli("train", "bert-tiny", *shape, "trainer.max_steps=2", "trainer.micro_batch_size=4",
                  "trainer.global_batch_size=4", "trainer.eval_interval=0", f"trainer.run_dir={pre}")
    assert out.returncode == 0, out.stderr[-2000:]
    train = conll(tmp_path / "train.conll", 40, 0)
    ft = tmp_path / "ft"
    out = run_cli("finetune", "bert-tiny-ncbi-disease", *TINY, f"task.train_file={train}", "task.valid_file=null",
                  "task.test_file=null", "trainer.max_steps=1", "optim.lr=1e-12", "optim.lr_warmup_steps=0",
                  f"checkpoint.init_from={pre}", f"trainer.run_dir={ft}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "initialized fresh (not in the source): classifier.bias, classifier.weight" in out.stdout
    source, _, _ = load_megaforge_model(pre)
    tuned, cfg, _ = load_megaforge_model(ft)
    assert cfg.task.type == "token_classification" and tuned.lm_head is None and tuned.pooler is None
    src = source.state_dict()
    for name, value in tuned.state_dict().items():
        if not name.startswith("classifier."):  # one step at lr 1e-12: the encoder is the source's
            assert torch.allclose(value, src[name], atol=1e-6), name


def test_export_to_transformers_task_class_matches_predict(ner_run, tmp_path):
    """The fine-tuned run exports to BertForTokenClassification with its labels; --verify compares
    logits; transformers' token-classification pipeline finds the entities megaforge predict finds
    (aggregation "first": the word's first sub-token decides, as megaforge trains and predicts)."""
    transformers = pytest.importorskip("transformers")
    _, run, _ = ner_run
    if not (run / "eval_valid.json").is_file():  # (written by test_evaluate_beats_the_majority_baseline)
        assert run_cli("evaluate", str(run)).returncode == 0
    hf = tmp_path / "hf"
    out = run_cli("convert", str(run / "checkpoints" / "best"), str(hf), "--to", "hf", "--verify")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "verification passed" in out.stdout
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["BertForTokenClassification"]
    assert config["id2label"] == {"0": "O", "1": "B-Drug", "2": "I-Drug"} and config["label2id"]["B-Drug"] == 1
    text = "the patient takes aspirin and warfarin daily , no heparin ."
    (tmp_path / "in.txt").write_text(text)
    assert run_cli("predict", str(run), "--input", str(tmp_path / "in.txt"), "--output",
                   str(tmp_path / "p.jsonl")).returncode == 0
    ours = [(e["start"], e["end"], e["label"]) for e in json.loads((tmp_path / "p.jsonl").read_text())["entities"]]
    assert ours, "the tuned model finds drugs"
    ner = transformers.pipeline("token-classification", model=str(hf), aggregation_strategy="first", device="cpu")
    theirs = [(e["start"], e["end"], e["entity_group"]) for e in ner(text)]
    assert theirs == ours
    # the model card states the task, the labels and the evaluated metrics (eval_valid.json of the run)
    card = run_cli("publish", str(hf), "tester/ner-tiny", "--dry-run")
    assert card.returncode == 0, card.stderr[-2000:]
    valid = json.loads((run / "eval_valid.json").read_text())
    assert "Fine-tuned for token classification (named-entity recognition)" in card.stdout
    assert "Labels: `O`, `B-Drug`, `I-Drug`." in card.stdout
    assert f"| f1_strict | {valid['f1_strict']:.4f} |" in card.stdout
    assert 'pipeline("token-classification"' in card.stdout


def test_gatortron_base_ner_recipe_from_a_headless_megatron_bert_folder(tmp_path):
    """The gatortron-base-ner recipe's path, shrunk: checkpoint.init_from a headless MegatronBertModel
    folder (as UFNLP/gatortron-base is published) brings its architecture and tokenizer; the encoder
    is loaded, the token-classification head starts fresh."""
    transformers = pytest.importorskip("transformers")
    import torch

    from toolkit.checkpoint import load_megaforge_model
    hf = tmp_path / "gatortron-like"
    encoder = save_tiny_hf_model(transformers.MegatronBertModel, "clinical-wordpiece", hf)
    train = conll(tmp_path / "train.conll", 40, 0)
    run = tmp_path / "run"
    out = run_cli("finetune", "gatortron-base-ner", f"checkpoint.init_from={hf}", f"task.train_file={train}",
                  "task.valid_file=null", "task.test_file=null", "task.stride=8", "model.seq_length=32",
                  "trainer.precision=fp32", "trainer.max_steps=2", "trainer.micro_batch_size=8",
                  "trainer.global_batch_size=8", "trainer.num_threads=1", "logging.plot=false",
                  "logging.progress_bar=false", "optim.lr_warmup_steps=0", "optim.lr=1e-12", f"trainer.run_dir={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "lm_head.* initialized fresh" in out.stdout
    assert "initialized fresh (not in the source): classifier.bias, classifier.weight" in out.stdout
    tuned, cfg, _ = load_megaforge_model(run)
    assert (cfg.model.hidden_size, cfg.model.layernorm_position, cfg.model.vocab_size) == (64, "pre", encoder.config.vocab_size)
    ids = torch.randint(0, encoder.config.vocab_size, (2, 12))
    with torch.no_grad():  # two steps at lr 1e-12: the encoder is GatorTron-like's own
        diff = (tuned.encode(ids) - encoder(input_ids=ids).last_hidden_state).abs().max().item()
    assert diff < 1e-4


def test_init_from_a_fine_tuned_transformers_model_continues_its_head(tmp_path):
    """checkpoint.init_from a BertForTokenClassification folder: its labels are taken over and its
    classifier loads with the encoder (continued fine-tuning); other labels train a fresh classifier;
    a training label the source lacks is one line, exit 2."""
    transformers = pytest.importorskip("transformers")
    import torch

    from toolkit.checkpoint import load_megaforge_model
    labels = ["O", "B-Drug", "I-Drug"]
    hf = tmp_path / "hf-ner"
    theirs = save_tiny_hf_model(transformers.BertForTokenClassification, "english-wordpiece", hf,
                                id2label=dict(enumerate(labels)))
    train = conll(tmp_path / "train.conll", 40, 0)
    common = [*TINY, f"task.train_file={train}", "task.valid_file=null", "task.test_file=null", "trainer.max_steps=1",
              "optim.lr=1e-12", "optim.lr_warmup_steps=0", f"checkpoint.init_from={hf}"]
    out = run_cli("finetune", "bert-tiny-ncbi-disease", *common, f"trainer.run_dir={tmp_path / 'continued'}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "continuing the source's token_classification head with its labels: O, B-Drug, I-Drug" in out.stdout
    assert "initialized fresh" not in out.stdout
    tuned, cfg, _ = load_megaforge_model(tmp_path / "continued")
    assert list(cfg.task.labels) == labels
    assert torch.allclose(tuned.classifier.weight, theirs.classifier.weight, atol=1e-6)
    assert torch.allclose(tuned.classifier.bias, theirs.classifier.bias, atol=1e-6)
    # another label set: the encoder loads, the classifier starts fresh
    out = run_cli("finetune", "bert-tiny-ncbi-disease", *common, "task.labels=[O,B-Drug,I-Drug,B-Dose,I-Dose]",
                  f"trainer.run_dir={tmp_path / 'relabelled'}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "initialized fresh (not in the source): classifier.bias, classifier.weight" in out.stdout
    # training data with a label the source's head does not have
    dose = tmp_path / "dose.conll"
    dose.write_text(train.read_text() + "take\tO\n5\tB-Dose\nmg\tI-Dose\n\n")
    out = run_cli("finetune", "bert-tiny-ncbi-disease", *common, f"task.train_file={dose}",
                  f"trainer.run_dir={tmp_path / 'bad'}")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert f"{dose}:" in out.stderr and "'B-Dose' is not in task.labels" in out.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()
