"""BERT: a bidirectional encoder with masked-LM and sentence-pair heads.

Two layouts are settings of one module (``ModelConfig.layernorm_position``):

* ``"post"`` — original BERT (Devlin et al. 2019; HF ``BertForPreTraining``): LayerNorm on the
  embeddings, each sub-layer's output normalized after the residual add, no final norm.
* ``"pre"`` — Megatron-BERT / GatorTron (HF ``MegatronBertForPreTraining``): no embedding norm,
  each sub-layer's input normalized, one final LayerNorm after the last layer.

Parameter names (the checkpoint keys, whatever the parallel layout), with the Hugging Face name of
the same tensor (``BertForPreTraining`` / ``MegatronBertForPreTraining``; ``L = encoder.layer.{i}``)::

    embed.tokens.weight        [padded_vocab, h]  bert.embeddings.word_embeddings.weight (pad rows cut)
    embed.positions.weight     [max_pos, h]       bert.embeddings.position_embeddings.weight
    embed.tokentypes.weight    [types, h]         bert.embeddings.token_type_embeddings.weight (types > 0)
    embed.norm.{weight,bias}                      bert.embeddings.LayerNorm.*              (post-LN only)
    layers.{i}.attn.q.{weight,bias}               bert.L.attention.self.query.*
    layers.{i}.attn.k.{weight,bias}               bert.L.attention.self.key.*
    layers.{i}.attn.v.{weight,bias}               bert.L.attention.self.value.*
    layers.{i}.attn.out.{weight,bias}             bert.L.attention.output.dense.*
    layers.{i}.attn_norm.{weight,bias}            post: bert.L.attention.output.LayerNorm.*
                                                  pre:  bert.L.attention.ln.*
    layers.{i}.mlp.fc1.{weight,bias}              bert.L.intermediate.dense.*
    layers.{i}.mlp.fc2.{weight,bias}              bert.L.output.dense.*
    layers.{i}.mlp_norm.{weight,bias}             post: bert.L.output.LayerNorm.*
                                                  pre:  bert.L.ln.*
    final_norm.{weight,bias}                      bert.encoder.ln.*                        (pre-LN only)
    pooler.dense.{weight,bias}                    bert.pooler.dense.*                      (binary head only)
    lm_head.dense.{weight,bias}                   cls.predictions.transform.dense.*
    lm_head.norm.{weight,bias}                    cls.predictions.transform.LayerNorm.*
    lm_head.bias               [padded_vocab]     cls.predictions.bias (= cls.predictions.decoder.bias)
    binary_head.{weight,bias}  [2, h]             cls.seq_relationship.*                   (binary head only)

The MLM output projection is tied to ``embed.tokens.weight`` (HF ``cls.predictions.decoder.weight``).
``layers`` is a ModuleDict keyed by the global layer index, so a pipeline stage that keeps only
some layers keeps the same names; ``q/k/v/out`` and ``fc1/fc2`` are the same linears GPT uses and
are sharded the same way (``toolkit/models/bert/parallelize.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.config import ModelConfig
from toolkit.models.common import TransformerLayer, build_norm
from toolkit.models.common.embeddings import mask_padded_vocab, model_vocab_sizes
from toolkit.models.common.init import ZEROS, init_parameters, megatron_init_rules
from toolkit.models.common.mlp import ACTIVATIONS, GATED


class BertEmbedding(nn.Module):
    """Word + learned position + token-type embeddings; LayerNorm in post-LN mode; dropout."""

    def __init__(self, cfg: ModelConfig, padded_vocab: int):
        super().__init__()
        self.tokens = nn.Embedding(padded_vocab, cfg.hidden_size)
        self.positions = nn.Embedding(cfg.max_position_embeddings or cfg.seq_length, cfg.hidden_size)
        self.tokentypes = nn.Embedding(cfg.num_tokentypes, cfg.hidden_size) if cfg.num_tokentypes > 0 else None
        self.norm = (build_norm(cfg.normalization, cfg.hidden_size, cfg.layernorm_epsilon)
                     if cfg.layernorm_position == "post" else None)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, tokens: torch.Tensor, token_types: torch.Tensor | None) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)  # [s]
        h = self.tokens(tokens) + self.positions(positions)  # [b, s, hidden]
        if self.tokentypes is not None:
            if token_types is None:
                token_types = torch.zeros_like(tokens)
            h = h + self.tokentypes(token_types)
        if self.norm is not None:
            h = self.norm(h)
        return self.dropout(h)


class BertPooler(nn.Module):
    """``tanh(dense(h[:, 0]))``: the [CLS] representation fed to the sentence-pair head."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(h[:, 0]))  # [b, hidden]


class BertLMHead(nn.Module):
    """``norm(act(dense(h))) @ W_emb^T + bias``; the projection weight is passed in (tied)."""

    def __init__(self, cfg: ModelConfig, padded_vocab: int):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.activation]
        self.norm = build_norm(cfg.normalization, cfg.hidden_size, cfg.layernorm_epsilon)
        self.bias = nn.Parameter(torch.empty(padded_vocab))

    def forward(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.act(self.dense(h)))
        return F.linear(h, weight, self.bias)  # [b, s, padded_vocab]


