"""End to end through the CLI: bert-tiny and gatortron-tiny train, and resume bit for bit."""

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import assert_bitwise_same_run, run_cli

# Very small versions of the tiny recipes so each run takes seconds on 2 cores.
SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
         "model.seq_length=64", "trainer.micro_batch_size=4", "trainer.global_batch_size=8",
         "trainer.eval_interval=10", "trainer.eval_iters=2", "logging.wandb.enabled=false",
         "logging.progress_bar=false", "model.hidden_dropout=0.1", "model.attention_dropout=0.1",
         "trainer.num_threads=1", "optim.lr=2e-3", "optim.lr_warmup_steps=3"]


def losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs}


def train(recipe: str, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    out = run_cli("train", recipe, *SMALL, f"trainer.run_dir={run_dir}", *extra)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def falls(ls: dict[int, float]) -> bool:
    steps = sorted(ls)
    first = sum(ls[s] for s in steps[:5]) / 5
    last = sum(ls[s] for s in steps[-5:]) / 5
    return last < first - 0.5


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """20 uninterrupted steps of a recipe (checkpoints every 5), made once per recipe."""
    runs: dict[str, Path] = {}

    def get(recipe: str) -> Path:
        if recipe not in runs:
            run = tmp_path_factory.mktemp(recipe) / "straight"
            train(recipe, run, "trainer.max_steps=20", "checkpoint.save_interval=5", "logging.plot=false")
            runs[recipe] = run
        return runs[recipe]

    return get


def test_bert_tiny_trains(straight):
    """Original BERT: post-LN, next-sentence prediction (the recipe's data.bert_pair_task)."""
    run = straight("bert-tiny")
    ls = losses(run)
    assert sorted(ls) == list(range(1, 21)) and falls(ls), ls
    assert (run / "tokenizer" / "vocab.txt").is_file()
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in recs)
    from omegaconf import OmegaConf

    saved = OmegaConf.load(run / "config.yaml")
    assert saved.model.layernorm_position == "post" and saved.data.bert_pair_task == "nsp"


def test_gatortron_tiny_trains(straight):
    run = straight("gatortron-tiny")
    ls = losses(run)
    assert sorted(ls) == list(range(1, 21)) and falls(ls), ls
    from omegaconf import OmegaConf

    saved = OmegaConf.load(run / "config.yaml")
    assert saved.model.layernorm_position == "pre" and saved.data.corpus == "clinical"
    assert saved.data.bert_pair_task == "sop"


@pytest.mark.parametrize("recipe", ["bert-tiny", "gatortron-tiny"])
def test_resume_is_bitwise(recipe: str, straight, tmp_path: Path):
    """Stopped at step 10 (trainer.exit_interval) and resumed: every loss and the final weights
    equal the uninterrupted run's exactly (dropout on: the RNG state is restored too)."""
    run = tmp_path / "resumed"
    first = train(recipe, run, "trainer.max_steps=20", "checkpoint.save_interval=5",
                  "trainer.exit_interval=10", "logging.plot=false")
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_10", first.stdout[-2000:]
    out = train(recipe, run, "trainer.max_steps=20", "checkpoint.save_interval=5", "logging.plot=false")
    assert "resumed from" in out.stdout
    assert_bitwise_same_run(run, straight(recipe))  # exact float equality, every step and every weight
