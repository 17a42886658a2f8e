"""Legacy Megatron-LM and megatron-core tensor layouts, in the terms of :mod:`toolkit.mapping.tables`.

The fused tensors of their checkpoints (any family), after the tensor-parallel shards were merged:
QKV grouped per query group (``megatron.qkv``), SwiGLU's ``[gate; up]`` (``megatron.swiglu``), the
vocabulary padded to ``divisible_by × tp`` (``megatron.vocab_rows``); and the per-layer rules of a
``ParallelTransformerLayer`` (:func:`megatron_layer_rules`), which every family's legacy table uses
(``FamilyAdapter(megatron_table=...)``; :mod:`toolkit.convert.megatron_legacy` merges the shards).

The names those tables read are canonical: every spelling Megatron-LM has written, old and new
(:data:`MEGATRON_RENAMES`, :func:`canonical_megatron_name`), is brought to the legacy
``ParallelTransformer`` names without the ``language_model.`` / ``encoder.`` prefixes first:

=================================================  ==============================================
written by                                          canonical
=================================================  ==============================================
legacy ``language_model.encoder.layers.N.…``        ``layers.N.…``
older legacy ``transformer.layers.N.attention.…``  ``layers.N.self_attention.…``
legacy RMSNorm era ``input_norm``,                 ``input_layernorm``, ``post_attention_layernorm``,
``post_attention_norm``, ``final_norm``             ``final_layernorm``
megatron-core ``decoder.layers.N.`` (GPT),          ``layers.N.``; ``linear_qkv`` → ``query_key_value``,
``encoder.layers.N.`` (BERT)                        ``linear_proj`` → ``dense``, ``pre_mlp_layernorm`` →
                                                    ``post_attention_layernorm``, ``linear_fc1/2`` →
                                                    ``dense_h_to_4h`` / ``dense_4h_to_h``
Transformer Engine ``linear_qkv.layer_norm_*``,     ``input_layernorm.*``, ``post_attention_layernorm.*``
``linear_fc1.layer_norm_*``
megatron-core BERT ``lm_head.layer_norm``,          ``lm_head.layernorm``, ``lm_head.bias``
``output_layer.bias`` (the MLM bias)
=================================================  ==============================================

Tensors of features megaforge does not have (QK normalization, mixture of experts, multi-latent
attention, cross-attention) are named by :func:`unsupported_megatron_tensor`.
"""

from __future__ import annotations

import re

import torch

from toolkit.mapping.tables import MappingContext, Rule, register_transform, rule, when_flag


def _groups(ctx: MappingContext) -> tuple[int, int]:
    return ctx.num_kv_heads, ctx.num_heads // ctx.num_kv_heads


def _qkv_from_grouped(ts, ctx: MappingContext):
    g, qpg = _groups(ctx)
    t = ts[0]
    rest = t.shape[1:]
    t = t.reshape(g, qpg + 2, ctx.head_dim, *rest)  # [groups, q per group + k + v, head_dim, (hidden)]
    q = t[:, :qpg].reshape(g * qpg * ctx.head_dim, *rest)
    k = t[:, qpg].reshape(g * ctx.head_dim, *rest)
    v = t[:, qpg + 1].reshape(g * ctx.head_dim, *rest)
    return [q, k, v]


def _qkv_to_grouped(ts, ctx: MappingContext):
    g, qpg = _groups(ctx)
    q, k, v = ts
    rest = q.shape[1:]
    parts = [q.reshape(g, qpg, ctx.head_dim, *rest), k.reshape(g, 1, ctx.head_dim, *rest),
             v.reshape(g, 1, ctx.head_dim, *rest)]
    return [torch.cat(parts, dim=1).reshape(-1, *rest)]  # [groups·(qpg+2)·head_dim, (hidden)]


def _swiglu_split(ts, ctx: MappingContext):
    gate, up = ts[0].chunk(2, dim=0)  # Megatron: silu(first half) * second half
    return [gate, up]


def _swiglu_fuse(ts, ctx: MappingContext):
    return [torch.cat(ts, dim=0)]


def _vocab_from_megatron(ts, ctx: MappingContext):
    t = ts[0][: ctx.vocab_size]  # Megatron pads to a multiple of divisible_by × tp; ours to divisible_by
    pad = t.new_zeros((ctx.padded_vocab_size - t.shape[0], *t.shape[1:]))
    return [torch.cat([t, pad], dim=0)]


