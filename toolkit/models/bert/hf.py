"""Hugging Face adapter of the BERT family: ``BertForPreTraining`` / ``BertForMaskedLM`` (post-LN) and
``MegatronBertForPreTraining`` / ``MegatronBertForMaskedLM`` (pre-LN: Megatron-BERT, GatorTron).

One template table per layout (HF name ↔ our name, ``{}`` = layer index), shared by the two
classes of that layout; the reverse direction is derived from the same table by
:mod:`toolkit.mapping.tables`. Tensors are copied as they are, except:

* Vocabulary rows (word embeddings, the MLM bias): exports cut our padding, imports re-pad with zeros.
* A model without token-type embeddings (``num_tokentypes: 0``) exports a zero
  ``token_type_embeddings`` table of two rows, so HF's default (and sentence-pair) token types add nothing.

Which class: a model with the sentence-pair head (``bert_binary_head: true``) exports to
``*ForPreTraining`` (pooler + ``cls.seq_relationship``); without it, to ``*ForMaskedLM``, which has
neither, so no randomly initialized NSP head pretends to be trained. On import the tensors decide:
``cls.seq_relationship.*`` present → binary head on; absent → off (a pooler without it is unused by
the MLM and is skipped). A headless ``BertModel`` folder gets a fresh MLM head; a fine-tuned
``*ForTokenClassification`` / ``*ForSequenceClassification`` (``classifier.*``) imports as a task
model (:func:`import_target`). Any other checkpoint without ``cls.predictions.*`` is refused.

Legacy Megatron-LM BERT (``language_model.embedding.*``, ``encoder.layers.N.*``, ``pooler``,
``lm_head``, ``binary_head``; see :mod:`toolkit.convert.megatron_legacy`) is one more table.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from toolkit.config import ModelConfig, ffn_size
from toolkit.errors import CheckpointError
from toolkit.mapping.megatron import megatron_layer_rules
from toolkit.mapping.tables import (
    FamilyAdapter,
    HFTarget,
    MappingContext,
    Rule,
    TemplateTable,
    get_transform,
    model_context,
    register_transform,
    require_multi_head_attention,
    rule,
    when_flag,
)

#: rows of the zero token-type table exported for a model without token types
EXPORTED_TOKENTYPES = 2


_binary, _no_binary = when_flag("binary_head"), when_flag("binary_head", negate=True)  # see context()
_types, _no_types = when_flag("tokentypes"), when_flag("tokentypes", negate=True)


# ---------------------------------------------------------------------------- transforms


def _words_and_zero_types_to_hf(ts, ctx: MappingContext):
    (words,) = get_transform("vocab_rows").to_hf(ts, ctx)
    return [words, words.new_zeros((EXPORTED_TOKENTYPES, words.shape[1]))]  # [2, hidden] zeros


def _words_and_zero_types_from_hf(ts, ctx: MappingContext):
    return get_transform("vocab_rows").from_hf(ts[:1], ctx)  # the zero token types carry nothing


register_transform("bert.words_zero_types", _words_and_zero_types_to_hf, _words_and_zero_types_from_hf)


def _fresh_lm_head(ts, ctx: MappingContext):
    """A masked-LM head for a headless encoder (``BertModel``): dense normal(0, std) from seed 0, zero
    biases, unit LayerNorm — as ``init_weights`` would start it."""
    h, std = ctx.hidden_size, float(ctx.flag("init_std") or 0.02)
    weight = torch.randn(h, h, generator=torch.Generator().manual_seed(0)) * std  # [hidden, hidden]
    return [weight, torch.zeros(h), torch.ones(h), torch.zeros(h), torch.zeros(ctx.padded_vocab_size)]


def _no_export(ts, ctx: MappingContext):
    raise ValueError("a fresh head is created on import only")


register_transform("bert.fresh_lm_head", _no_export, _fresh_lm_head)


# ---------------------------------------------------------------------------- tables


def _pair(hf: str, ours: str, when: Callable[[MappingContext], bool] | None = None) -> list:
    """``{hf}.weight/bias`` ↔ ``{ours}.weight/bias`` (a Linear or a LayerNorm)."""
    return [rule(f"{hf}.weight", f"{ours}.weight", when=when), rule(f"{hf}.bias", f"{ours}.bias", when=when)]


def _common_rules() -> list:
    """Rules both layouts share: embeddings (minus LayerNorm), attention/MLP linears, pooler, heads."""
    return [
        *_encoder_rules(),
        *_pair("bert.pooler.dense", "pooler.dense", when=_binary),
        *_pair("cls.predictions.transform.dense", "lm_head.dense"),
        *_pair("cls.predictions.transform.LayerNorm", "lm_head.norm"),
        rule("cls.predictions.bias", "lm_head.bias", "vocab_rows"),
        *_pair("cls.seq_relationship", "binary_head", when=_binary),
    ]


def _encoder_rules() -> list:
    """Embeddings (minus LayerNorm) and the attention/MLP linears of every layer."""
    L, o = "bert.encoder.layer.{}.", "layers.{}."
    return [
        rule("bert.embeddings.word_embeddings.weight", "embed.tokens.weight", "vocab_rows", when=_types),
        rule(["bert.embeddings.word_embeddings.weight", "bert.embeddings.token_type_embeddings.weight"],
             "embed.tokens.weight", "bert.words_zero_types", when=_no_types),
        rule("bert.embeddings.position_embeddings.weight", "embed.positions.weight"),
        rule("bert.embeddings.token_type_embeddings.weight", "embed.tokentypes.weight", when=_types),
        *[rule(f"{L}attention.self.{theirs}.{p}", f"{o}attn.{ours}.{p}")
          for theirs, ours in (("query", "q"), ("key", "k"), ("value", "v")) for p in ("weight", "bias")],
        *_pair(L + "attention.output.dense", o + "attn.out"),
        *_pair(L + "intermediate.dense", o + "mlp.fc1"),
        *_pair(L + "output.dense", o + "mlp.fc2"),
    ]


#: buffers of older checkpoints, the tied decoder's duplicates, a pooler the MLM-only model does not use
_IGNORE = ["bert.embeddings.position_ids", "bert.embeddings.token_type_ids", "cls.predictions.decoder.weight",
           "cls.predictions.decoder.bias", ("bert.pooler.dense.weight", _no_binary),
           ("bert.pooler.dense.bias", _no_binary)]

#: post-LN (original BERT): embedding LayerNorm, each sub-layer's output normalized after the add
_POST_LN_NORMS = (_pair("bert.embeddings.LayerNorm", "embed.norm")
                  + _pair("bert.encoder.layer.{}.attention.output.LayerNorm", "layers.{}.attn_norm")
                  + _pair("bert.encoder.layer.{}.output.LayerNorm", "layers.{}.mlp_norm"))
_PRE_LN_NORMS = (_pair("bert.encoder.layer.{}.attention.ln", "layers.{}.attn_norm")
                 + _pair("bert.encoder.layer.{}.ln", "layers.{}.mlp_norm")
                 + _pair("bert.encoder.ln", "final_norm"))
BERT_TABLE = TemplateTable(_common_rules() + _POST_LN_NORMS, ignore_hf=_IGNORE)

#: pre-LN (Megatron-BERT, GatorTron): each sub-layer's input normalized, one final LayerNorm
MEGATRON_BERT_TABLE = TemplateTable(_common_rules() + _PRE_LN_NORMS, ignore_hf=_IGNORE)


def _headless_table(pre: bool) -> TemplateTable:
    """``BertModel`` / ``MegatronBertModel`` (no ``bert.`` prefix, no heads): the encoder, plus a
    fresh masked-LM head; the pooler is not read (megaforge keeps one only with the pair head)."""
    rules = [Rule(tuple(n.removeprefix("bert.") for n in r.hf), r.ours, r.transform, r.when, r.layers)
             for r in _encoder_rules() + (_PRE_LN_NORMS if pre else _POST_LN_NORMS)]
    head = rule([], ["lm_head.dense.weight", "lm_head.dense.bias", "lm_head.norm.weight", "lm_head.norm.bias",
                     "lm_head.bias"], "bert.fresh_lm_head")
    return TemplateTable(rules + [head], ignore_hf=["embeddings.position_ids", "embeddings.token_type_ids",
                                                    "pooler.dense.weight", "pooler.dense.bias"])


def _task_table(pre: bool, pooler: bool) -> TemplateTable:
    """``*For{Token,Sequence}Classification``: the encoder, the pooler (sequence tasks) and ``classifier``."""
    return TemplateTable(_encoder_rules() + (_PRE_LN_NORMS if pre else _POST_LN_NORMS)
                         + (_pair("bert.pooler.dense", "pooler.dense") if pooler else [])
                         + _pair("classifier", "classifier"),
                         ignore_hf=["bert.embeddings.position_ids", "bert.embeddings.token_type_ids"])

# Legacy Megatron-LM BERT (toolkit.convert.megatron_legacy merges the shards and drops the
# language_model./encoder. prefixes before this table applies).
MEGATRON_TABLE = TemplateTable([
    rule("embedding.word_embeddings.weight", "embed.tokens.weight", "megatron.vocab_rows"),
    rule("embedding.position_embeddings.weight", "embed.positions.weight"),
    rule("embedding.tokentype_embeddings.weight", "embed.tokentypes.weight", when=_types),
    *megatron_layer_rules(),
    *_pair("final_layernorm", "final_norm"),
    *_pair("pooler.dense", "pooler.dense", when=_binary),
    *_pair("lm_head.dense", "lm_head.dense"),
    *_pair("lm_head.layernorm", "lm_head.norm"),
    rule("lm_head.bias", "lm_head.bias", "megatron.vocab_rows"),
    *_pair("binary_head", "binary_head", when=_binary),
])


# ---------------------------------------------------------------------------- configs

_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
_ACT_IN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                 max_position_embeddings=512, type_vocab_size=2, initializer_range=0.02, layer_norm_eps=1e-12,
                 position_embedding_type="absolute", is_decoder=False, add_cross_attention=False,
                 tie_word_embeddings=True)
#: training sequence length given to imported models (their position table may be longer)
MAX_IMPORTED_SEQ_LENGTH = 512


def _config_to_hf(cfg: ModelConfig, model_type: str, architecture: str) -> dict:
    return {
        "architectures": [architecture], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads, "intermediate_size": ffn_size(cfg),
        "hidden_act": _ACT[cfg.activation], "hidden_dropout_prob": cfg.hidden_dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "max_position_embeddings": cfg.max_position_embeddings or cfg.seq_length,
        "type_vocab_size": cfg.num_tokentypes or EXPORTED_TOKENTYPES, "initializer_range": cfg.init_method_std,
        "layer_norm_eps": cfg.layernorm_epsilon, "position_embedding_type": "absolute",
        "tie_word_embeddings": True, "is_decoder": False, "add_cross_attention": False, "use_cache": False,
    }


def _has_binary_head(names: frozenset[str], model_type: str) -> bool:
    if not any(n.startswith("cls.predictions.") for n in names):
        kind = "MegatronBertModel" if model_type == "megatron-bert" else "BertModel"
        raise CheckpointError(f"the checkpoint has no masked-LM head (cls.predictions.*) but bert.* names; megaforge "
                              f"imports *ForPreTraining, *ForMaskedLM, *For{{Token,Sequence}}Classification and headless {kind} "
                              "checkpoints")
    return "cls.seq_relationship.weight" in names


def _config_from_hf(d: dict, *, model_type: str, binary_head: bool) -> ModelConfig:
    c = {**_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
    act = c["hidden_act"]
    if act not in _ACT_IN:
        raise CheckpointError(f"{model_type} hidden_act={act!r} is not supported; use one of {', '.join(_ACT_IN)}")
    if c["position_embedding_type"] != "absolute":
        raise CheckpointError(f"{model_type} position_embedding_type={c['position_embedding_type']!r} is not "
                              "supported (only absolute)")
    if c["is_decoder"] or c["add_cross_attention"]:
        raise CheckpointError(f"{model_type} configs with is_decoder or add_cross_attention are not supported")
    if not c["tie_word_embeddings"]:
        raise CheckpointError(f"{model_type} with tie_word_embeddings=false is not supported (megaforge's BERT "
                              "ties the MLM decoder to the word embeddings)")
    if c["type_vocab_size"] < 1:
        raise CheckpointError(f"{model_type} type_vocab_size={c['type_vocab_size']} is not supported")
    max_pos = c["max_position_embeddings"]
    return ModelConfig(
        family="bert", num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"],
        ffn_hidden_size=c["intermediate_size"], num_attention_heads=c["num_attention_heads"],
        seq_length=min(max_pos, MAX_IMPORTED_SEQ_LENGTH), max_position_embeddings=max_pos,
        position_embedding_type="learned_absolute", normalization="LayerNorm", layernorm_epsilon=c["layer_norm_eps"],
        layernorm_position="pre" if model_type == "megatron-bert" else "post", activation=_ACT_IN[act],
        add_bias_linear=True, share_embeddings_and_output_weights=True, hidden_dropout=c["hidden_dropout_prob"],
        attention_dropout=c["attention_probs_dropout_prob"], init_method_std=c["initializer_range"],
        num_tokentypes=c["type_vocab_size"], bert_binary_head=binary_head, vocab_size=c["vocab_size"],
    )


def _target(model_type: str, architecture: str, table: TemplateTable, binary_head: bool) -> HFTarget:
    return HFTarget(
        model_type, architecture, table,
        config_to_hf=lambda cfg: _config_to_hf(cfg, model_type, architecture),
        config_from_hf=lambda d: _config_from_hf(d, model_type=model_type, binary_head=binary_head),
        config_from_checkpoint=lambda d, names: _config_from_hf(
            d, model_type=model_type, binary_head=_has_binary_head(names, model_type)),
        task="masked_lm",
        token_config=lambda ids: {"pad_token_id": ids.get("pad_token_id"), "bos_token_id": None,
                                  "eos_token_id": None},
        generation=False,
        tokenizer_class="BertTokenizer",
    )


def _task_target(pre: bool, task_type: str) -> HFTarget:
    model_type, name = ("megatron-bert", "MegatronBert") if pre else ("bert", "Bert")
    kind = "TokenClassification" if task_type == "token_classification" else "SequenceClassification"
    target = _target(model_type, f"{name}For{kind}", _task_table(pre, task_type != "token_classification"), False)
    return dataclasses.replace(target, task=task_type, config_from_checkpoint=lambda d, names: _config_from_hf(
        d, model_type=model_type, binary_head=False))


BERT_PRETRAINING = _target("bert", "BertForPreTraining", BERT_TABLE, True)
BERT_MASKED_LM = _target("bert", "BertForMaskedLM", BERT_TABLE, False)
MEGATRON_BERT_PRETRAINING = _target("megatron-bert", "MegatronBertForPreTraining", MEGATRON_BERT_TABLE, True)
MEGATRON_BERT_MASKED_LM = _target("megatron-bert", "MegatronBertForMaskedLM", MEGATRON_BERT_TABLE, False)


# ---------------------------------------------------------------------------- adapter


def select_target(cfg: ModelConfig) -> HFTarget:
    """post-LN → Bert*, pre-LN → MegatronBert*; with the binary head → *ForPreTraining, else *ForMaskedLM."""
    pre = cfg.layernorm_position == "pre"
    name = "MegatronBert" if pre else "Bert"
    if cfg.normalization != "LayerNorm":
        raise CheckpointError(f"cannot export to {name}: it uses LayerNorm (model.normalization={cfg.normalization})")
    if not cfg.add_bias_linear:
        raise CheckpointError(f"cannot export to {name}: it has biases in every linear layer "
                              "(model.add_bias_linear=false)")
    if cfg.activation not in _ACT:
        raise CheckpointError(f"cannot export to {name}: activation {cfg.activation!r} is not one of "
                              f"{', '.join(_ACT)}")
    require_multi_head_attention(cfg, name)
    if pre:
        return MEGATRON_BERT_PRETRAINING if cfg.bert_binary_head else MEGATRON_BERT_MASKED_LM
    return BERT_PRETRAINING if cfg.bert_binary_head else BERT_MASKED_LM


def _headless_target(pre: bool) -> HFTarget:
    model_type, name = ("megatron-bert", "MegatronBertModel") if pre else ("bert", "BertModel")
    target = _target(model_type, name, _headless_table(pre), False)
    return dataclasses.replace(target, task="encoder", config_from_checkpoint=lambda d, names: _config_from_hf(
        d, model_type=model_type, binary_head=False))


HEADLESS = {False: _headless_target(False), True: _headless_target(True)}


def import_target(model_type: str, names: frozenset[str], hf_config: dict) -> HFTarget | None:
    """The target the tensors (and, for a sequence head, ``problem_type``) say a folder holds: a
    headless ``BertModel``/``MegatronBertModel`` (no ``bert.`` prefix, no ``cls.`` heads), the form
    most encoders are published in; a ``*ForTokenClassification`` (``classifier`` on every token, no
    pooler) or ``*ForSequenceClassification`` (pooler + ``classifier``; regression when
    ``problem_type`` says so or it has one output); None for the *ForPreTraining/MaskedLM ones."""
    pre = model_type == "megatron-bert"
    if "classifier.weight" in names:
        if "bert.pooler.dense.weight" not in names:
            return TASK_TARGETS[(pre, "token_classification")]
        regression = hf_config.get("problem_type") == "regression" or (
            hf_config.get("problem_type") is None and len(hf_config.get("id2label") or {}) == 1)
        return TASK_TARGETS[(pre, "regression" if regression else "sequence_classification")]
    if any(n.startswith(("bert.", "cls.")) for n in names):
        return None
    return HEADLESS[pre]


#: (pre-LN, task.type) → the transformers task class a fine-tuned model exports to
TASK_TARGETS = {(pre, t): _task_target(pre, t) for pre in (False, True)
                for t in ("token_classification", "sequence_classification", "regression")}


def select_task_target(cfg: ModelConfig, task) -> HFTarget:
    """A fine-tuned model's target: ``{Bert,MegatronBert}For{Token,Sequence}Classification``."""
    select_target(cfg)  # the same encoder checks
    return TASK_TARGETS[(cfg.layernorm_position == "pre", task.type)]


def context(cfg: ModelConfig) -> MappingContext:
    return model_context(cfg, flags={"binary_head": cfg.bert_binary_head, "tokentypes": cfg.num_tokentypes > 0,
                                     "bias": cfg.add_bias_linear, "norm_bias": cfg.normalization == "LayerNorm",
                                     "gated": False, "init_std": cfg.init_method_std})


ADAPTER = FamilyAdapter(
    family="bert",
    targets=(BERT_PRETRAINING, BERT_MASKED_LM, MEGATRON_BERT_PRETRAINING, MEGATRON_BERT_MASKED_LM),
    select=select_target, context=context, megatron_table=MEGATRON_TABLE, select_task=select_task_target,
    import_target=import_target,
)
