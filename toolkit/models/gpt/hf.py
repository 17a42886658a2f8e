"""Hugging Face adapter of the GPT family: ``GPT2LMHeadModel`` and ``LlamaForCausalLM``.

One template table per target (HF name ↔ our name, ``{}`` = layer index); the reverse direction
is derived from the same table by :mod:`toolkit.mapping.tables`. The only tensor transforms:

* GPT-2's attention is one Conv1D ``c_attn`` (weight ``[hidden, 3·hidden]``, i.e. ``[in, out]``)
  holding q, k, v side by side; ours are three Linear weights ``[out, in]`` → concatenate and
  transpose. Its other Conv1D weights (``c_proj``, ``c_fc``, ``mlp.c_proj``) are transposed.
* Vocabulary rows: exports cut our padding back to the true vocabulary, imports re-pad with zeros.
* Llama needs none: our rotary embedding uses HF's rotate-half convention, so q/k are copied as is.

Config mapping: our :class:`~toolkit.config.ModelConfig` ↔ ``GPT2Config`` / ``LlamaConfig``
(as plain ``config.json`` dictionaries, so no ``transformers`` import is needed to convert).
"""

from __future__ import annotations

import torch

from toolkit.config import ModelConfig, ffn_size, head_dim
from toolkit.errors import CheckpointError
from toolkit.mapping.megatron import megatron_layer_rules
from toolkit.mapping.tables import (
    FamilyAdapter,
    HFTarget,
    MappingContext,
    TemplateTable,
    model_context,
    qkv_sizes,
    register_transform,
    require_multi_head_attention,
    rule,
    split_rows,
    when_flag,
)
from toolkit.models.common.mlp import GATED

# ---------------------------------------------------------------------------- GPT-2 transforms


def _qkv_weight_to_hf(ts, ctx: MappingContext):
    return [torch.cat(ts, dim=0).t()]  # [3·hidden, hidden] → Conv1D [hidden, 3·hidden]


def _qkv_weight_from_hf(ts, ctx: MappingContext):
    return split_rows(ts[0].t(), qkv_sizes(ctx), "c_attn.weight")  # Conv1D [hidden, 3·hidden] → 3 × [hidden, hidden]


def _qkv_bias_to_hf(ts, ctx: MappingContext):
    return [torch.cat(ts, dim=0)]


def _qkv_bias_from_hf(ts, ctx: MappingContext):
    return split_rows(ts[0], qkv_sizes(ctx), "c_attn.bias")


register_transform("gpt2.qkv_weight", _qkv_weight_to_hf, _qkv_weight_from_hf)
register_transform("gpt2.qkv_bias", _qkv_bias_to_hf, _qkv_bias_from_hf)


_untied, _tied, _bias = when_flag("tied", negate=True), when_flag("tied"), when_flag("bias")  # see context()


# ---------------------------------------------------------------------------- tables

GPT2_TABLE = TemplateTable(
    [
        rule("transformer.wte.weight", "embed.tokens.weight", "vocab_rows"),
        rule("transformer.wpe.weight", "embed.positions.weight"),
        rule("transformer.h.{}.ln_1.weight", "layers.{}.attn_norm.weight"),
        rule("transformer.h.{}.ln_1.bias", "layers.{}.attn_norm.bias"),
        rule("transformer.h.{}.attn.c_attn.weight",
             ["layers.{}.attn.q.weight", "layers.{}.attn.k.weight", "layers.{}.attn.v.weight"], "gpt2.qkv_weight"),
        rule("transformer.h.{}.attn.c_attn.bias",
             ["layers.{}.attn.q.bias", "layers.{}.attn.k.bias", "layers.{}.attn.v.bias"], "gpt2.qkv_bias"),
        rule("transformer.h.{}.attn.c_proj.weight", "layers.{}.attn.out.weight", "transpose"),
        rule("transformer.h.{}.attn.c_proj.bias", "layers.{}.attn.out.bias"),
        rule("transformer.h.{}.ln_2.weight", "layers.{}.mlp_norm.weight"),
        rule("transformer.h.{}.ln_2.bias", "layers.{}.mlp_norm.bias"),
        rule("transformer.h.{}.mlp.c_fc.weight", "layers.{}.mlp.fc1.weight", "transpose"),
        rule("transformer.h.{}.mlp.c_fc.bias", "layers.{}.mlp.fc1.bias"),
        rule("transformer.h.{}.mlp.c_proj.weight", "layers.{}.mlp.fc2.weight", "transpose"),
        rule("transformer.h.{}.mlp.c_proj.bias", "layers.{}.mlp.fc2.bias"),
        rule("transformer.ln_f.weight", "final_norm.weight"),
        rule("transformer.ln_f.bias", "final_norm.bias"),
        rule("lm_head.weight", "head.weight", "vocab_rows", when=_untied),
    ],
    # causal-mask buffers of older transformers releases; a tied head saved as a duplicate
    ignore_hf=["transformer.h.{}.attn.bias", "transformer.h.{}.attn.masked_bias", ("lm_head.weight", _tied)],
)

