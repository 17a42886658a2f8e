"""GPT: a causal decoder. GPT-2 style (learned positions, LayerNorm, GELU, biases, tied head) and
Llama style (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, untied head) are both
settings of one module.

Parameter names (the checkpoint keys, whatever the parallel layout)::

    embed.tokens.weight                [padded_vocab, hidden]
    embed.positions.weight             [max_positions, hidden]     (learned_absolute only)
    layers.{i}.attn_norm.{weight,bias}
    layers.{i}.attn.{q,k,v,out}.{weight,bias}
    layers.{i}.mlp_norm.{weight,bias}
    layers.{i}.mlp.{fc1,gate,fc2}.{weight,bias}                    (gate for swiglu/geglu)
    final_norm.{weight,bias}
    head.weight                        [padded_vocab, hidden]      (untied only)

``layers`` is a ModuleDict keyed by the global layer index, so a pipeline stage that keeps only
some layers (and drops ``embed`` or ``head``/``final_norm``) keeps the same names.
"""

from __future__ import annotations

import torch
from torch import nn

from toolkit.config import ModelConfig, head_dim
from toolkit.models.common import KVCache, RotaryEmbedding, TransformerLayer, build_norm
from toolkit.models.common.embeddings import model_vocab_sizes, vocab_logits
from toolkit.models.common.fused_loss import linear_cross_entropy
from toolkit.models.common.init import init_parameters, megatron_init_rules
from toolkit.models.common.loss import lm_cross_entropy


class GPTEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig, padded_vocab: int):
        super().__init__()
        self.tokens = nn.Embedding(padded_vocab, cfg.hidden_size)
        learned = cfg.position_embedding_type == "learned_absolute"
        max_pos = cfg.max_position_embeddings or cfg.seq_length
        self.positions = nn.Embedding(max_pos, cfg.hidden_size) if learned else None
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.tokens(tokens)  # [b, s, hidden]
        if self.positions is not None:
            h = h + self.positions(positions)
        return self.dropout(h)


