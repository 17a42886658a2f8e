"""Activation recompute (full, selective) gives the same loss and gradients as none, names unchanged."""

from __future__ import annotations

import pytest
import torch

from tests.parallel.helpers import LLAMA, TINY
from toolkit.config import load_config
from toolkit.models.build import build_initialized_model
from toolkit.models.gpt.objective import causal_lm
from toolkit.parallel.recompute import apply_recompute


def loss_and_grads(granularity: str, extra: list[str]):
    cfg = load_config("gpt-tiny", [*TINY, *extra])
    model = build_initialized_model(cfg, torch.device("cpu"))
    apply_recompute(list(model.layers.values()), granularity)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_length + 1),
                           generator=torch.Generator().manual_seed(0))
    loss = causal_lm(model, {"tokens": tokens})
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("granularity", ["full", "selective"])
@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_recompute_matches(granularity, style):
    extra = LLAMA if style == "llama" else []
    ref_loss, ref_grads = loss_and_grads("none", extra)
    loss, grads = loss_and_grads(granularity, extra)
    assert loss == ref_loss
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_t5_recompute_covers_both_stacks(granularity):
    """T5's layers live in encoder.layers and decoder.layers: all are found, and recompute is exact."""
    from toolkit.models.t5.objective import t5_span_corruption
    from toolkit.parallel.recompute import transformer_blocks

    cfg = load_config("t5-tiny", ["model.hidden_dropout=0.0", "model.attention_dropout=0.0", "model.vocab_size=512",
                                  "model.num_layers=2", "model.num_decoder_layers=3", "model.hidden_size=32",
                                  "model.ffn_hidden_size=64", "model.kv_channels=8"])
    gen = torch.Generator().manual_seed(0)
    batch = {"encoder_tokens": torch.randint(0, 512, (2, 16), generator=gen),
             "decoder_tokens": torch.randint(0, 512, (2, 6), generator=gen),
             "labels": torch.randint(0, 512, (2, 6), generator=gen)}

    def run(g):
        model = build_initialized_model(cfg, torch.device("cpu"))
        blocks = transformer_blocks(model)
        assert len(blocks) == 5
        apply_recompute(blocks, g)
        assert all(bool(b._forward_pre_hooks) == (g != "none") for b in blocks)  # composable checkpoint hooks
        loss = t5_span_corruption(model, batch)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref = run("none")
    loss, grads = run(granularity)
    assert loss == ref_loss
    for k in ref:
        torch.testing.assert_close(grads[k], ref[k], rtol=1e-6, atol=1e-7)
