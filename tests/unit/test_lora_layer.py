"""The LoRA linear and ``apply_lora``: peft's numbers on the same matrices, merge = unmerged, what
is frozen and trainable, keyed initialization, target-name mapping and its one-line errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from toolkit.config import OptimConfig, PeftConfig, RunConfig, load_config
from toolkit.errors import ConfigError
from toolkit.models.build import build_initialized_model, build_meta_model, init_rules
from toolkit.models.common.lora import LoRALinear, merge_lora, merged_state_dict, resolve_targets
from toolkit.optim import build_optimizer


def _tiny(recipe: str = "llama-tiny", **peft) -> RunConfig:
    cfg = load_config(recipe, ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
                               "model.vocab_size=64", "model.seq_length=16"])
    cfg.peft = PeftConfig(method="lora", rank=4, alpha=8.0, **peft)
    if cfg.model.ffn_hidden_size:
        cfg.model.ffn_hidden_size = 48
    return cfg


def test_lora_linear_matches_peft_on_the_same_matrices():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 10))
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=3, lora_alpha=5, target_modules=["0"], lora_dropout=0.0))
    layer = theirs.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # peft starts B at zero too: give it a value to compare
    ours = LoRALinear.wrap(layer.base_layer, PeftConfig(method="lora", rank=3, alpha=5, target_modules=["q"]))
    with torch.no_grad():
        ours.lora_A.weight.copy_(layer.lora_A["default"].weight)
        ours.lora_B.weight.copy_(layer.lora_B["default"].weight)
    x = torch.randn(2, 7, 12)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-6)
    unmerged = ours(x)
    merge_lora(ours)
    torch.testing.assert_close(ours(x), unmerged, atol=1e-5, rtol=1e-5)


def test_apply_lora_freezes_the_base_and_inits_adapters_by_name():
    cfg = _tiny(target_modules=["q_proj", "v_proj", "down_proj"])
    meta = build_meta_model(cfg)
    trainable = sorted(n for n, p in meta.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"layers.{i}.{m}.lora_{ab}.weight" for i in range(2)
                               for m in ("attn.q", "attn.v", "mlp.fc2") for ab in "AB")
    rules = init_rules(meta)
    assert rules["layers.0.attn.q.lora_B.weight"].kind == "zeros"
    assert rules["layers.0.attn.q.lora_A.weight"].kind == "normal"
    assert rules["layers.0.attn.q.weight"] == init_rules(build_meta_model(_plain(cfg)))["layers.0.attn.q.weight"]
    a, b = build_initialized_model(cfg, torch.device("cpu")), build_initialized_model(cfg, torch.device("cpu"))
    torch.testing.assert_close(a.layers["0"].attn.q.lora_A.weight, b.layers["0"].attn.q.lora_A.weight, atol=0, rtol=0)
    assert a.layers["0"].attn.q.lora_B.weight.abs().sum() == 0  # a fresh adapter leaves the model as it was
    plain = build_initialized_model(_plain(cfg), torch.device("cpu"))
    ids = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(a(ids), plain(ids), atol=0, rtol=0)
    opt = build_optimizer(a, OptimConfig())
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)  # the optimizer sees only the adapters


def _plain(cfg: RunConfig) -> RunConfig:
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.peft = PeftConfig()
    return cfg


def test_merged_state_dict_folds_the_adapters_in():
    cfg = _tiny(target_modules=["q", "k", "v", "out", "gate", "fc1", "fc2"])
    model = build_initialized_model(cfg, torch.device("cpu"))
    for _, p in model.named_parameters():
        if ".lora_B." in _:
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 64, (2, 8))
    want = model(ids)
    plain = build_initialized_model(_plain(cfg), torch.device("cpu"))
    plain.load_state_dict(merged_state_dict(model))
    torch.testing.assert_close(plain(ids), want, atol=1e-5, rtol=1e-5)


def test_task_head_stays_trainable_and_gpt2_names_cover_fused_modules():
    cfg = load_config("bert-tiny-ncbi-disease", ["model.vocab_size=64", "task.labels=[O,B-X]"])
    cfg.peft = PeftConfig(method="lora", target_modules=["query", "dense"])
    meta = build_meta_model(cfg)
    trainable = {n for n, p in meta.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias", "layers.0.attn.out.lora_A.weight",
            "layers.0.mlp.fc1.lora_B.weight"} <= trainable
    assert not [n for n in trainable if "pooler" in n or "lm_head" in n]
    assert resolve_targets(["c_attn", "c_proj"]) == {"q", "k", "v", "out", "fc2"}


def test_unknown_or_unmatched_target_names_are_one_line_config_errors():
    with pytest.raises(ConfigError, match=r"'qkv' names no linear LoRA can adapt; use megaforge's names \(q, k, v"):
        build_meta_model(_tiny(target_modules=["qkv"]))
    with pytest.raises(ConfigError, match=r"match no linear of this GPTModel; it has fc1, fc2, k, out, q, v"):
        build_meta_model(_tiny("gpt-tiny", target_modules=["gate_proj"]))


def test_an_exported_config_names_a_local_lora_base_by_its_last_part_only():
    from toolkit.convert.provenance import public_config

    local = public_config({"peft": {"base_model_name_or_path": "/home/alice/models/tinyllama"}})
    hub = public_config({"peft": {"base_model_name_or_path": "TinyLlama/TinyLlama-1.1B-Chat-v1.0"}})
    assert local["peft"]["base_model_name_or_path"] == "tinyllama"
    assert hub["peft"]["base_model_name_or_path"] == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