register_transform("megatron.qkv", _qkv_to_grouped, _qkv_from_grouped)
register_transform("megatron.swiglu", _swiglu_fuse, _swiglu_split)
register_transform("megatron.vocab_rows", lambda ts, ctx: [ts[0][: ctx.vocab_size]], _vocab_from_megatron)


def megatron_layer_rules(prefix: str = "layers.{}.") -> list[Rule]:
    """The per-layer rules of a legacy Megatron-LM ``ParallelTransformerLayer`` (canonical names, after
    the shards are merged) ↔ our ``TransformerLayer``; conditions read the context flags ``bias``,
    ``norm_bias`` (LayerNorm) and ``gated`` (SwiGLU)."""
    bias, norm_bias, gated = when_flag("bias"), when_flag("norm_bias"), when_flag("gated")
    plain_bias = lambda c: bool(c.flag("bias")) and not c.flag("gated")  # noqa: E731
    gated_bias = lambda c: bool(c.flag("bias")) and bool(c.flag("gated"))  # noqa: E731
    m, o = prefix, "layers.{}."
    qkv = [o + "attn.q", o + "attn.k", o + "attn.v"]
    return [
        rule(m + "input_layernorm.weight", o + "attn_norm.weight"),
        rule(m + "input_layernorm.bias", o + "attn_norm.bias", when=norm_bias),
        rule(m + "self_attention.query_key_value.weight", [n + ".weight" for n in qkv], "megatron.qkv"),
        rule(m + "self_attention.query_key_value.bias", [n + ".bias" for n in qkv], "megatron.qkv", when=bias),
        rule(m + "self_attention.dense.weight", o + "attn.out.weight"),
        rule(m + "self_attention.dense.bias", o + "attn.out.bias", when=bias),
        rule(m + "post_attention_layernorm.weight", o + "mlp_norm.weight"),
        rule(m + "post_attention_layernorm.bias", o + "mlp_norm.bias", when=norm_bias),
        rule(m + "mlp.dense_h_to_4h.weight", o + "mlp.fc1.weight", when=when_flag("gated", negate=True)),
        rule(m + "mlp.dense_h_to_4h.bias", o + "mlp.fc1.bias", when=plain_bias),
        rule(m + "mlp.dense_h_to_4h.weight", [o + "mlp.gate.weight", o + "mlp.fc1.weight"], "megatron.swiglu",
             when=gated),
        rule(m + "mlp.dense_h_to_4h.bias", [o + "mlp.gate.bias", o + "mlp.fc1.bias"], "megatron.swiglu",
             when=gated_bias),
        rule(m + "mlp.dense_4h_to_h.weight", o + "mlp.fc2.weight"),
        rule(m + "mlp.dense_4h_to_h.bias", o + "mlp.fc2.bias", when=bias),
    ]


# ---------------------------------------------------------------------------- names, old and new

#: Megatron-LM / megatron-core spellings → the canonical (legacy, prefix-free) names, applied in order
MEGATRON_RENAMES: list[tuple[re.Pattern, str]] = [(re.compile(a), b) for a, b in [
    (r"^module\.", ""),  # a DDP-wrapped state dict
    (r"^language_model\.", ""),
    (r"^(?:encoder|transformer|decoder)\.(layers\.|final_layernorm\.|final_norm\.)", r"\1"),
    (r"^final_norm\.", "final_layernorm."),
    (r"\.attention\.", ".self_attention."),  # before checkpoint version 1 (2020)
    (r"\.input_norm\.", ".input_layernorm."),  # legacy after the RMSNorm rename (2023)
    (r"\.post_attention_norm\.", ".post_attention_layernorm."),
    (r"\.self_attention\.linear_qkv\.layer_norm_(weight|bias)$", r".input_layernorm.\1"),  # Transformer Engine
    (r"\.mlp\.linear_fc1\.layer_norm_(weight|bias)$", r".post_attention_layernorm.\1"),
    (r"\.linear_qkv\.", ".query_key_value."),
    (r"\.linear_proj\.", ".dense."),
    (r"\.pre_mlp_layernorm\.", ".post_attention_layernorm."),
    (r"\.linear_fc1\.", ".dense_h_to_4h."),
    (r"\.linear_fc2\.", ".dense_4h_to_h."),
    (r"^lm_head\.layer_norm\.", "lm_head.layernorm."),  # megatron-core BertLMHead
]]
#: entries that carry no weights: Transformer Engine's _extra_state, the last pipeline stage's copy of
#: tied word embeddings, rotary caches
_DROP = re.compile(r"(_extra_state$|^word_embeddings_for_head\.|\.inv_freq$)")
#: canonical name prefixes only a BERT checkpoint holds (masked-LM head, sentence-pair head, pooler, token types)
BERT_MARKERS = ("lm_head.", "binary_head.", "pooler.", "embedding.tokentype_embeddings.")


