"""``checkpoint.init_from``: a new run starts from a Hugging Face model (its architecture, tokenizer
and weights) or from another megaforge run, and a run directory with a checkpoint resumes instead."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import cli_main, run_cli
from tests.conversion.conftest import GPT2_STYLE, make_run, transformers
from toolkit.checkpoint import load_megaforge_model
from toolkit.config import load_config
from toolkit.convert.hf import export_hf

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
# lr 0 (and so no weight decay either): the run's final weights are the initial ones
FROZEN = ["optim.lr=0", "optim.min_lr=0", "trainer.max_steps=1", "trainer.micro_batch_size=2",
          "trainer.global_batch_size=2", "trainer.eval_interval=0", "logging.wandb.enabled=false",
          "trainer.sample_prompt=null", "trainer.num_threads=1", "model.hidden_dropout=0.0",
          "model.attention_dropout=0.0", "model.seq_length=32"]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A GPT-2 model in Hugging Face format with its tokenizer (a tiny random run, exported)."""
    root = tmp_path_factory.mktemp("hf")
    run, _ = make_run(root / "run", GPT2_STYLE)
    return export_hf(run, root / "hf")


@torch.no_grad()
def _logit_diff(run_dir: Path, hf_dir: Path) -> float:
    ours, _, _ = load_megaforge_model(run_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    vocab = theirs.config.vocab_size
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    return float((ours(ids)[..., :vocab] - theirs(input_ids=ids).logits).abs().max())


def test_training_starts_from_a_hugging_face_model(hf_folder: Path, tmp_path: Path):
    run = tmp_path / "run"
    out = run_cli("train", "gpt-tiny", *FROZEN, f"checkpoint.init_from={hf_folder}", f"trainer.run_dir={run}",
                  env={"MEGAFORGE_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "initialized the weights from" in out.stdout
    cfg = load_config(str(run / "config.yaml"))
    assert (cfg.model.hidden_size, cfg.model.num_layers) == (32, 2)  # the HF model's, not gpt-tiny's 256 × 4
    assert cfg.model.seq_length == 32  # a training choice kept from the command line
    assert Path(cfg.tokenizer.path).parent.parent.name == "init_from"  # the imported tokenizer
    assert _logit_diff(run, hf_folder) <= 1e-4

    # the same run directory now resumes from its own checkpoint instead of re-initializing
    again = run_cli("train", "gpt-tiny", *FROZEN, "trainer.max_steps=2", f"checkpoint.init_from={hf_folder}",
                    f"trainer.run_dir={run}", env={"MEGAFORGE_CACHE": str(tmp_path / "cache")})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and "initialized the weights" not in again.stdout
    assert "using the import of" in again.stdout  # the HF import was cached


def test_training_starts_from_another_run(hf_folder: Path, tmp_path: Path):
    first = tmp_path / "first"
    out = run_cli("train", "gpt-tiny", *FROZEN, f"checkpoint.init_from={hf_folder}", f"trainer.run_dir={first}",
                  env={"MEGAFORGE_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-3000:]
    second = tmp_path / "second"
    out = run_cli("train", "gpt-tiny", *FROZEN, f"checkpoint.init_from={first}", f"trainer.run_dir={second}")
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = load_megaforge_model(first)[0].state_dict(), load_megaforge_model(second)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_source_is_one_line_error(tmp_path: Path):
    out = cli_main("train", "gpt-tiny", *FROZEN, f"checkpoint.init_from={tmp_path / 'nope'}",
                  f"trainer.run_dir={tmp_path / 'run'}")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "does not exist" in out.stderr