LLAMA_TABLE = TemplateTable(
    [
        rule("model.embed_tokens.weight", "embed.tokens.weight", "vocab_rows"),
        rule("model.layers.{}.input_layernorm.weight", "layers.{}.attn_norm.weight"),
        rule("model.layers.{}.self_attn.q_proj.weight", "layers.{}.attn.q.weight"),
        rule("model.layers.{}.self_attn.k_proj.weight", "layers.{}.attn.k.weight"),
        rule("model.layers.{}.self_attn.v_proj.weight", "layers.{}.attn.v.weight"),
        rule("model.layers.{}.self_attn.o_proj.weight", "layers.{}.attn.out.weight"),
        rule("model.layers.{}.self_attn.q_proj.bias", "layers.{}.attn.q.bias", when=_bias),
        rule("model.layers.{}.self_attn.k_proj.bias", "layers.{}.attn.k.bias", when=_bias),
        rule("model.layers.{}.self_attn.v_proj.bias", "layers.{}.attn.v.bias", when=_bias),
        rule("model.layers.{}.self_attn.o_proj.bias", "layers.{}.attn.out.bias", when=_bias),
        rule("model.layers.{}.post_attention_layernorm.weight", "layers.{}.mlp_norm.weight"),
        rule("model.layers.{}.mlp.gate_proj.weight", "layers.{}.mlp.gate.weight"),
        rule("model.layers.{}.mlp.up_proj.weight", "layers.{}.mlp.fc1.weight"),
        rule("model.layers.{}.mlp.down_proj.weight", "layers.{}.mlp.fc2.weight"),
        rule("model.layers.{}.mlp.gate_proj.bias", "layers.{}.mlp.gate.bias", when=_bias),
        rule("model.layers.{}.mlp.up_proj.bias", "layers.{}.mlp.fc1.bias", when=_bias),
        rule("model.layers.{}.mlp.down_proj.bias", "layers.{}.mlp.fc2.bias", when=_bias),
        rule("model.norm.weight", "final_norm.weight"),
        rule("lm_head.weight", "head.weight", "vocab_rows", when=_untied),
    ],
    ignore_hf=["model.layers.{}.self_attn.rotary_emb.inv_freq", "model.rotary_emb.inv_freq", ("lm_head.weight", _tied)],
)

# Legacy Megatron-LM GPT (toolkit.convert.megatron_legacy merges the shards and spells every name
# the legacy way without the language_model./encoder. prefixes before this table applies).
MEGATRON_TABLE = TemplateTable([
    rule("embedding.word_embeddings.weight", "embed.tokens.weight", "megatron.vocab_rows"),
    rule("embedding.position_embeddings.weight", "embed.positions.weight", when=when_flag("learned_positions")),
    *megatron_layer_rules(),
    rule("final_layernorm.weight", "final_norm.weight"),
    rule("final_layernorm.bias", "final_norm.bias", when=when_flag("norm_bias")),
    rule("output_layer.weight", "head.weight", "megatron.vocab_rows", when=_untied),
])


