"""One transformer layer (self-attention + MLP), pre-LN or post-LN, for decoders and encoders."""

from __future__ import annotations

import torch
from torch import nn

from toolkit.config import ModelConfig, ffn_size, head_dim
from toolkit.models.common.attention import Attention, KVCache
from toolkit.models.common.mlp import MLP
from toolkit.models.common.norms import build_norm


class TransformerLayer(nn.Module):
    """``layernorm_position="pre"``: x + attn(norm(x)), then x + mlp(norm(x)) (GPT, Megatron-BERT).
    ``"post"``: norm(x + attn(x)), then norm(x + mlp(x)) (original BERT)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_norm = cfg.layernorm_position == "pre"
        self.attn_norm = build_norm(cfg.normalization, cfg.hidden_size, cfg.layernorm_epsilon)
        self.attn = Attention(
            hidden_size=cfg.hidden_size,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_query_groups or cfg.num_attention_heads,
            head_dim=head_dim(cfg),
            bias=cfg.add_bias_linear,
            dropout=cfg.attention_dropout,
            fused_qkv=cfg.fused_qkv,
        )
        self.mlp_norm = build_norm(cfg.normalization, cfg.hidden_size, cfg.layernorm_epsilon)
        self.mlp = MLP(hidden_size=cfg.hidden_size, ffn_hidden_size=ffn_size(cfg), activation=cfg.activation,
                       bias=cfg.add_bias_linear)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor, *, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None, cache: KVCache | None = None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.dropout(self.attn(self.attn_norm(x), attn_mask=attn_mask, is_causal=is_causal,
                                           rope=rope, cache=cache))
            return x + self.dropout(self.mlp(self.mlp_norm(x)))
        x = self.attn_norm(x + self.dropout(self.attn(x, attn_mask=attn_mask, is_causal=is_causal, rope=rope,
                                                      cache=cache)))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))
