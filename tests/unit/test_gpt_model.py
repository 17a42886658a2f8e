import math

import pytest
import torch

from toolkit.config import ModelConfig, load_config
from toolkit.models.common.loss import lm_cross_entropy
from toolkit.models.gpt import GPTModel
from toolkit.recipes import recipe_model_on_meta


def tiny(**kw) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=100,
                hidden_dropout=0.0, attention_dropout=0.0, make_vocab_size_divisible_by=64)
    base.update(kw)
    return ModelConfig(**base)


LLAMA = dict(position_embedding_type="rope", normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
             share_embeddings_and_output_weights=False, num_query_groups=2, ffn_hidden_size=48)


def hf_param_count(name: str) -> int:
    """Parameter count of the same shape built by transformers itself (on meta)."""
    transformers = pytest.importorskip("transformers")
    cfg = load_config(name)
    m = cfg.model
    if m.position_embedding_type == "rope":
        hf_cfg = transformers.LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size,
                                          intermediate_size=m.ffn_hidden_size, num_hidden_layers=m.num_layers,
                                          num_attention_heads=m.num_attention_heads,
                                          num_key_value_heads=m.num_query_groups, tie_word_embeddings=False)
        cls = transformers.LlamaForCausalLM
    else:
        hf_cfg = transformers.GPT2Config(vocab_size=m.vocab_size, n_positions=m.max_position_embeddings,
                                         n_embd=m.hidden_size, n_layer=m.num_layers, n_head=m.num_attention_heads)
        cls = transformers.GPT2LMHeadModel
    with torch.device("meta"):
        model = cls(hf_cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["gpt2-124m", "gpt2-350m", "gpt-1.3b", "tinyllama-1.1b"])
def test_big_recipes_match_transformers_parameter_count(name):
    cfg = load_config(name)
    ours = sum(p.numel() for p in recipe_model_on_meta(cfg).parameters())
    from toolkit.models.common import padded_vocab_size

    pad_rows = padded_vocab_size(cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by) - cfg.model.vocab_size
    tables = 1 if cfg.model.share_embeddings_and_output_weights else 2
    assert ours == hf_param_count(name) + pad_rows * cfg.model.hidden_size * tables


def test_published_sizes():
    counts = {n: sum(p.numel() for p in recipe_model_on_meta(load_config(n)).parameters())
              for n in ["gpt2-124m", "tinyllama-1.1b"]}
    assert counts["tinyllama-1.1b"] == 1_100_048_384  # TinyLlama's published count (vocab 32000 needs no padding)
    assert counts["gpt2-124m"] == 124_439_808 + 47 * 768  # GPT-2 small + 47 padding rows (50257 → 50304)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_kv_cache_matches_full_forward(style):
    torch.manual_seed(0)
    m = GPTModel(tiny(**(LLAMA if style == "llama" else {})))
    m.init_weights(3)
    m.eval()
    x = torch.randint(0, 100, (2, 12))
    caches = m.new_caches(2, 16, device="cpu", dtype=torch.float32)
    parts = [m(x[:, :5], caches=caches), m(x[:, 5:6], start_pos=5, caches=caches),
             m(x[:, 6:12], start_pos=6, caches=caches)]
    torch.testing.assert_close(torch.cat(parts, 1)[..., :100], m(x)[..., :100], atol=1e-5, rtol=1e-5)


def test_padded_vocabulary_never_reaches_the_loss():
    m = GPTModel(tiny())
    m.init_weights(0)
    assert m.padded_vocab_size == 128 and m.vocab_size == 100
    logits = m(torch.randint(0, 100, (2, 8)))
    assert logits.shape[-1] == 128
    assert torch.isinf(logits[..., 100:]).all() and torch.isfinite(logits[..., :100]).all()
    loss = lm_cross_entropy(logits, torch.randint(0, 100, (2, 8)))
    loss.backward()
    assert torch.isfinite(loss)
    # padding rows of the (tied) embedding receive no gradient from the output layer
    assert m.embed.tokens.weight.grad[100:].abs().max() == 0


def test_megatron_init_std():
    m = GPTModel(tiny(num_layers=8, hidden_size=256, num_attention_heads=4, ffn_hidden_size=1024))
    m.init_weights(0)
    assert abs(m.layers["0"].attn.q.weight.std().item() - 0.02) < 0.002
    scaled = 0.02 / math.sqrt(2 * 8)
    assert abs(m.layers["3"].mlp.fc2.weight.std().item() - scaled) < 0.1 * scaled
    assert (m.layers["0"].attn_norm.weight == 1).all() and (m.layers["0"].attn.q.bias == 0).all()


def test_meta_build_then_init_equals_direct_init():
    cfg = tiny(**LLAMA)
    a = GPTModel(cfg)
    a.init_weights(7)
    with torch.device("meta"):
        b = GPTModel(cfg)
    b.to_empty(device="cpu")
    b.init_weights(7)
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb), na
    torch.testing.assert_close(a.rotary.cos, b.rotary.cos)


def test_causality():
    m = GPTModel(tiny(**LLAMA))
    m.init_weights(1)
    x = torch.randint(0, 100, (1, 10))
    y = x.clone()
    y[0, 7] = (y[0, 7] + 1) % 100
    torch.testing.assert_close(m(x)[:, :7], m(y)[:, :7])
    assert not torch.allclose(m(x)[:, 7:, :100], m(y)[:, 7:, :100])


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_tiny_model_overfits_one_batch(style):
    torch.manual_seed(0)
    m = GPTModel(tiny(**(LLAMA if style == "llama" else {})))
    m.init_weights(0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    batch = torch.randint(0, 100, (4, 17))
    for _ in range(150):
        loss = lm_cross_entropy(m(batch[:, :-1]), batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()
