"""Hugging Face adapter of the T5 family: ``T5ForConditionalGeneration`` (v1.0 and v1.1).

One template table (HF name ↔ our name; ``{}`` = layer index, encoder and decoder stacks counted
separately); the reverse direction is derived from it by :mod:`toolkit.mapping.tables`.
Tensors are copied as they are, except the vocabulary rows of ``shared`` and ``lm_head``: exports
cut our padding, imports re-pad with zeros.

The output layer, across transformers versions:

* **v1.0** (our ``share_embeddings_and_output_weights: true``): logits from ``shared`` with the
  decoder output scaled by ``d_model ** -0.5``. Exported as ``tie_word_embeddings: true`` and
  ``scale_decoder_outputs: true``; there is no ``lm_head.weight`` in the file.
* **v1.1** (untied, no scaling): exported with ``lm_head.weight``, ``tie_word_embeddings: false`` and
  ``scale_decoder_outputs: false``. transformers ≥ 5 always sets ``tie_word_embeddings=True`` on a
  T5 config and reads the scaling from ``scale_decoder_outputs`` (else from the original
  ``tie_word_embeddings``); it keeps a separate ``lm_head`` when the checkpoint holds one whose values
  differ from ``shared``, which ours does. transformers 4.x unties on ``tie_word_embeddings: false``.

On import, scaling decides the variant: ``scale_decoder_outputs`` if present, else
``tie_word_embeddings``. An unscaled checkpoint without ``lm_head.weight`` (a v1.1-style model
saved by transformers ≥ 5 while tied) imports with ``head`` = a copy of ``shared``.
"""

from __future__ import annotations

from toolkit.config import ModelConfig, ffn_size, head_dim
from toolkit.errors import CheckpointError
from toolkit.mapping.tables import (
    FamilyAdapter,
    HFTarget,
    MappingContext,
    TemplateTable,
    model_context,
    rule,
    when_flag,
)
from toolkit.models.common.mlp import GATED

_gated, _plain = when_flag("gated"), when_flag("gated", negate=True)  # see context()
_tied, _untied = when_flag("tied"), when_flag("tied", negate=True)


# ---------------------------------------------------------------------------- table


def _stack_rules(side: str, layers: str | None) -> list:
    """Per-layer rules of one stack: ``side`` = encoder | decoder (the decoder has cross-attention)."""
    B, o = f"{side}.block.{{}}.layer.", f"{side}.layers.{{}}."
    mlp = 2 if side == "decoder" else 1  # index of the feed-forward sub-layer
    rules = [rule(f"{B}0.layer_norm.weight", f"{o}attn_norm.weight", layers=layers)]
    rules += [rule(f"{B}0.SelfAttention.{t}.weight", f"{o}attn.{u}.weight", layers=layers)
              for t, u in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "out"))]
    if side == "decoder":
        rules.append(rule(f"{B}1.layer_norm.weight", f"{o}cross_attn_norm.weight", layers=layers))
        rules += [rule(f"{B}1.EncDecAttention.{t}.weight", f"{o}cross_attn.{u}.weight", layers=layers)
                  for t, u in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "out"))]
    ff = f"{B}{mlp}.DenseReluDense."
    rules += [
        rule(f"{B}{mlp}.layer_norm.weight", f"{o}mlp_norm.weight", layers=layers),
        rule(ff + "wi.weight", o + "mlp.fc1.weight", when=_plain, layers=layers),
        rule(ff + "wi_0.weight", o + "mlp.gate.weight", when=_gated, layers=layers),
        rule(ff + "wi_1.weight", o + "mlp.fc1.weight", when=_gated, layers=layers),
        rule(ff + "wo.weight", o + "mlp.fc2.weight", layers=layers),
    ]
    return rules


T5_TABLE = TemplateTable(
    [
        rule("shared.weight", "embed.weight", "vocab_rows"),
        rule("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
             "encoder.layers.0.relative_bias.weight"),
        *_stack_rules("encoder", None),
        rule("encoder.final_layer_norm.weight", "encoder.final_norm.weight"),
        rule("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
             "decoder.layers.0.relative_bias.weight"),
        *_stack_rules("decoder", "decoder_layers"),
        rule("decoder.final_layer_norm.weight", "decoder.final_norm.weight"),
        rule("lm_head.weight", "head.weight", "vocab_rows", when=_untied),
    ],
    # the stacks' copies of the shared embedding (older files), an unused cross-attention bias table
    # some checkpoints carry, the tied head's duplicate
    ignore_hf=["encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
               "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight", ("lm_head.weight", _tied)],
)


# ---------------------------------------------------------------------------- configs

#: our activation → feed_forward_proj
_FF = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "geglu": "gated-gelu", "swiglu": "gated-silu"}
#: (gated, dense_act_fn) → our activation
_FF_IN = {(False, "relu"): "relu", (False, "gelu"): "gelu", (False, "gelu_new"): "gelu_tanh",
          (False, "gelu_pytorch_tanh"): "gelu_tanh", (True, "gelu"): "geglu", (True, "gelu_new"): "geglu",
          (True, "gelu_pytorch_tanh"): "geglu", (True, "silu"): "swiglu", (True, "swish"): "swiglu"}