def canonical_megatron_name(name: str, *, family: str | None = None) -> str | None:
    """A legacy or megatron-core state-dict key → its canonical name; None for entries without
    weights. With ``family="bert"``, megatron-core's MLM bias ``output_layer.bias`` is ``lm_head.bias``."""
    for pattern, repl in MEGATRON_RENAMES:
        name = pattern.sub(repl, name)
    if _DROP.search(name):
        return None
    if family == "bert" and name == "output_layer.bias":
        return "lm_head.bias"
    return name


_UNSUPPORTED: list[tuple[re.Pattern, str]] = [(re.compile(a), b) for a, b in [
    (r"\.(q_layernorm|k_layernorm)\.", "QK normalization (qk_layernorm)"),
    (r"\.mlp\.(experts|router|shared_experts)\.", "mixture of experts (num_experts)"),
    (r"\.self_attention\.(linear_q_down_proj|linear_q_up_proj|linear_kv_down_proj|linear_kv_up_proj|linear_q_proj)\.",
     "multi-latent attention"),
    (r"\.(inter_attention|cross_attention|post_inter_attention_layernorm|pre_cross_attn_layernorm)\.",
     "cross-attention (an encoder-decoder model such as T5)"),
    (r"^(?:language_model\.)?(?:embedding\.)?(?:position_embeddings\.)?relative_attention_bias",
     "relative position buckets (T5)"),
    (r"^output_layer\.bias$", "a bias on the output layer (megaforge's GPT head has none)"),
    (r"\.mtp\.|^mtp\.", "multi-token prediction layers"),
    (r"(^|\.)initial_layernorm\.", "a post-LN BERT's embedding LayerNorm (NeMo transformer_block_type: post_ln)"),
]]


def unsupported_megatron_tensor(canonical: str) -> str | None:
    """What feature a canonical tensor name belongs to when megaforge cannot import it, else None."""
    for pattern, what in _UNSUPPORTED:
        if pattern.search(canonical):
            return what
    return None


# ---------------------------------------------------------------------------- writing megatron-core names

#: canonical names → megatron-core GPT names with Transformer Engine's fused norms (what NeMo's
#: ``MegatronGPTModel`` with ``mcore_gpt: true, transformer_engine: true`` holds, less NeMo's ``model.``)
MCORE_TE_GPT_NAMES: list[tuple[re.Pattern, str]] = [(re.compile(a), b) for a, b in [
    (r"^layers\.(\d+)\.input_layernorm\.", r"decoder.layers.\1.self_attention.linear_qkv.layer_norm_"),
    (r"^layers\.(\d+)\.post_attention_layernorm\.", r"decoder.layers.\1.mlp.linear_fc1.layer_norm_"),
    (r"^layers\.(\d+)\.self_attention\.query_key_value\.", r"decoder.layers.\1.self_attention.linear_qkv."),
    (r"^layers\.(\d+)\.self_attention\.dense\.", r"decoder.layers.\1.self_attention.linear_proj."),
    (r"^layers\.(\d+)\.mlp\.dense_h_to_4h\.", r"decoder.layers.\1.mlp.linear_fc1."),
    (r"^layers\.(\d+)\.mlp\.dense_4h_to_h\.", r"decoder.layers.\1.mlp.linear_fc2."),
    (r"^final_layernorm\.", "decoder.final_layernorm."),
]]
#: Transformer Engine modules of one megatron-core GPT layer that carry an ``_extra_state`` entry
MCORE_TE_EXTRA_STATE = ("self_attention.linear_qkv", "self_attention.linear_proj", "self_attention.core_attention",
                        "mlp.linear_fc1", "mlp.linear_fc2")


def mcore_te_gpt_name(canonical: str) -> str:
    """A canonical (legacy, prefix-free) GPT name → its megatron-core (Transformer Engine spec)
    spelling; :func:`canonical_megatron_name` takes it back."""
    for pattern, repl in MCORE_TE_GPT_NAMES:
        new = pattern.sub(repl, canonical)
        if new != canonical:
            return new
    return canonical