# ---------------------------------------------------------------------------- configs

_GPT2_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
_GPT2_ACT_IN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_GPT2_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                      activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                      layer_norm_epsilon=1e-5, initializer_range=0.02, scale_attn_weights=True,
                      scale_attn_by_inverse_layer_idx=False, add_cross_attention=False, tie_word_embeddings=True)
_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
                       max_position_embeddings=2048, rms_norm_eps=1e-6, attention_bias=False, mlp_bias=False,
                       attention_dropout=0.0, initializer_range=0.02, tie_word_embeddings=False)
#: training sequence length given to imported models (their context window may be far longer)
MAX_IMPORTED_SEQ_LENGTH = 4096


def _max_positions(cfg: ModelConfig) -> int:
    return cfg.max_position_embeddings or cfg.seq_length


def gpt2_config_to_hf(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": _max_positions(cfg), "n_embd": cfg.hidden_size,
        "n_layer": cfg.num_layers, "n_head": cfg.num_attention_heads, "n_inner": ffn_size(cfg),
        "activation_function": _GPT2_ACT[cfg.activation], "layer_norm_epsilon": cfg.layernorm_epsilon,
        "resid_pdrop": cfg.hidden_dropout, "embd_pdrop": cfg.hidden_dropout, "attn_pdrop": cfg.attention_dropout,
        "initializer_range": cfg.init_method_std, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.share_embeddings_and_output_weights, "use_cache": True,
    }


def gpt2_config_from_hf(d: dict) -> ModelConfig:
    c = {**_GPT2_DEFAULTS, **{k: v for k, v in d.items() if v is not None or k == "n_inner"}}
    act = c["activation_function"]
    if act not in _GPT2_ACT_IN:
        raise CheckpointError(f"GPT-2 activation_function={act!r} is not supported; use one of "
                              f"{', '.join(_GPT2_ACT_IN)}")
    if not c["scale_attn_weights"] or c["scale_attn_by_inverse_layer_idx"] or c["add_cross_attention"]:
        raise CheckpointError("GPT-2 configs with scale_attn_weights=false, scale_attn_by_inverse_layer_idx=true "
                              "or add_cross_attention=true are not supported")
    hidden = c["n_embd"]
    return ModelConfig(
        family="gpt", num_layers=c["n_layer"], hidden_size=hidden, ffn_hidden_size=c["n_inner"] or 4 * hidden,
        num_attention_heads=c["n_head"], seq_length=min(c["n_positions"], MAX_IMPORTED_SEQ_LENGTH),
        max_position_embeddings=c["n_positions"], position_embedding_type="learned_absolute",
        normalization="LayerNorm", layernorm_epsilon=c["layer_norm_epsilon"], activation=_GPT2_ACT_IN[act],
        add_bias_linear=True, share_embeddings_and_output_weights=bool(c["tie_word_embeddings"]),
        hidden_dropout=c["resid_pdrop"], attention_dropout=c["attn_pdrop"],
        init_method_std=c["initializer_range"], vocab_size=c["vocab_size"],
    )


def llama_config_to_hf(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": ffn_size(cfg),
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups or cfg.num_attention_heads, "head_dim": head_dim(cfg),
        "hidden_act": "silu", "max_position_embeddings": _max_positions(cfg), "rms_norm_eps": cfg.layernorm_epsilon,
        "rope_theta": cfg.rotary_base, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base},
        "attention_bias": cfg.add_bias_linear, "mlp_bias": cfg.add_bias_linear,
        "attention_dropout": cfg.attention_dropout, "initializer_range": cfg.init_method_std,
        "tie_word_embeddings": cfg.share_embeddings_and_output_weights, "pretraining_tp": 1, "use_cache": True,
    }


