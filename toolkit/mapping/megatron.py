"""Legacy Megatron-LM and megatron-core tensor layouts, in the terms of :mod:`toolkit.mapping.tables`.

The fused tensors of their checkpoints (any family), after the tensor-parallel shards were merged:
QKV grouped per query group (``megatron.qkv``), SwiGLU's ``[gate; up]`` (``megatron.swiglu``), the
vocabulary padded to ``divisible_by × tp`` (``megatron.vocab_rows``); and the per-layer rules of a
``ParallelTransformerLayer`` (:func:`megatron_layer_rules`), which every family's legacy table uses
(``FamilyAdapter(megatron_table=...)``; :mod:`toolkit.convert.megatron_legacy` merges the shards).
"""

from __future__ import annotations

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
