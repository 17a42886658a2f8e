"""Fine-tuning (task heads) trains under tensor, sequence and data parallelism exactly like one
process: 5 steps of losses within rtol 1e-5 and the final weights, for token classification (NER)
and sequence classification, through the real CLI under torchrun (fp32, no dropout)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.parallel.helpers import assert_same_run, train_recipe_ok, vocab_pad

COMMON = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
          "model.seq_length=32", "model.max_position_embeddings=32", "model.hidden_dropout=0.0",
          "model.attention_dropout=0.0", "model.vocab_size=8193", "trainer.micro_batch_size=2",
          "trainer.global_batch_size=8", "trainer.max_steps=5", "trainer.eval_interval=0",
          "checkpoint.save_interval=0", "optim.lr=1e-2", "optim.lr_warmup_steps=0", "optim.clip_grad=0.5",
          "optim.adam_eps=1e-4", "logging.wandb.enabled=false", "logging.progress_bar=false", "logging.plot=false",
          "trainer.num_threads=1", "task.stride=8", "task.valid_file=null", "task.test_file=null"]
WORDS = ["the", "patient", "takes", "aspirin", "daily", "no", "pain", "warfarin", "today", "and", "well"]
DRUGS = {"aspirin", "warfarin"}
TP2 = ["parallel.tensor_model_parallel_size=2", vocab_pad(2)]
SP = ["parallel.sequence_parallel=true"]
DP2 = ["parallel.data_parallel_sharding=full", vocab_pad(1)]
CASES = {  # name → (task type, nproc, layout overrides)
    "ner_tp2": ("token_classification", 2, TP2),
    "ner_tp2_sp": ("token_classification", 2, TP2 + SP),
    "ner_dp2_fsdp": ("token_classification", 2, DP2),
    "cls_tp2": ("sequence_classification", 2, TP2),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("task")
    rng = random.Random(0)
    sentences = [[rng.choice(WORDS) for _ in range(rng.randint(4, 12))] for _ in range(64)]
    conll = "".join("".join(f"{w}\t{'B-Drug' if w in DRUGS else 'O'}\n" for w in s) + "\n" for s in sentences)
    (root / "ner.conll").write_text(conll)
    rows = [{"text": " ".join(s), "label": "drug" if DRUGS & set(s) else "none"} for s in sentences]
    (root / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"token_classification": root / "ner.conll", "sequence_classification": root / "cls.jsonl"}


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    runs: dict[str, Path] = {}

    def get(task: str) -> Path:
        if task not in runs:
            run = tmp_path_factory.mktemp(f"ref_{task}") / "run"
            runs[task] = train_recipe_ok("bert-tiny-ncbi-disease", run, 1, *COMMON, f"task.type={task}",
                                         f"task.train_file={data[task]}", vocab_pad(1))
        return runs[task]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_finetune_layout_matches_single_process(case: str, data, reference, tmp_path: Path):
    task, nproc, layout = CASES[case]
    run = train_recipe_ok("bert-tiny-ncbi-disease", tmp_path / "run", nproc, *COMMON, f"task.type={task}",
                          f"task.train_file={data[task]}", *layout)
    assert_same_run(run, reference(task))
