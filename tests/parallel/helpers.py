"""Launch tiny GPT runs single-process or under torchrun and read back their losses and weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import REPO, cli_main

# Tiny GPT, fp32, no dropout; GQA (4 query heads, 2 KV heads); vocab 8193 is not divisible by tp;
# micro 2 × global 8 gives gradient accumulation over 4 (single process) or 2 (dp=2) micro-batches.
# adam_eps=1e-4: with the default 1e-8 Adam turns float-rounding noise in near-zero gradients (rare
# tokens) into lr-sized updates, so bitwise-different but equally correct reductions would diverge.
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.seq_length=32", "model.vocab_size=8193", "model.hidden_dropout=0.0", "model.attention_dropout=0.0",
        "trainer.micro_batch_size=2", "trainer.global_batch_size=8", "trainer.max_steps=5",
        "trainer.eval_interval=0", "checkpoint.save_interval=0", "optim.lr=1e-2", "optim.lr_warmup_steps=0",
        "optim.clip_grad=0.5", "optim.adam_eps=1e-4", "logging.wandb.enabled=false", "logging.progress_bar=false", "logging.plot=false",
        "trainer.sample_prompt=null", "trainer.num_threads=1"]
LLAMA = ["model.position_embedding_type=rope", "model.normalization=RMSNorm", "model.activation=swiglu",
         "model.add_bias_linear=false", "model.share_embeddings_and_output_weights=false"]


def vocab_pad(tp: int) -> str:
    """Same padded vocabulary (8448) for every tp, so initial weights are identical to the reference."""
    return f"model.make_vocab_size_divisible_by={256 // tp}"


def launch(run_dir: Path, nproc: int, *overrides: str, env: dict | None = None,
           timeout: int = 300) -> subprocess.CompletedProcess:
    """``megaforge train gpt-tiny`` in one process (nproc=1: in this one, unless ``env`` asks for a
    process of its own) or under torchrun with ``nproc`` ranks."""
    if nproc == 1 and env is None:
        return cli_main("train", "gpt-tiny", *overrides, f"trainer.run_dir={run_dir}")
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    if nproc == 1:
        cmd = [sys.executable, "-m", "toolkit"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(_free_port()), "-m", "toolkit"]
    cmd += ["train", "gpt-tiny", *overrides, f"trainer.run_dir={run_dir}"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)


def train_ok(run_dir: Path, nproc: int, *overrides: str) -> Path:
    out = launch(run_dir, nproc, *overrides)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return run_dir


def train_recipe_ok(recipe: str, run_dir: Path, nproc: int, *overrides: str, timeout: int = 300) -> Path:
    """``megaforge train RECIPE OVERRIDES`` in this process (nproc=1) or under torchrun; asserts it succeeded."""
    if nproc == 1:
        out = cli_main("train", recipe, *overrides, f"trainer.run_dir={run_dir}")
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
        return run_dir
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(_free_port()), "-m", "toolkit"]
    cmd += ["train", recipe, *overrides, f"trainer.run_dir={run_dir}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return run_dir


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The final checkpoint loaded into a plain single-process model (whatever layout wrote it)."""
    from toolkit.checkpoint import load_megaforge_model

    model, _, _ = load_megaforge_model(run_dir)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_run(run: Path, ref: Path, *, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Losses within rtol; weights within rtol + atol (1e-3 × lr: rare-token embedding rows get
    near-zero gradients whose rounding differs between reduction orders)."""
    got, want = losses(run), losses(ref)
    assert len(got) == len(want) == 5
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=rtol, atol=0)
    a, b = weights(run), weights(ref)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
