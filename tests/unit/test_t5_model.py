"""T5 model: parameter counts and logits against transformers, relative buckets, KV cache, overfitting."""

import re

import pytest
import torch

from toolkit.config import ModelConfig, load_config
from toolkit.models.common import padded_vocab_size
from toolkit.models.common.loss import lm_cross_entropy
from toolkit.models.t5 import T5Model, generate_seq2seq, relative_position_bucket
from toolkit.recipes import recipe_model_on_meta

transformers = pytest.importorskip("transformers")

T5_RECIPES = ["t5-tiny", "t5-small", "t5-base", "t5-v1_1-base"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(v11: bool = False, **kw) -> ModelConfig:
    base = dict(family="t5", num_layers=2, num_decoder_layers=3, hidden_size=32, num_attention_heads=4, kv_channels=8,
                ffn_hidden_size=48, vocab_size=100, make_vocab_size_divisible_by=64, layernorm_epsilon=1e-6,
                activation="geglu" if v11 else "relu", share_embeddings_and_output_weights=not v11,
                hidden_dropout=0.0, attention_dropout=0.0, relative_attention_num_buckets=8,
                relative_attention_max_distance=20, position_embedding_type="relative", add_bias_linear=False,
                normalization="RMSNorm")
    base.update(kw)
    return ModelConfig(**base)


def hf_config(m: ModelConfig):
    return transformers.T5Config(
        vocab_size=m.vocab_size, d_model=m.hidden_size, d_kv=m.kv_channels or m.hidden_size // m.num_attention_heads,
        d_ff=m.ffn_hidden_size, num_layers=m.num_layers, num_decoder_layers=m.num_decoder_layers,
        num_heads=m.num_attention_heads, relative_attention_num_buckets=m.relative_attention_num_buckets,
        relative_attention_max_distance=m.relative_attention_max_distance, dropout_rate=m.hidden_dropout,
        layer_norm_epsilon=m.layernorm_epsilon, feed_forward_proj="relu" if m.activation == "relu" else "gated-gelu",
        tie_word_embeddings=m.share_embeddings_and_output_weights)


# our name → HF name; {s} = encoder|decoder, {i} = layer, {f} = the MLP's sub-layer index (1 enc, 2 dec)
_ATTN = {"q": "q", "k": "k", "v": "v", "out": "o"}


def hf_name(ours: str, gated: bool) -> str:
    if ours == "embed.weight":
        return "shared.weight"
    if ours == "head.weight":
        return "lm_head.weight"
    s, rest = ours.split(".", 1)
    if rest == "final_norm.weight":
        return f"{s}.final_layer_norm.weight"
    i, part = re.match(r"layers\.(\d+)\.(.+)\.weight$", rest).groups()
    block = f"{s}.block.{i}.layer"
    ff = 1 if s == "encoder" else 2
    wi = {"fc1": "wi_1" if gated else "wi", "gate": "wi_0", "fc2": "wo"}
    table = {"attn_norm": f"{block}.0.layer_norm", "relative_bias": f"{block}.0.SelfAttention.relative_attention_bias",
             "cross_attn_norm": f"{block}.1.layer_norm", "mlp_norm": f"{block}.{ff}.layer_norm"}
    table.update({f"attn.{k}": f"{block}.0.SelfAttention.{v}" for k, v in _ATTN.items()})
    table.update({f"cross_attn.{k}": f"{block}.1.EncDecAttention.{v}" for k, v in _ATTN.items()})
    table.update({f"mlp.{k}": f"{block}.{ff}.DenseReluDense.{v}" for k, v in wi.items()})
    return table[part] + ".weight"


def to_hf(model: T5Model):
    cfg = model.cfg
    hf = transformers.T5ForConditionalGeneration(hf_config(cfg)).eval()
    if not model.tied:  # transformers 5 always ties lm_head to shared; v1.1 needs its own matrix
        hf.lm_head.weight = torch.nn.Parameter(torch.empty_like(hf.lm_head.weight))
    params = dict(hf.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            target = params[hf_name(name, cfg.activation == "geglu")]
            target.copy_(p[: cfg.vocab_size] if name in ("embed.weight", "head.weight") else p)
    return hf


@pytest.mark.parametrize("name", T5_RECIPES)
def test_recipes_match_transformers_parameter_count(name):
    cfg = load_config(name)
    ours = sum(p.numel() for p in recipe_model_on_meta(cfg).parameters())
    m = cfg.model
    with torch.device("meta"):
        hf = transformers.T5ForConditionalGeneration(hf_config(m))
    hf_count = sum(p.numel() for p in hf.parameters())
    if not m.share_embeddings_and_output_weights and hf.lm_head.weight is hf.shared.weight:
        hf_count += hf.lm_head.weight.numel()  # transformers 5 ties even v1.1's lm_head; the real model has its own
    pad_rows = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by) - m.vocab_size
    tables = 1 if m.share_embeddings_and_output_weights else 2
    assert ours == hf_count + pad_rows * m.hidden_size * tables


def test_published_sizes():
    counts = {n: sum(p.numel() for p in recipe_model_on_meta(load_config(n)).parameters()) for n in T5_RECIPES[1:]}
    assert counts == {"t5-small": 60_506_624, "t5-base": 222_903_552, "t5-v1_1-base": 247_577_856}


@pytest.mark.parametrize("v11", [False, True], ids=["v1.0", "v1.1"])
def test_logits_match_transformers(v11):
    torch.manual_seed(0)
    model = T5Model(tiny(v11))
    model.init_weights(1)
    model.eval()
    assert model.padded_vocab_size == 128
    hf = to_hf(model)
    enc = torch.randint(0, 100, (2, 11))
    dec = torch.randint(0, 100, (2, 7))
    enc_mask = torch.ones(2, 11, dtype=torch.bool)
    enc_mask[1, 8:] = False  # right padding in the second row
    dec_mask = torch.ones(2, 7, dtype=torch.bool)
    dec_mask[0, 5:] = False
    ours = model(enc, dec, enc_mask, dec_mask)
    assert torch.isinf(ours[..., 100:]).all()
    with torch.no_grad():
        ref = hf(input_ids=enc, attention_mask=enc_mask.long(), decoder_input_ids=dec,
                 decoder_attention_mask=dec_mask.long()).logits
    assert (ours[..., :100] - ref).abs().max().item() <= 1e-4
    with torch.no_grad():
        ref = hf(input_ids=enc, decoder_input_ids=dec).logits
    assert (model(enc, dec)[..., :100] - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (8, 20), (16, 64)])