class BertModel(nn.Module):
    def __init__(self, cfg: ModelConfig, *, tensor_parallel_size: int = 1):
        super().__init__()
        if cfg.position_embedding_type != "learned_absolute":
            raise ValueError(f"BERT uses learned absolute positions, not {cfg.position_embedding_type!r}")
        if cfg.activation in GATED:
            raise ValueError(f"BERT uses a plain MLP; activation {cfg.activation!r} is gated")
        self.cfg = cfg
        self.vocab_size, self.padded_vocab_size = model_vocab_sizes(cfg, tensor_parallel_size)
        self.embed: BertEmbedding | None = BertEmbedding(cfg, self.padded_vocab_size)
        self.layers = nn.ModuleDict({str(i): TransformerLayer(cfg) for i in range(cfg.num_layers)})
        self.final_norm: nn.Module | None = (build_norm(cfg.normalization, cfg.hidden_size, cfg.layernorm_epsilon)
                                             if cfg.layernorm_position == "pre" else None)
        self.pooler: BertPooler | None = BertPooler(cfg.hidden_size) if cfg.bert_binary_head else None
        self.lm_head: BertLMHead | None = BertLMHead(cfg, self.padded_vocab_size)
        self.binary_head: nn.Linear | None = nn.Linear(cfg.hidden_size, 2) if cfg.bert_binary_head else None
        # set on a pipeline stage (``pipeline_split_bert``): forward returns tensors, not the dict —
        # hidden states [b, s, hidden] before the last stage, ``(mlm_logits, [binary_logits])`` on it
        self.pipeline_stage = False

    def init_rules(self) -> dict:
        """Megatron init, per parameter name (``toolkit.models.common.init``): N(0, init_method_std)
        for linears and embeddings, std/sqrt(2L) for residual outputs, zero biases (the MLM bias
        too), unit norms. Computed on the ``meta`` model."""
        rules = megatron_init_rules(self, std=self.cfg.init_method_std, num_layers=self.cfg.num_layers)
        if self.lm_head is not None:
            rules["lm_head.bias"] = ZEROS
        return rules

    def init_weights(self, seed: int = 0) -> None:
        """Initialize the materialized model from ``seed`` (each parameter keyed by its name, so any
        parallel layout starts identical)."""
        init_parameters(self, self.init_rules(), seed)

    def output_weight(self) -> torch.Tensor:
        """The MLM projection weight: the word embeddings (tied)."""
        return self.embed.tokens.weight

    @staticmethod
    def attention_mask(padding_mask: torch.Tensor | None) -> torch.Tensor | None:
        """``padding_mask`` [b, s] (1/True = real token) → bool attention mask [b, 1, 1, s] (True = attend)."""
        if padding_mask is None:
            return None
        return padding_mask.bool()[:, None, None, :]  # [b, 1, 1, s]

    def encode(self, tokens: torch.Tensor, token_types: torch.Tensor | None = None,
               padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [b, s, hidden] (after the final norm in pre-LN mode); on a pipeline stage
        the hidden states after its layers (``tokens`` are then hidden states on a later stage)."""
        # (a last pipeline stage may hold the word embedding only as its tied MLM projection)
        h = tokens if tokens.is_floating_point() or self.embed is None else self.embed(tokens, token_types)
        mask = self.attention_mask(padding_mask)
        for layer in self.layers.values():
            h = layer(h, attn_mask=mask)
        return self.final_norm(h) if self.final_norm is not None else h

    def forward(
        self,
        tokens: torch.Tensor,  # [b, s] token ids, or [b, s, hidden] hidden states on a later pipeline stage
        token_types: torch.Tensor | None = None,  # [b, s] segment ids (0 = A, 1 = B); None → all 0
        padding_mask: torch.Tensor | None = None,  # [b, s] 1/True = real token, 0 = padding; None → no padding
    ) -> dict[str, torch.Tensor | None] | torch.Tensor | tuple[torch.Tensor, ...]:
        """``{"mlm_logits": [b, s, padded_vocab] (padded columns -inf), "binary_logits": [b, 2] or None,
        "hidden": [b, s, hidden]}``; on a pipeline stage, see ``pipeline_stage``."""
        h = self.encode(tokens, token_types, padding_mask)
        if self.pipeline_stage and self.lm_head is None:
            return h  # to the next stage
        out: dict[str, torch.Tensor | None] = {"hidden": h, "mlm_logits": None, "binary_logits": None}
        if self.lm_head is not None:
            out["mlm_logits"] = self.mask_padded_vocab(self.lm_head(h, self.output_weight()))
        if self.binary_head is not None and self.pooler is not None:
            out["binary_logits"] = self.binary_head(self.pooler(h))  # [b, 2]
        if self.pipeline_stage:  # the last stage: tensors only, for the pipeline's loss function
            return tuple(out[k] for k in ("mlm_logits", "binary_logits") if out[k] is not None)
        return out

    def mask_padded_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Set the logits of padding ids to -inf so no loss or prediction ever sees them."""
        return mask_padded_vocab(logits, self.vocab_size)

    def num_parameters(self, *, exclude_positions: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_positions and self.embed is not None:
            n -= self.embed.positions.weight.numel()
        return n