class GPTModel(nn.Module):
    def __init__(self, cfg: ModelConfig, *, tensor_parallel_size: int = 1):
        super().__init__()
        self.cfg = cfg
        self.vocab_size, self.padded_vocab_size = model_vocab_sizes(cfg, tensor_parallel_size)
        self.embed: GPTEmbedding | None = GPTEmbedding(cfg, self.padded_vocab_size)
        max_pos = cfg.max_position_embeddings or cfg.seq_length
        self.rotary = (RotaryEmbedding(head_dim=head_dim(cfg), max_seq=max_pos, base=cfg.rotary_base)
                       if cfg.position_embedding_type == "rope" else None)
        self.layers = nn.ModuleDict({str(i): TransformerLayer(cfg) for i in range(cfg.num_layers)})
        self.final_norm: nn.Module | None = build_norm(cfg.normalization, cfg.hidden_size, cfg.layernorm_epsilon)
        self.tied = cfg.share_embeddings_and_output_weights
        self.head: nn.Linear | None = (None if self.tied
                                       else nn.Linear(cfg.hidden_size, self.padded_vocab_size, bias=False))
        # a later pipeline stage receives hidden states holding 1/sequence_shards of the sequence
        # (sequence parallelism; set by the tensor-parallel plan) — RoPE needs the full length
        self.sequence_shards = 1
        # a pipeline's last stage with model.fused_cross_entropy returns its final hidden states and the
        # pipeline's loss applies the output layer fused with the loss (:meth:`loss`; set by the trainer's set-up)
        self.hidden_output = False

    def init_rules(self) -> dict:
        """Megatron init, per parameter name (``toolkit.models.common.init``): N(0, init_method_std),
        std/sqrt(2L) for residual outputs, zero biases, unit norms. Computed on the ``meta`` model."""
        return megatron_init_rules(self, std=self.cfg.init_method_std, num_layers=self.cfg.num_layers)

    def init_weights(self, seed: int = 0) -> None:
        """Initialize the materialized model from ``seed`` (each parameter keyed by its name, so any
        parallel layout starts identical); recomputes non-persistent buffers."""
        init_parameters(self, self.init_rules(), seed)

    @property
    def fuses_loss(self) -> bool:
        """``model.fused_cross_entropy``: the objectives pass ``labels`` to :meth:`forward` for the loss."""
        return self.cfg.fused_cross_entropy

    def output_weight(self) -> torch.Tensor:
        return self.embed.tokens.weight if self.tied else self.head.weight

    def forward(
        self,
        tokens: torch.Tensor,  # [b, s] token ids, or [b, s, hidden] hidden states on a later pipeline stage
        *,
        start_pos: int = 0,
        caches: list[KVCache] | None = None,
        positions: torch.Tensor | None = None,  # [b, s] per-token positions (packed samples restart at 0)
        segments: torch.Tensor | None = None,  # [b, s] sample id per token: attention stays inside a sample
        attn_mask: torch.Tensor | None = None,  # [b, 1, s, past + s] bool, True = attend: replaces the causal
                                                #   mask (left-padded batched generation with caches)
        labels: torch.Tensor | None = None,  # [b, s] target ids (-100 ignored): return the mean loss instead
    ) -> torch.Tensor:
        """Logits ``[b, s, padded_vocab]`` (padded columns are -inf), or hidden states on a non-final stage;
        with ``labels``, the mean token cross-entropy against them (:meth:`loss`).

        With ``segments`` (packed sequences) a token attends only to earlier tokens of its own sample,
        and ``positions`` restart per sample, so each sample sees exactly what it would alone."""
        hidden_in = tokens.is_floating_point()  # hidden states from the previous pipeline stage
        s = tokens.shape[1] * (self.sequence_shards if hidden_in else 1)
        if positions is None:
            positions = torch.arange(start_pos, start_pos + s, device=tokens.device)
        mask = None
        if segments is not None:
            causal = torch.ones(s, s, dtype=torch.bool, device=tokens.device).tril()  # [s, s]
            mask = (segments[:, :, None] == segments[:, None, :]) & causal  # [b, s, s]
            mask = mask[:, None]  # [b, 1, s, s], broadcast over heads
        if attn_mask is not None:
            mask = attn_mask
        # (a last pipeline stage may hold the word embedding only as its tied output weight)
        h = tokens if hidden_in or self.embed is None else self.embed(tokens, positions)
        rope = self.rotary(positions) if self.rotary is not None else None
        for i, layer in enumerate(self.layers.values()):
            h = layer(h, attn_mask=mask, is_causal=mask is None, rope=rope,
                      cache=caches[i] if caches is not None else None)
        if self.final_norm is None:
            return h
        h = self.final_norm(h)
        if labels is not None:
            return self.loss(h, labels)
        if self.hidden_output and caches is None:  # (generation, with KV caches, samples from logits)
            return h  # [b, s, hidden], to the pipeline's loss (fused output layer + cross-entropy)
        return vocab_logits(h, self.output_weight(), self.vocab_size)  # [b, s, padded_vocab]

    def loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the output layer on final hidden states ``h`` [b, s, hidden] against
        ``labels`` [b, s]: fused over token chunks with ``model.fused_cross_entropy`` (not under tensor
        parallelism, whose vocab-parallel logits go through ``loss_parallel``), else through the logits."""
        weight = self.output_weight()
        if self.cfg.fused_cross_entropy and not hasattr(weight, "device_mesh"):
            return linear_cross_entropy(h, weight, labels, self.vocab_size)
        return lm_cross_entropy(vocab_logits(h, weight, self.vocab_size), labels)

    def new_caches(self, batch: int, max_len: int, *, device, dtype) -> list[KVCache]:
        kv = self.cfg.num_query_groups or self.cfg.num_attention_heads
        return [KVCache.empty(batch, kv, max_len, head_dim(self.cfg), device=device, dtype=dtype)
                for _ in self.layers]

    def num_parameters(self, *, exclude_positions: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_positions and self.embed is not None and self.embed.positions is not None:
            n -= self.embed.positions.weight.numel()
        return n
