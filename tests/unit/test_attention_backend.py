"""``model.attention_backend``: the SDPA kernel the trainer's forward pass runs attention on."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from toolkit.models.common.attention import ATTENTION_BACKENDS, Attention, sdpa_backend


def _kernels(backend: str) -> tuple[torch.Tensor, set[str]]:
    torch.manual_seed(0)
    attn = Attention(hidden_size=32, num_heads=4, num_kv_heads=4, head_dim=8, bias=True, dropout=0.0)
    x = torch.randn(2, 6, 32)
    with profile(activities=[ProfilerActivity.CPU]) as prof, sdpa_backend(backend):
        out = attn(x, is_causal=True)
    return out, {e.key for e in prof.key_averages() if "attention" in e.key or e.key == "aten::softmax"}


def test_the_named_kernel_runs_and_agrees_with_the_others():
    flash_out, flash_ops = _kernels("flash")
    math_out, math_ops = _kernels("math")
    auto_out, auto_ops = _kernels("auto")
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in flash_ops
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" not in math_ops and "aten::softmax" in math_ops
    assert auto_ops == flash_ops  # PyTorch's own choice on CPU
    torch.testing.assert_close(flash_out, math_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(auto_out, flash_out, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["cudnn", "efficient"])
def test_cuda_kernels_are_not_there_on_cpu(name):
    assert name in ATTENTION_BACKENDS
    attn = Attention(hidden_size=32, num_heads=4, num_kv_heads=4, head_dim=8, bias=True, dropout=0.0)
    with sdpa_backend(name), pytest.raises(RuntimeError):
        attn(torch.randn(1, 3, 32), is_causal=True)
