"""T5 end to end through the CLI: span-corruption pretraining of t5-tiny, loss falls, bitwise resume."""

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import assert_bitwise_same_run, run_cli

# A very small t5-tiny so each run takes seconds on 2 cores (dropout on: the RNG path is exercised).
SMALL = ["model.num_layers=2", "model.num_decoder_layers=2", "model.hidden_size=64", "model.kv_channels=16",
         "model.ffn_hidden_size=256", "model.seq_length=64", "model.decoder_seq_length=14",
         "model.hidden_dropout=0.1", "model.attention_dropout=0.1", "trainer.micro_batch_size=4",
         "trainer.global_batch_size=8", "trainer.eval_interval=10", "trainer.eval_iters=2",
         "logging.wandb.enabled=false", "logging.progress_bar=false", "trainer.num_threads=1",
         "optim.lr_warmup_steps=5"]


def train(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    out = run_cli("train", "t5-tiny", *SMALL, f"trainer.run_dir={run_dir}", *extra)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("t5straight") / "run"
    train(run, "trainer.max_steps=20", "checkpoint.save_interval=5", "logging.plot=false")
    return run


def test_loss_falls(tmp_path: Path):
    run = tmp_path / "run"
    out = train(run, "trainer.max_steps=30", "model.hidden_dropout=0.0", "model.attention_dropout=0.0")
    assert "t5-tiny" in out.stdout
    assert (run / "tokenizer" / "tokenizer.model").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-5:]) / 5
    assert first > 8.5 and last < first - 1.0, (first, last)
    assert "val_loss" in records[-1] and records[-1]["val_loss"] < first


def test_resume_is_bitwise(straight: Path, tmp_path: Path):
    run = tmp_path / "run"
    first = train(run, "trainer.max_steps=20", "checkpoint.save_interval=5", "trainer.exit_interval=10",
                  "logging.plot=false")
    assert "stopping at step 10" in first.stdout
    out = train(run, "trainer.max_steps=20", "checkpoint.save_interval=5", "logging.plot=false")
    assert "resumed from" in out.stdout
    assert_bitwise_same_run(run, straight)


def test_generate_fills_spans(straight: Path):
    args = ("generate", str(straight), "--prompt", "The king <extra_id_0> the crown.", "--max-new-tokens", "6",
            "--temperature", "0")
    out = run_cli(*args)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("The king <extra_id_0> the crown.")
    assert run_cli(*args).stdout == out.stdout  # greedy is deterministic
