"""BERT / Megatron-BERT model: parameter counts and logits against transformers, padding, overfitting."""

import pytest
import torch

from toolkit.config import ModelConfig, load_config
from toolkit.models.bert import BertModel
from toolkit.models.common import padded_vocab_size
from toolkit.models.common.loss import lm_cross_entropy
from toolkit.recipes import recipe_model_on_meta

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")


BIG = ["bert-base", "bert-large", "megatron-bert-345m", "gatortron-base", "gatortron-medium", "gatortron-large"]


def tiny(**kw) -> ModelConfig:
    base = dict(family="bert", num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                seq_length=16, max_position_embeddings=24, vocab_size=100, hidden_dropout=0.0,
                attention_dropout=0.0, make_vocab_size_divisible_by=64, layernorm_epsilon=1e-12,
                activation="gelu", layernorm_position="post")
    base.update(kw)
    return ModelConfig(**base)


def hf_config(m: ModelConfig):
    cls = transformers.BertConfig if m.layernorm_position == "post" else transformers.MegatronBertConfig
    return cls(vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
               num_attention_heads=m.num_attention_heads, intermediate_size=m.ffn_hidden_size,
               hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
               max_position_embeddings=m.max_position_embeddings, type_vocab_size=m.num_tokentypes,
               layer_norm_eps=m.layernorm_epsilon)


def hf_class(m: ModelConfig):
    return transformers.BertForPreTraining if m.layernorm_position == "post" else transformers.MegatronBertForPreTraining


def hf_name_table(post: bool, num_layers: int) -> dict[str, str]:
    """Our parameter name → the HF ``*ForPreTraining`` name (the mapping documented in model.py)."""
    t = {
        "embed.tokens.weight": "bert.embeddings.word_embeddings.weight",
        "embed.positions.weight": "bert.embeddings.position_embeddings.weight",
        "embed.tokentypes.weight": "bert.embeddings.token_type_embeddings.weight",
        "pooler.dense.weight": "bert.pooler.dense.weight", "pooler.dense.bias": "bert.pooler.dense.bias",
        "lm_head.dense.weight": "cls.predictions.transform.dense.weight",
        "lm_head.dense.bias": "cls.predictions.transform.dense.bias",
        "lm_head.norm.weight": "cls.predictions.transform.LayerNorm.weight",
        "lm_head.norm.bias": "cls.predictions.transform.LayerNorm.bias",
        "lm_head.bias": "cls.predictions.bias",
        "binary_head.weight": "cls.seq_relationship.weight", "binary_head.bias": "cls.seq_relationship.bias",
    }
    if post:
        t.update({"embed.norm.weight": "bert.embeddings.LayerNorm.weight",
                  "embed.norm.bias": "bert.embeddings.LayerNorm.bias"})
    else:
        t.update({"final_norm.weight": "bert.encoder.ln.weight", "final_norm.bias": "bert.encoder.ln.bias"})
    layer = {"attn.q": "attention.self.query", "attn.k": "attention.self.key", "attn.v": "attention.self.value",
             "attn.out": "attention.output.dense", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
             "attn_norm": "attention.output.LayerNorm" if post else "attention.ln",
             "mlp_norm": "output.LayerNorm" if post else "ln"}
    for i in range(num_layers):
        for ours, theirs in layer.items():
            for p in ("weight", "bias"):
                t[f"layers.{i}.{ours}.{p}"] = f"bert.encoder.layer.{i}.{theirs}.{p}"
    return t


def copy_to_hf(model: BertModel, hf) -> None:
    table = hf_name_table(model.cfg.layernorm_position == "post", model.cfg.num_layers)
    ours = dict(model.named_parameters())
    assert set(ours) == set(table), set(ours) ^ set(table)
    theirs = dict(hf.named_parameters())
    with torch.no_grad():
        for name, hf_name in table.items():
            src = ours[name]
            if name in ("embed.tokens.weight", "lm_head.bias"):
                src = src[: model.vocab_size]  # exports cut the vocabulary padding
            theirs[hf_name].copy_(src)


@pytest.mark.parametrize("name", BIG)
def test_recipes_match_transformers_parameter_count(name):
    cfg = load_config(name)
    m = cfg.model
    ours = sum(p.numel() for p in recipe_model_on_meta(cfg).parameters())
    with torch.device("meta"):
        hf = hf_class(m)(hf_config(m))
    theirs = sum(p.numel() for p in hf.parameters())  # tied decoder weight and bias counted once
    pad = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by) - m.vocab_size
    assert ours == theirs + pad * (m.hidden_size + 1)  # padding rows of the embedding + MLM bias


@pytest.mark.parametrize("name", ["bert-tiny", "gatortron-tiny"])
def test_tiny_recipes_build_on_meta(name):
    cfg = load_config(name)
    model = recipe_model_on_meta(cfg)
    assert isinstance(model, BertModel)
    assert (model.final_norm is None) == (cfg.model.layernorm_position == "post")


