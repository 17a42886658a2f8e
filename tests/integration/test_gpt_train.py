"""End to end through the CLI: train, resume bitwise, generate, and the error contract."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import assert_bitwise_same_run, cli_main, run_cli, step_losses

# A very small gpt-tiny so each run takes seconds on 2 cores.
SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.seq_length=64",
         "trainer.micro_batch_size=4", "trainer.global_batch_size=8", "trainer.eval_interval=10",
         "trainer.eval_iters=2", "logging.wandb.enabled=false", "trainer.sample_prompt=null",
         "model.hidden_dropout=0.1", "model.attention_dropout=0.1", "trainer.num_threads=1"]


def train(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    out = run_cli("train", "gpt-tiny", *SMALL, f"trainer.run_dir={run_dir}", *extra)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """20 steps in one run, checkpoint every 5 (dropout on, so the RNG path is exercised)."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train(run, "trainer.max_steps=20", "checkpoint.save_interval=5")
    return run


def test_run_directory_contents(straight: Path):
    assert (straight / "config.yaml").is_file()
    assert (straight / "tokenizer" / "tokenizer.json").is_file()
    assert (straight / "loss.png").stat().st_size > 1000
    assert (straight / "checkpoints" / "latest").read_text().strip() == "step_20"
    # keep_last=2: only the two newest complete checkpoints remain
    assert sorted(p.name for p in (straight / "checkpoints").glob("step_*")) == ["step_15", "step_20"]
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))
    for r in records:
        assert {"step", "loss", "lr", "tokens_per_sec", "mfu"} <= set(r)
    assert any("val_loss" in r for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    from omegaconf import OmegaConf

    saved = OmegaConf.load(straight / "config.yaml")
    assert saved.trainer.max_steps == 20 and saved.model.vocab_size == 8192


def test_resume_is_bitwise(straight: Path, tmp_path: Path):
    run = tmp_path / "run"
    first = train(run, "trainer.max_steps=20", "checkpoint.save_interval=5", "trainer.exit_interval=10")
    assert "stopping at step 10" in first.stdout
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_10"
    out = train(run, "trainer.max_steps=20", "checkpoint.save_interval=5")
    assert "resumed from" in out.stdout
    assert_bitwise_same_run(run, straight)


def test_resume_takes_compute_options_and_configs_of_older_versions(tmp_path: Path):
    """How the model computes (fused q/k/v, attention kernel, recompute) may change on resume, and a
    config.yaml written before a model key existed resumes as that key's default; the model's shape may not."""
    run = tmp_path / "run"
    train(run, "trainer.max_steps=4", "trainer.exit_interval=2", "trainer.eval_interval=0")
    saved = run / "config.yaml"
    saved.write_text("".join(line for line in saved.read_text().splitlines(keepends=True)
                             if not line.strip().startswith(("fused_qkv:", "attention_backend:"))))
    out = train(run, "trainer.max_steps=4", "trainer.eval_interval=0", "model.fused_qkv=true",
                "model.attention_backend=math", "model.recompute_granularity=full")
    assert "resumed from" in out.stdout
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_4"
    out = run_cli("train", "gpt-tiny", *SMALL, f"trainer.run_dir={run}", "trainer.max_steps=6",
                  "model.hidden_size=32")
    assert out.returncode == 2
    assert "different model (model.hidden_size: 64 there, 32 now)" in out.stderr


def test_cuda_attention_kernel_on_cpu_is_one_line(tmp_path: Path):
    out = run_cli("train", "gpt-tiny", *SMALL, f"trainer.run_dir={tmp_path / 'run'}", "trainer.max_steps=1",
                  "model.attention_backend=cudnn", "trainer.device=cpu")
    assert out.returncode == 2
    assert "model.attention_backend=cudnn is a CUDA kernel" in out.stderr and "Traceback" not in out.stderr


def test_interrupted_save_is_ignored(tmp_path: Path):
    run = tmp_path / "run"
    train(run, "trainer.max_steps=6", "checkpoint.save_interval=2", "trainer.exit_interval=4")
    partial = run / "checkpoints" / "step_6.tmp"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half a file")
    out = train(run, "trainer.max_steps=6", "checkpoint.save_interval=2")
    assert "resumed from" in out.stdout and "step_4" in out.stdout
    assert not partial.exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_6"


def test_generate_from_run(straight: Path):
    out = run_cli("generate", str(straight), "--prompt", "It was the", "--max-new-tokens", "8", "--temperature", "0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("It was the") and len(out.stdout) > len("It was the\n")  # tokens were added
    again = run_cli("generate", str(straight), "--prompt", "It was the", "--max-new-tokens", "8", "--temperature", "0")
    assert again.stdout == out.stdout  # greedy is deterministic


def test_llama_style_trains(tmp_path: Path):
    run = tmp_path / "llama"
    out = run_cli("train", "llama-tiny", *SMALL, "model.num_query_groups=2", "model.ffn_hidden_size=96",
                  f"trainer.run_dir={run}", "trainer.max_steps=12", "optim.lr=3e-3", "optim.lr_warmup_steps=2")
    assert out.returncode == 0, out.stderr[-3000:]
    ls = step_losses(run)
    assert ls[12] < ls[1] - 0.5


def test_bf16_trains(tmp_path: Path):
    """bf16 autocast trains to finite losses (fp16: test_fp16_resume_is_bitwise)."""
    run = tmp_path / "bf16"
    train(run, "trainer.max_steps=3", "trainer.precision=bf16", "trainer.eval_interval=0")
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and all(r["loss"] == r["loss"] for r in recs)  # finite, not NaN


def test_gradient_accumulation_matches_one_big_batch(tmp_path: Path):
    """global 8 as 2 micro-batches of 4 equals 1 micro-batch of 8 (fp32, no dropout)."""
    a, b = tmp_path / "accum", tmp_path / "big"
    base = ("trainer.max_steps=3", "model.hidden_dropout=0", "model.attention_dropout=0", "trainer.eval_interval=0")
    train(a, *base, "trainer.micro_batch_size=4")
    train(b, *base, "trainer.micro_batch_size=8")
    la, lb = step_losses(a), step_losses(b)
    for step in la:
        assert la[step] == pytest.approx(lb[step], rel=1e-5)


# ---- errors: one line, exit code 2, no traceback --------------------------------------------
def assert_user_error(out: subprocess.CompletedProcess, *needles: str):
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_error_mistyped_key():
    assert_user_error(cli_main("train", "gpt-tiny", "trainer.max_step=3"), "trainer.max_steps")


def test_error_unknown_recipe():
    assert_user_error(cli_main("train", "gpt-tinny"), "gpt-tiny")


def test_error_missing_data(tmp_path: Path):
    assert_user_error(cli_main("train", "gpt-tiny", *SMALL, f"trainer.run_dir={tmp_path}/r",
                              f"data.data_prefix=[{tmp_path}/nothing]"), "nothing")


def test_error_corrupt_data(tmp_path: Path):
    prefix = tmp_path / "corpus"
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"Document {i} says hello to the world. " * 20}) + "\n"
                           for i in range(50)))
    ok = run_cli("preprocess", "--input", str(src), "--output-prefix", str(prefix))
    assert ok.returncode == 0, ok.stderr
    bin_path = prefix.with_suffix(".bin")
    bin_path.write_bytes(bin_path.read_bytes()[:-10])
    assert_user_error(cli_main("train", "gpt-tiny", *SMALL, f"trainer.run_dir={tmp_path}/r",
                              f"data.data_prefix=[{prefix}]"), "corpus.bin")
    bin_path.unlink()
    prefix.with_suffix(".idx").write_bytes(b"NOTANIDX" * 8)
    bin_path.write_bytes(b"\0" * 64)
    assert_user_error(cli_main("train", "gpt-tiny", *SMALL, f"trainer.run_dir={tmp_path}/r2",
                              f"data.data_prefix=[{prefix}]"), "corpus.idx")