_DEFAULTS = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=None,
                 num_heads=8, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                 dropout_rate=0.1, layer_norm_epsilon=1e-6, feed_forward_proj="relu", is_encoder_decoder=True)
#: encoder sequence length given to imported models (T5 has no position table to read it from)
IMPORTED_SEQ_LENGTH = 512


def config_to_hf(cfg: ModelConfig) -> dict:
    tied = cfg.share_embeddings_and_output_weights
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
        "vocab_size": cfg.vocab_size, "d_model": cfg.hidden_size, "d_kv": head_dim(cfg), "d_ff": ffn_size(cfg),
        "num_layers": cfg.num_layers, "num_decoder_layers": cfg.num_decoder_layers or cfg.num_layers,
        "num_heads": cfg.num_attention_heads, "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "dropout_rate": cfg.hidden_dropout, "layer_norm_epsilon": cfg.layernorm_epsilon, "initializer_factor": 1.0,
        "feed_forward_proj": _FF[cfg.activation], "is_encoder_decoder": True, "use_cache": True,
        "tie_word_embeddings": tied, "scale_decoder_outputs": tied,
        # transformers 5 sizes generate()'s decoder cache from get_text_config(decoder=True), which reads
        # "decoder_layers" (not T5's num_decoder_layers): without it, decoders deeper than the encoder fail
        "decoder_layers": cfg.num_decoder_layers or cfg.num_layers,
    }


def _activation(c: dict) -> str:
    proj = str(c["feed_forward_proj"])
    parts = proj.split("-")
    gated = len(parts) == 2 and parts[0] == "gated"
    act = parts[-1]
    if proj == "gated-gelu":
        act = "gelu_new"  # transformers: "gated-gelu" means the tanh approximation
    if (gated, act) not in _FF_IN or len(parts) > 2:
        raise CheckpointError(f"T5 feed_forward_proj={proj!r} is not supported; use one of "
                              f"{', '.join(sorted(set(_FF.values())))}")
    return _FF_IN[(gated, act)]


def config_from_hf(d: dict) -> ModelConfig:
    c = {**_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
    scaled = d.get("scale_decoder_outputs")
    if scaled is None:
        scaled = d.get("tie_word_embeddings", True) is not False
    heads, hidden, d_kv = c["num_heads"], c["d_model"], c["d_kv"]
    seq = int(c.get("n_positions") or IMPORTED_SEQ_LENGTH)
    return ModelConfig(
        family="t5", num_layers=c["num_layers"], num_decoder_layers=c["num_decoder_layers"] or c["num_layers"],
        hidden_size=hidden, ffn_hidden_size=c["d_ff"], num_attention_heads=heads,
        kv_channels=None if d_kv * heads == hidden else d_kv, seq_length=seq,
        position_embedding_type="relative", relative_attention_num_buckets=c["relative_attention_num_buckets"],
        relative_attention_max_distance=c["relative_attention_max_distance"], normalization="RMSNorm",
        layernorm_epsilon=c["layer_norm_epsilon"], activation=_activation(c), add_bias_linear=False,
        share_embeddings_and_output_weights=bool(scaled), hidden_dropout=c["dropout_rate"],
        attention_dropout=c["dropout_rate"], vocab_size=c["vocab_size"],
    )


def token_config(ids) -> dict:
    """T5 decodes from the pad id and stops at eos."""
    pad = ids.get("pad_token_id")
    return {"pad_token_id": pad, "eos_token_id": ids.get("eos_token_id"), "decoder_start_token_id": pad}


T5 = HFTarget("t5", "T5ForConditionalGeneration", T5_TABLE, config_to_hf, config_from_hf, task="seq2seq_lm",
              tied_aliases={"lm_head.weight": "shared.weight"}, token_config=token_config,
              tokenizer_class="T5Tokenizer")


# ---------------------------------------------------------------------------- adapter


def select_target(cfg: ModelConfig) -> HFTarget:
    if cfg.activation not in _FF:
        raise CheckpointError(f"cannot export to T5ForConditionalGeneration: activation {cfg.activation!r} is not "
                              f"one of {', '.join(_FF)}")
    return T5


def context(cfg: ModelConfig) -> MappingContext:
    # T5 attention has no grouped-query variant: as many key/value heads as query heads
    return model_context(cfg, num_kv_heads=cfg.num_attention_heads,
                         flags={"decoder_layers": cfg.num_decoder_layers or cfg.num_layers,
                                "gated": cfg.activation in GATED, "tied": cfg.share_embeddings_and_output_weights})


ADAPTER = FamilyAdapter(family="t5", targets=(T5,), select=select_target, context=context)
