"""logging.tensorboard: the event files hold exactly the scalars of metrics.jsonl (train, validation,
fp16 loss scale and fine-tuning metrics), read back with TensorBoard's own event reader; off by
default; bad values and a missing package are one line."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import cli_main, run_cli
from toolkit.config import LoggingConfig, TensorBoardConfig
from toolkit.errors import ConfigError
from toolkit.training.loggers import TensorBoardLogger, scalars

# gpt-tiny cut down so a run takes seconds on one thread; fp16 (emulated on CPU) so loss_scale is logged.
GPT = ["model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", "model.seq_length=32",
       "trainer.micro_batch_size=2", "trainer.global_batch_size=2", "trainer.eval_iters=1",
       "trainer.sample_prompt=null", "trainer.num_threads=1", "logging.wandb.enabled=false", "logging.plot=false",
       "logging.progress_bar=false", "checkpoint.save_interval=0"]
BERT_NER = ["model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", "model.ffn_hidden_size=64",
            "model.seq_length=32", "model.max_position_embeddings=32", "trainer.micro_batch_size=8",
            "trainer.global_batch_size=8", "trainer.eval_iters=1", "trainer.num_threads=1",
            "logging.wandb.enabled=false", "logging.plot=false", "logging.progress_bar=false", "task.stride=8",
            "task.test_file=null", "checkpoint.save_interval=0"]


def read_events(folder: Path) -> dict[str, dict[int, float]]:
    """tag → step → value, from every event file under ``folder`` (TensorBoard's reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def assert_events_match_metrics(run: Path) -> list[dict]:
    """Every numeric value of every metrics.jsonl line is the TensorBoard scalar of the same key and
    step (to float32), and TensorBoard holds nothing else."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert (run / "tensorboard").is_dir(), f"no tensorboard/ folder in {run}"
    events = read_events(run / "tensorboard")
    expected: dict[str, dict[int, float]] = {}
    for r in records:
        for key, value in scalars(r).items():
            expected.setdefault(key, {})[r["step"]] = value
    assert set(events) == set(expected)
    for key, by_step in expected.items():
        assert set(events[key]) == set(by_step), key
        for step, value in by_step.items():
            assert events[key][step] == np.float32(value), (key, step, events[key][step], value)
    return records


def test_gpt_scalars_equal_metrics_jsonl(tmp_path: Path):
    run = tmp_path / "run"
    out = run_cli("train", "gpt-tiny", *GPT, f"trainer.run_dir={run}", "trainer.max_steps=4", "trainer.eval_interval=2",
                  "trainer.precision=fp16", "logging.tensorboard.enabled=true")
    assert out.returncode == 0, out.stderr[-3000:]
    records = assert_events_match_metrics(run)
    keys = set().union(*records)
    assert {"loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "step_time", "consumed_samples", "val_loss",
            "val_ppl", "loss_scale"} <= keys
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]


def conll(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = rng.sample(["the", "patient", "was", "seen", "today", "and", "is", "well"], 4)
        at = rng.randrange(5)
        words.insert(at, rng.choice(["aspirin", "metformin", "insulin"]))
        lines += [f"{w}\t{'B-Drug' if i == at else 'O'}" for i, w in enumerate(words)] + [""]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_finetune_validation_metrics_equal_metrics_jsonl(tmp_path: Path):
    run = tmp_path / "run"
    train, valid = conll(tmp_path / "train.conll", 40, 0), conll(tmp_path / "valid.conll", 16, 1)
    out = run_cli("finetune", "bert-tiny-ncbi-disease", *BERT_NER, f"task.train_file={train}",
                  f"task.valid_file={valid}", f"trainer.run_dir={run}", "trainer.max_steps=2",
                  "trainer.eval_interval=2", "logging.tensorboard.enabled=true")
    assert out.returncode == 0, out.stderr[-3000:]
    records = assert_events_match_metrics(run)
    assert {"val_f1_strict", "val_precision_strict", "val_recall_strict"} <= set(records[-1])


def test_off_by_default(tmp_path: Path):
    run = tmp_path / "run"
    out = run_cli("train", "gpt-tiny", *GPT, f"trainer.run_dir={run}", "trainer.max_steps=1", "trainer.eval_interval=0")
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run / "metrics.jsonl").is_file()
    assert not (run / "tensorboard").exists()


def test_bogus_value_is_one_line_error(tmp_path: Path):
    out = cli_main("train", "gpt-tiny", f"trainer.run_dir={tmp_path / 'run'}", "logging.tensorboard.enabled=maybe")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "logging.tensorboard.enabled" in lines[0] and "bool" in lines[0], out.stderr


def test_missing_package_is_one_line_config_error(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import → ImportError
    cfg = LoggingConfig(tensorboard=TensorBoardConfig(enabled=True))
    with pytest.raises(ConfigError, match=r"pip install tensorboard") as err:
        TensorBoardLogger(cfg, tmp_path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "tensorboard").exists()


def test_dir_skipped_values_and_resume_purge(tmp_path: Path):
    """logging.tensorboard.dir is honoured; non-numeric and non-finite values are left out; a resumed
    run replaces the steps after its checkpoint, as metrics.jsonl does."""
    folder = tmp_path / "elsewhere"
    cfg = LoggingConfig(tensorboard=TensorBoardConfig(enabled=True, dir=str(folder)))
    first = TensorBoardLogger(cfg, tmp_path / "run")
    for step in range(1, 5):
        first.log({"step": step, "loss": 10.0 + step, "note": "x", "flag": True, "bad": float("nan"), "none": None})
    first.close()
    resumed = TensorBoardLogger(cfg, tmp_path / "run", resume_step=2)
    for step in (3, 4):
        resumed.log({"step": step, "loss": 20.0 + step})
    resumed.close()
    assert not (tmp_path / "run").exists()
    assert read_events(folder) == {"loss": {1: 11.0, 2: 12.0, 3: 23.0, 4: 24.0}}