def _rope_theta(c: dict) -> float:
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise CheckpointError(f"Llama rope scaling {kind!r} is not supported (only plain RoPE); "
                              "remove rope_scaling or convert a model without it")
    return float(params.get("rope_theta") or c.get("rope_theta") or 10000.0)


def llama_config_from_hf(d: dict) -> ModelConfig:
    c = {**_LLAMA_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
    if c["hidden_act"] != "silu":
        raise CheckpointError(f"Llama hidden_act={c['hidden_act']!r} is not supported (only silu, i.e. SwiGLU)")
    if bool(c["attention_bias"]) != bool(c["mlp_bias"]):
        raise CheckpointError("Llama configs with attention_bias != mlp_bias are not supported "
                              "(megaforge has one add_bias_linear switch)")
    heads, hidden = c["num_attention_heads"], c["hidden_size"]
    hd = c["head_dim"] or hidden // heads
    return ModelConfig(
        family="gpt", num_layers=c["num_hidden_layers"], hidden_size=hidden, ffn_hidden_size=c["intermediate_size"],
        num_attention_heads=heads, num_query_groups=c["num_key_value_heads"] or heads,
        kv_channels=None if hd * heads == hidden else hd,
        seq_length=min(c["max_position_embeddings"], MAX_IMPORTED_SEQ_LENGTH),
        max_position_embeddings=c["max_position_embeddings"], position_embedding_type="rope",
        rotary_base=_rope_theta(c), normalization="RMSNorm", layernorm_epsilon=c["rms_norm_eps"],
        activation="swiglu", add_bias_linear=bool(c["attention_bias"]),
        share_embeddings_and_output_weights=bool(c["tie_word_embeddings"]), hidden_dropout=0.0,
        attention_dropout=c["attention_dropout"], init_method_std=c["initializer_range"], vocab_size=c["vocab_size"],
    )


GPT2 = HFTarget("gpt2", "GPT2LMHeadModel", GPT2_TABLE, gpt2_config_to_hf, gpt2_config_from_hf)
LLAMA = HFTarget("llama", "LlamaForCausalLM", LLAMA_TABLE, llama_config_to_hf, llama_config_from_hf)


# ---------------------------------------------------------------------------- adapter


def select_target(cfg: ModelConfig) -> HFTarget:
    """rope + RMSNorm + SwiGLU → Llama; learned positions + LayerNorm + GELU/ReLU with biases → GPT-2."""
    if cfg.layernorm_position != "pre":
        raise CheckpointError("cannot export a GPT model with model.layernorm_position=post to Hugging Face "
                              "(GPT-2 and Llama are pre-LN)")
    if cfg.position_embedding_type == "rope" and cfg.normalization == "RMSNorm" and cfg.activation == "swiglu":
        return LLAMA
    if (cfg.position_embedding_type == "learned_absolute" and cfg.normalization == "LayerNorm"
            and cfg.activation in _GPT2_ACT):
        require_multi_head_attention(cfg, GPT2.architecture)
        if not cfg.add_bias_linear:
            raise CheckpointError("cannot export to GPT2LMHeadModel: it has biases in every linear layer "
                                  "(model.add_bias_linear=false)")
        return GPT2
    raise CheckpointError(
        f"cannot export this GPT model to Hugging Face: position_embedding_type={cfg.position_embedding_type}, "
        f"normalization={cfg.normalization}, activation={cfg.activation} match neither GPT-2 "
        "(learned_absolute, LayerNorm, gelu/gelu_tanh/relu) nor Llama (rope, RMSNorm, swiglu)"
    )


def context(cfg: ModelConfig) -> MappingContext:
    return model_context(cfg, flags={
        "bias": cfg.add_bias_linear, "tied": cfg.share_embeddings_and_output_weights,
        "gated": cfg.activation in GATED, "norm_bias": cfg.normalization == "LayerNorm",
        "learned_positions": cfg.position_embedding_type == "learned_absolute",
    })


ADAPTER = FamilyAdapter(family="gpt", targets=(GPT2, LLAMA), select=select_target, context=context,
                        megatron_table=MEGATRON_TABLE)
