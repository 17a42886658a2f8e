"""A model family from another distribution: declared once, as a ``ModelSpec`` behind a
``megaforge.models`` entry point, it is found by the registry, accepted by the config and trained
from a YAML recipe through the CLI, like a built-in family.

The distribution is real as far as ``importlib.metadata`` is concerned: a package plus a
``.dist-info`` folder with ``METADATA`` and ``entry_points.txt`` in a temporary folder on
``PYTHONPATH`` (what ``pip install`` leaves in site-packages), so nothing is stubbed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO

TOY_PACKAGE = '''
"""A toy family: a bigram language model (embedding -> linear head), pretrained on the GPT data."""
import torch
from torch import nn

from toolkit.config import model_vocab_sizes
from toolkit.data.gpt_dataset import build_gpt_datasets
from toolkit.models.common.embeddings import mask_padded_vocab
from toolkit.models.gpt.objective import causal_lm
from toolkit.registry import ModelSpec


class BigramLM(nn.Module):
    def __init__(self, cfg, *, tensor_parallel_size=1):
        super().__init__()
        self.cfg = cfg
        self.vocab_size, padded = model_vocab_sizes(cfg, tensor_parallel_size)
        self.embed = nn.Embedding(padded, cfg.hidden_size)
        self.head = nn.Linear(cfg.hidden_size, padded, bias=False)

    @torch.no_grad()
    def init_weights(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        for p in self.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * self.cfg.init_method_std)

    def num_parameters(self, *, exclude_positions=False):
        return sum(p.numel() for p in self.parameters())

    def forward(self, tokens):
        return mask_padded_vocab(self.head(self.embed(tokens)), self.vocab_size)


def _datasets(cfg, tokenizer, prefixes, num_samples):
    return build_gpt_datasets(prefixes, splits_string=cfg.data.splits_string, seq_length=cfg.model.seq_length,
                              seed=cfg.trainer.seed, num_samples=num_samples, cache_dir=cfg.data.index_cache_dir)


SPEC = ModelSpec(name="bigram", build=BigramLM, objective=causal_lm, datasets=_datasets,
                 default_tokenizer="english-bpe", tokens_per_sample=lambda cfg: cfg.model.seq_length)
'''

RECIPE = """\
description: a plugin family trained from a recipe
model:
  family: bigram
  num_layers: 1
  hidden_size: 32
  num_attention_heads: 1
  seq_length: 32
trainer:
  max_steps: 2
  micro_batch_size: 4
  global_batch_size: 4
  eval_interval: 2
  eval_iters: 1
  sample_prompt: null
  num_threads: 1
logging:
  wandb:
    enabled: false
  plot: false
"""


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict:
    site = tmp_path_factory.mktemp("site")
    (site / "megaforge_toy").mkdir()
    (site / "megaforge_toy" / "__init__.py").write_text(textwrap.dedent(TOY_PACKAGE))
    info = site / "megaforge_toy-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: megaforge-toy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[megaforge.models]\nbigram = megaforge_toy:SPEC\n")
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")


def _python(env: dict, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_registry_finds_the_entry_point_family(plugin_env):
    out = _python(plugin_env, "from toolkit.registry import families, get_spec; "
                              "print(families()); print(type(get_spec('bigram').build).__name__)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["['bert', 'gpt', 't5', 'bigram']", "type"]


def test_unknown_family_names_the_plugin_and_the_closest(plugin_env):
    out = _python(plugin_env, "from toolkit.config import load_config; "
                              "load_config('gpt-tiny', ['model.family=bigrm'])")
    assert out.returncode != 0
    assert "model.family='bigrm' is not one of bert, gpt, t5, bigram; did you mean 'bigram'?" in out.stderr


def test_plugin_family_trains_from_a_yaml_recipe(plugin_env, tmp_path: Path):
    recipe = tmp_path / "bigram.yaml"
    recipe.write_text(RECIPE)
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "toolkit", "train", str(recipe), f"trainer.run_dir={run}"],
                         cwd=REPO, env=plugin_env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "training bigram" in out.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["loss"] > 0 for r in records) and "val_loss" in records[-1]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_2"
    # the saved config names the plugin family, and the run resumes (nothing left to do)
    assert "family: bigram" in (run / "config.yaml").read_text()
    again = subprocess.run([sys.executable, "-m", "toolkit", "train", str(recipe), f"trainer.run_dir={run}"],
                           cwd=REPO, env=plugin_env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-2000:]


def test_without_the_plugin_the_family_is_unknown(tmp_path: Path):
    recipe = tmp_path / "bigram.yaml"
    recipe.write_text(RECIPE)
    out = subprocess.run([sys.executable, "-m", "toolkit", "train", str(recipe)], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["megaforge: error: model.family='bigram' is not one of bert, gpt, t5"]
