"""``trainer.compile_scope=layers``: each transformer layer compiled in place (torchtitan's way)."""

from __future__ import annotations

import copy

import pytest
import torch

from toolkit.config import OptimConfig, load_config
from toolkit.models.gpt.objective import causal_lm
from toolkit.optim import build_optimizer
from toolkit.registry import get_spec
from toolkit.training.run import compile_layers


def test_layers_compile_in_place_share_one_graph_and_train_like_eager():
    cfg = load_config("gpt-tiny", ["model.vocab_size=300", "model.num_layers=3", "model.hidden_size=32",
                                   "model.num_attention_heads=4", "model.seq_length=16", "model.hidden_dropout=0",
                                   "model.attention_dropout=0"])
    torch.manual_seed(0)
    eager = get_spec("gpt").build(cfg.model)
    compiled = copy.deepcopy(eager)
    names = [n for n, _ in compiled.named_parameters()]
    torch._dynamo.reset()
    assert compile_layers([compiled]) == 3
    assert [n for n, _ in compiled.named_parameters()] == names  # checkpoints and FSDP see the same names
    batch = {"tokens": torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))}
    losses = {}
    for key, model in (("eager", eager), ("compiled", compiled)):
        opt = build_optimizer(model, OptimConfig(lr=1e-2))
        losses[key] = []
        for _ in range(3):
            loss = causal_lm(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[key].append(loss.item())
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 1 <= frames <= 2, frames  # the three layers share their compiled graph (not one per layer)