def test_relative_position_buckets_match_transformers(bidirectional, buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 301)[None, :] - torch.arange(0, 40)[:, None]  # [40, 601] key - query
    ours = relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=buckets, max_distance=max_distance)
    ref = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=buckets,
                                                max_distance=max_distance)
    assert torch.equal(ours, ref)
    assert ours.min() >= 0 and ours.max() < buckets


def test_init_is_device_independent_and_t5_style():
    a, b = T5Model(tiny(True)), T5Model(tiny(True))
    a.init_weights(5)
    with torch.device("meta"):
        m = T5Model(tiny(True))
    m.to_empty(device="cpu")
    m.init_weights(5)
    b.init_weights(6)
    for (name, p), q, _r in zip(a.named_parameters(), m.parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(a.embed.weight, b.embed.weight)
    assert abs(a.embed.weight.std().item() - 1.0) < 0.05  # HF: shared N(0, 1)
    assert torch.equal(a.encoder.final_norm.weight, torch.ones(32))
    assert {n for n, _ in a.named_parameters() if "relative_bias" in n} == {
        "encoder.layers.0.relative_bias.weight", "decoder.layers.0.relative_bias.weight"}


@pytest.mark.parametrize("v11", [False, True], ids=["v1.0", "v1.1"])
def test_kv_cached_decoding_matches_full_decoding(v11):
    torch.manual_seed(0)
    model = T5Model(tiny(v11))
    model.init_weights(2)
    model.eval()
    enc = torch.randint(0, 100, (2, 9))
    enc_mask = torch.ones(2, 9, dtype=torch.bool)
    enc_mask[0, 6:] = False
    dec = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        full = model(enc, dec, enc_mask)
        hidden = model.encode(enc, enc_mask)
        caches = model.new_caches(2, 10, 9, device="cpu", dtype=torch.float32)
        parts = [model.decode(dec[:, :4], hidden, enc_mask, caches=caches)]
        parts += [model.decode(dec[:, t:t + 1], hidden, enc_mask, start_pos=t, caches=caches) for t in range(4, 7)]
        parts.append(model.decode(dec[:, 7:], hidden, enc_mask, start_pos=7, caches=caches))
    torch.testing.assert_close(torch.cat(parts, 1)[..., :100], full[..., :100], atol=1e-5, rtol=1e-5)


def test_generate_matches_transformers_greedy():
    torch.manual_seed(0)
    model = T5Model(tiny(True))
    model.init_weights(3)
    model.eval()
    hf = to_hf(model)
    enc = torch.randint(3, 100, (2, 8))
    ours = generate_seq2seq(model, enc, max_new_tokens=6, decoder_start_id=0)
    ref = hf.generate(input_ids=enc, max_new_tokens=6, do_sample=False, decoder_start_token_id=0, eos_token_id=None,
                      pad_token_id=0, min_new_tokens=6, use_cache=False)  # HF cache assumes enc = dec layers
    assert torch.equal(ours, ref[:, 1:])


def test_tiny_model_overfits_a_batch():
    torch.manual_seed(0)
    model = T5Model(tiny(False, hidden_size=64, kv_channels=16, ffn_hidden_size=128))
    model.init_weights(0)
    enc = torch.randint(3, 100, (4, 16))
    labels = torch.randint(3, 100, (4, 6))
    dec = torch.cat([torch.zeros(4, 1, dtype=torch.long), labels[:, :-1]], 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(120):
        loss = lm_cross_entropy(model(enc, dec), labels)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.0 and loss.item() < 0.05


def test_training_mode_dropout_and_bf16_autocast_run():
    model = T5Model(tiny(True, hidden_dropout=0.1, attention_dropout=0.1))
    model.init_weights(0)
    enc, dec = torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (2, 5))
    model.train()
    a, b = model(enc, dec), model(enc, dec)
    assert not torch.equal(a, b)  # dropout is active
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(enc, dec, torch.ones(2, 8, dtype=torch.bool))
    assert torch.isfinite(out[..., :100]).all()