def test_gatortron_sizes_match_the_published_ones():
    published = {"gatortron-base": 345e6, "gatortron-medium": 3.9e9, "gatortron-large": 8.9e9}
    for name, size in published.items():
        n = recipe_model_on_meta(load_config(name)).num_parameters()
        # "345M" is the Megatron-BERT-345M shape's nominal name; with GatorTron's 50176 vocab it has 356M
        assert abs(n - size) / size < 0.05, (name, n)
    assert recipe_model_on_meta(load_config("gatortron-base")).padded_vocab_size == 50176  # no padding


@pytest.mark.parametrize("position", ["post", "pre"])
def test_logits_match_transformers(position):
    cfg = tiny(layernorm_position=position)
    torch.manual_seed(0)
    ours = BertModel(cfg)
    ours.init_weights(5)
    with torch.no_grad():  # non-trivial norms and biases, so a mis-mapped tensor shows
        for n, p in ours.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    hf = hf_class(cfg)(hf_config(cfg)).eval()
    copy_to_hf(ours, hf)
    ours.eval()
    tokens = torch.randint(0, 100, (3, 12))
    types = (torch.arange(12) >= 6).long().expand(3, 12)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    out = ours(tokens, token_types=types, padding_mask=mask)
    with torch.no_grad():
        ref = hf(input_ids=tokens, token_type_ids=types, attention_mask=mask)
    assert out["mlm_logits"].shape == (3, 12, 128)
    assert (out["mlm_logits"][..., :100] - ref.prediction_logits).abs().max() <= 1e-4
    assert (out["binary_logits"] - ref.seq_relationship_logits).abs().max() <= 1e-4


@pytest.mark.parametrize("position", ["post", "pre"])
def test_padding_does_not_change_real_positions(position):
    m = BertModel(tiny(layernorm_position=position))
    m.init_weights(1)
    m.eval()
    tokens = torch.randint(0, 100, (1, 8))
    types = torch.zeros_like(tokens)
    short = m(tokens, token_types=types, padding_mask=torch.ones_like(tokens))
    padded_tokens = torch.cat([tokens, torch.randint(0, 100, (1, 5))], 1)
    mask = torch.cat([torch.ones(1, 8), torch.zeros(1, 5)], 1).long()
    long = m(padded_tokens, token_types=torch.zeros_like(padded_tokens), padding_mask=mask)
    torch.testing.assert_close(long["mlm_logits"][:, :8, :100], short["mlm_logits"][..., :100], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(long["binary_logits"], short["binary_logits"], atol=1e-5, rtol=1e-5)
    # without the mask the padding does leak into the real positions
    leak = m(padded_tokens, token_types=torch.zeros_like(padded_tokens))
    assert not torch.allclose(leak["mlm_logits"][:, :8, :100], short["mlm_logits"][..., :100], atol=1e-4)


def test_padded_vocab_and_no_binary_head():
    m = BertModel(tiny(bert_binary_head=False, num_tokentypes=0))
    m.init_weights(0)
    assert m.pooler is None and m.binary_head is None and m.embed.tokentypes is None
    out = m(torch.randint(0, 100, (2, 6)))
    assert out["binary_logits"] is None
    logits = out["mlm_logits"]
    assert torch.isinf(logits[..., 100:]).all() and torch.isfinite(logits[..., :100]).all()
    lm_cross_entropy(logits, torch.randint(0, 100, (2, 6))).backward()
    assert m.embed.tokens.weight.grad[100:].abs().max() == 0
    assert (m.lm_head.bias.grad[100:] == 0).all()


def test_meta_build_then_init_equals_direct_init():
    cfg = tiny(layernorm_position="pre")
    a = BertModel(cfg)
    a.init_weights(7)
    with torch.device("meta"):
        b = BertModel(cfg)
    b.to_empty(device="cpu")
    b.init_weights(7)
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb), na
    assert (a.lm_head.bias == 0).all()
    assert a.num_parameters(exclude_positions=True) == a.num_parameters() - 24 * 32


@pytest.mark.parametrize("position", ["post", "pre"])
def test_tiny_model_overfits_one_batch(position):
    torch.manual_seed(0)
    m = BertModel(tiny(layernorm_position=position))
    m.init_weights(0)
    opt = torch.optim.AdamW(m.parameters(), lr=5e-3)
    tokens = torch.randint(5, 100, (4, 16))
    labels = torch.full_like(tokens, -100)
    labels[:, ::3] = tokens[:, ::3]
    inputs = tokens.clone()
    inputs[:, ::3] = 4  # [MASK]
    types = (torch.arange(16) >= 8).long().expand(4, 16)
    is_random = torch.tensor([0, 1, 0, 1])
    for _ in range(100):
        out = m(inputs, token_types=types, padding_mask=torch.ones_like(tokens))
        loss = lm_cross_entropy(out["mlm_logits"], labels) + torch.nn.functional.cross_entropy(
            out["binary_logits"], is_random)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()
