"""The fused output layer + cross-entropy (``model.fused_cross_entropy``) against the unfused path."""

from __future__ import annotations

import pytest
import torch

from toolkit.models.common.embeddings import vocab_logits
from toolkit.models.common.fused_loss import linear_cross_entropy
from toolkit.models.common.loss import lm_cross_entropy


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, 11, 16, generator=g, requires_grad=True)  # [b, s, hidden]
    w = (0.3 * torch.randn(40, 16, generator=g)).requires_grad_()  # padded vocab 40, real 37
    labels = torch.randint(0, 37, (3, 11), generator=g)
    labels[0, :4] = -100  # ignored (prompt tokens, padding)
    return h, w, labels


def _both(h, w, labels, chunk):
    fused = linear_cross_entropy(h, w, labels, 37, chunk_tokens=chunk)
    g_fused = torch.autograd.grad(3.0 * fused, (h, w))
    plain = lm_cross_entropy(vocab_logits(h, w, 37), labels)
    g_plain = torch.autograd.grad(3.0 * plain, (h, w))
    return fused, plain, g_fused, g_plain


@pytest.mark.parametrize("chunk", [1, 7, 33, 1000])
def test_fp32_loss_and_gradients_equal_the_unfused_path(chunk):
    fused, plain, g_fused, g_plain = _both(*_case(), chunk)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_fused, g_plain):  # the upstream gradient (3.0) is applied too
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_matches_the_unfused_path_and_keeps_fp32_gradients():
    h, w, labels = _case(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, plain, g_fused, g_plain = _both(h, w, labels, 5)
    assert fused.dtype == torch.float32 and g_fused[0].dtype == g_fused[1].dtype == torch.float32
    torch.testing.assert_close(fused, plain, rtol=1e-3, atol=1e-3)
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_frozen_weight_gets_no_gradient_work():
    h, w, labels = _case(2)
    w.requires_grad_(False)
    loss = linear_cross_entropy(h, w, labels, 37, chunk_tokens=4)
    (grad_h,) = torch.autograd.grad(loss, (h,))
    torch.testing.assert_close(grad_h, torch.autograd.grad(lm_cross_entropy(vocab_logits(h, w, 37), labels), h)[0],
                               rtol=1e-5, atol=1e-6)


def test_gpt_training_steps_with_the_fused_loss_follow_the_unfused_ones():
    """The GPT objectives route through the fused loss when the model asks for it (tied head, padded
    vocabulary, packed SFT batches alike); a few AdamW steps stay with the unfused run."""
    from toolkit.config import OptimConfig, load_config
    from toolkit.models.gpt.objective import causal_lm, masked_causal_lm
    from toolkit.optim import build_optimizer
    from toolkit.registry import get_spec

    tokens = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens, "loss_mask": torch.rand(2, 16, generator=torch.Generator().manual_seed(1)) > 0.3}
    losses = {}
    for fused in (False, True):
        cfg = load_config("gpt-tiny", ["model.vocab_size=300", "model.num_layers=2", "model.hidden_size=32",
                                       "model.num_attention_heads=4", "model.seq_length=16", "model.hidden_dropout=0",
                                       "model.attention_dropout=0", f"model.fused_cross_entropy={str(fused).lower()}"])
        torch.manual_seed(0)
        model = get_spec("gpt").build(cfg.model)
        assert model.fuses_loss is fused
        opt = build_optimizer(model, OptimConfig(lr=1e-2))
        losses[fused] = []
        for objective in (causal_lm, masked_causal_lm, causal_lm):
            loss = objective(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[fused].append(loss.item())
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