def test_error_missing_tokenizer(tmp_path: Path):
    assert_user_error(cli_main("train", "gpt-tiny", *SMALL, f"trainer.run_dir={tmp_path}/r",
                              f"tokenizer.path={tmp_path}/no-such-tokenizer"), "no-such-tokenizer")


def test_error_missing_or_incomplete_checkpoint(tmp_path: Path):
    assert_user_error(cli_main("generate", str(tmp_path / "nowhere"), "--prompt", "x"), "nowhere")
    run = tmp_path / "run"
    train(run, "trainer.max_steps=2", "trainer.eval_interval=0")
    (run / "checkpoints" / "step_2" / "trainer_state.json").unlink()
    assert_user_error(cli_main("generate", str(run), "--prompt", "x"), "step_2")
    assert_user_error(cli_main("train", "gpt-tiny", *SMALL, f"trainer.run_dir={run}", "trainer.max_steps=4"),
                      "step_2")


def test_wandb_offline_logs_the_run(tmp_path: Path):
    """With wandb on (offline, the default mode) the run writes a wandb offline run holding the metrics."""
    run_dir = tmp_path / "run"
    env_keys = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("WANDB_")}
    try:
        train(run_dir, "trainer.max_steps=2", "trainer.eval_interval=0", "logging.wandb.enabled=true",
              "logging.wandb.mode=offline", "logging.wandb.project=megaforge-test")
    finally:
        os.environ.update(env_keys)
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, sorted(p.name for p in (run_dir / "wandb").iterdir())
    records = list(runs[0].glob("run-*.wandb"))
    assert records and records[0].stat().st_size > 0
    logged = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
              for rec in _wandb_records(records[0].read_bytes()) if rec.WhichOneof("record_type") == "history"]
    assert [r["_step"] for r in logged] == [1, 2]
    assert [r["loss"] for r in logged] == pytest.approx([v for _, v in sorted(step_losses(run_dir).items())])


def _wandb_records(data: bytes):
    """Records of a ``.wandb`` file: a 7-byte header (":W&B", magic, version), then LevelDB-log
    framing (32 KiB blocks; each chunk: crc32 u32, length u16, type u8 — 1 full, 2 first, 3 middle,
    4 last) around serialized ``wandb_internal_pb2.Record`` messages."""
    import struct

    from wandb.proto import wandb_internal_pb2

    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            yield rec


def test_fp16_resume_is_bitwise(tmp_path: Path):
    """The fp16 loss scaler (scale and growth tracker) is checkpointed and restored exactly."""
    fp16 = ("trainer.precision=fp16", "trainer.max_steps=2", "trainer.eval_interval=0", "checkpoint.save_interval=1",
            "logging.plot=false", "trainer.global_batch_size=4")  # fp16 matmuls are emulated on CPU: keep it short
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, *fp16)
    recs = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] and r["loss_scale"] > 0 for r in recs)  # finite losses, the scale logged
    first = train(resumed, *fp16, "trainer.exit_interval=1")
    assert "stopping at step 1" in first.stdout
    state = json.loads((resumed / "checkpoints" / "step_1" / "trainer_state.json").read_text())
    assert state["precision"]["scale"] > 0 and "_growth_tracker" in state["precision"]
    out = train(resumed, *fp16)
    assert "resumed from" in out.stdout
    assert_bitwise_same_run(resumed, straight)
