"""T5: an encoder–decoder with a shared token embedding, T5's RMS layer norm, pre-norm blocks,
bucketed relative position bias and no 1/sqrt(d) attention scaling (Raffel et al. 2020).

Two variants are settings of one module:

* **v1.0** (``activation: relu``, ``share_embeddings_and_output_weights: true``): ReLU MLP; logits
  come from the shared embedding, with the decoder output scaled by ``hidden_size ** -0.5`` first.
* **v1.1** (``activation: geglu``, ``share_embeddings_and_output_weights: false``): gated-GELU MLP
  (tanh GELU, HF's ``gelu_new``); a separate ``head`` and no output scaling.

T5 always uses RMSNorm (``model.layernorm_epsilon``, 1e-6 in the recipes), no biases in linears and
relative position bias, whatever ``normalization``, ``add_bias_linear`` and
``position_embedding_type`` say. Dropout sits where Hugging Face puts it: on the embeddings, on
attention probabilities (``attention_dropout``), inside the MLP after the activation, on each
residual branch and after each stack's final norm (``hidden_dropout`` for all but probabilities).

Parameter names (the checkpoint keys) and their Hugging Face ``T5ForConditionalGeneration`` names::

    embed.weight                              shared.weight  (= encoder/decoder.embed_tokens)  [padded_vocab, h]
    {enc}.layers.{i}.attn_norm.weight         encoder.block.{i}.layer.0.layer_norm.weight
    {enc}.layers.{i}.attn.{q,k,v,out}.weight  encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight
    {enc}.layers.0.relative_bias.weight       encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight
    {enc}.layers.{i}.mlp_norm.weight          encoder.block.{i}.layer.1.layer_norm.weight
    {enc}.layers.{i}.mlp.fc1.weight           encoder.block.{i}.layer.1.DenseReluDense.wi.weight   (v1.0)
                                              encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight (v1.1)
    {enc}.layers.{i}.mlp.gate.weight          encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight (v1.1 only)
    {enc}.layers.{i}.mlp.fc2.weight           encoder.block.{i}.layer.1.DenseReluDense.wo.weight
    {enc}.final_norm.weight                   encoder.final_layer_norm.weight
    {dec}.layers.{i}.attn_norm.weight         decoder.block.{i}.layer.0.layer_norm.weight
    {dec}.layers.{i}.attn.{q,k,v,out}.weight  decoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight
    {dec}.layers.0.relative_bias.weight       decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight
    {dec}.layers.{i}.cross_attn_norm.weight   decoder.block.{i}.layer.1.layer_norm.weight
    {dec}.layers.{i}.cross_attn.{q,k,v,out}.weight  decoder.block.{i}.layer.1.EncDecAttention.{q,k,v,o}.weight
    {dec}.layers.{i}.mlp_norm.weight          decoder.block.{i}.layer.2.layer_norm.weight
    {dec}.layers.{i}.mlp.{fc1,gate,fc2}.weight  decoder.block.{i}.layer.2.DenseReluDense.{wi|wi_1, wi_0, wo}.weight
    {dec}.final_norm.weight                   decoder.final_layer_norm.weight
    head.weight                               lm_head.weight                   (v1.1 only; v1.0 ties to shared)

with ``{enc}`` = ``encoder`` and ``{dec}`` = ``decoder``. Exports drop the padded vocabulary rows.
``layers`` are ModuleDicts keyed by layer index, like GPT, so tensor-parallel plans address
``encoder.layers.*.attn.q`` etc. the same way (the bias table is [buckets, heads]: shard dim 1).

Initialization is Hugging Face's ``T5PreTrainedModel._init_weights`` with ``initializer_factor``
1.0 (Mesh TensorFlow's): embeddings and head N(0, 1); ``q`` N(0, (h·d_kv)^-½); ``k``, ``v`` and
the bias table N(0, h^-½); ``out`` N(0, (heads·d_kv)^-½); ``fc1``/``gate`` N(0, h^-½); ``fc2``
N(0, d_ff^-½); norms 1. ``model.init_method_std`` is not used by T5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from toolkit.config import ModelConfig, ffn_size, head_dim
from toolkit.models.common import MLP, Attention, KVCache
from toolkit.models.common.embeddings import model_vocab_sizes, vocab_logits
from toolkit.models.common.init import ONES, ZEROS, ParamInit, init_parameters, normal
from toolkit.models.t5.generation import generate_seq2seq
from toolkit.models.t5.position_bias import RelativePositionBias


@dataclass
class T5Caches:
    """Per-decoder-layer KV caches for incremental decoding: self-attention keys grow by one
    position per step; cross-attention keys are the encoder's, computed on the first step only."""

    self_attn: list[KVCache]
    cross_attn: list[KVCache]


class T5Layer(nn.Module):
    """One pre-norm T5 block: self-attention, cross-attention (decoder only), MLP; each
    ``x + dropout(sublayer(rms_norm(x)))``."""

    def __init__(self, cfg: ModelConfig, *, decoder: bool, has_relative_bias: bool):
        super().__init__()
        h, heads, eps = cfg.hidden_size, cfg.num_attention_heads, cfg.layernorm_epsilon

        def attention() -> Attention:
            return Attention(hidden_size=h, num_heads=heads, num_kv_heads=heads, head_dim=head_dim(cfg), bias=False,
                             dropout=cfg.attention_dropout, softmax_scale=1.0, fused_qkv=cfg.fused_qkv)

        self.attn_norm = nn.RMSNorm(h, eps=eps)
        self.attn = attention()
        self.relative_bias = (RelativePositionBias(num_heads=heads, num_buckets=cfg.relative_attention_num_buckets,
                                                   max_distance=cfg.relative_attention_max_distance,
                                                   bidirectional=not decoder)
                              if has_relative_bias else None)
        self.cross_attn_norm = nn.RMSNorm(h, eps=eps) if decoder else None
        self.cross_attn = attention() if decoder else None
        self.mlp_norm = nn.RMSNorm(h, eps=eps)
        self.mlp = MLP(hidden_size=h, ffn_hidden_size=ffn_size(cfg), activation=cfg.activation, bias=False,
                       dropout=cfg.hidden_dropout)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor, *, self_mask: torch.Tensor, encoder_hidden: torch.Tensor | None = None,
                cross_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                cross_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), attn_mask=self_mask, cache=cache))
        if self.cross_attn is not None:
            x = x + self.dropout(self.cross_attn(self.cross_attn_norm(x), kv_input=encoder_hidden,
                                                 attn_mask=cross_mask, cache=cross_cache))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in: the autocast dtype when autocast is on, else ``x``'s."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def additive_mask(bias: torch.Tensor | None, allowed: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Float mask for SDPA: ``bias`` (broadcastable to [b, h, sq, sk]) where ``allowed`` (bool,
    broadcastable likewise) is True and the dtype's minimum elsewhere (finite, so a fully masked
    row gives a uniform average instead of NaN, as in Hugging Face)."""
    if bias is None and allowed is None:
        return None
    if bias is None:
        bias = torch.zeros((), dtype=dtype, device=allowed.device)
    bias = bias.to(dtype)
    if allowed is None:
        return bias
    shape = torch.broadcast_shapes(bias.shape, allowed.shape)
    return bias.expand(shape).masked_fill(~allowed.expand(shape), torch.finfo(dtype).min)


def _key_padding(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Key padding mask [b, sk] (True = real token) → [b, 1, 1, sk]."""
    return None if mask is None else mask.bool()[:, None, None, :]


class T5Stack(nn.Module):
    """The encoder or the decoder: ``layers`` (ModuleDict by index), then ``final_norm``."""

    def __init__(self, cfg: ModelConfig, num_layers: int, *, decoder: bool):
        super().__init__()
        self.decoder = decoder
        self.layers = nn.ModuleDict({str(i): T5Layer(cfg, decoder=decoder, has_relative_bias=i == 0)
                                     for i in range(num_layers)})
        self.final_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def position_bias(self, query_length: int, key_length: int, query_offset: int = 0) -> torch.Tensor:
        """The stack's shared relative position bias [1, heads, sq, sk] (from its first layer)."""
        return self.layers["0"].relative_bias(query_length, key_length, query_offset=query_offset)

    def forward(
        self,
        h: torch.Tensor,  # [b, s, hidden] token embeddings
        *,
        padding_mask: torch.Tensor | None = None,  # [b, s_keys] bool, True = real token (self-attention keys)
        encoder_hidden: torch.Tensor | None = None,  # [b, s_enc, hidden] (decoder)
        encoder_padding_mask: torch.Tensor | None = None,  # [b, s_enc] bool (decoder cross-attention)
        start_pos: int = 0,
        caches: T5Caches | None = None,
    ) -> torch.Tensor:
        sq = h.shape[1]
        sk = start_pos + sq
        dtype = _compute_dtype(h)
        bias = self.position_bias(sq, sk, start_pos)  # [1, heads, sq, sk]
        allowed = _key_padding(padding_mask)  # [b, 1, 1, sk] or None
        if self.decoder:
            q_pos = torch.arange(start_pos, sk, device=h.device)[:, None]  # [sq, 1]
            causal = torch.arange(sk, device=h.device)[None, :] <= q_pos  # [sq, sk]
            allowed = causal if allowed is None else allowed & causal
        self_mask = additive_mask(bias, allowed, dtype)  # [b or 1, heads, sq, sk]
        cross_mask = additive_mask(None, _key_padding(encoder_padding_mask), dtype) if self.decoder else None
        h = self.dropout(h)
        for i, layer in enumerate(self.layers.values()):
            h = layer(h, self_mask=self_mask, encoder_hidden=encoder_hidden, cross_mask=cross_mask,
                      cache=caches.self_attn[i] if caches is not None else None,
                      cross_cache=caches.cross_attn[i] if caches is not None else None)
        return self.dropout(self.final_norm(h))


class T5Model(nn.Module):
    """Encoder–decoder LM. ``forward(encoder_tokens, decoder_input_tokens, …)`` → logits
    ``[b, s_dec, padded_vocab]`` with padded vocabulary columns at -inf."""

    is_encoder_decoder = True

    def __init__(self, cfg: ModelConfig, *, tensor_parallel_size: int = 1):
        super().__init__()
        self.cfg = cfg
        self.vocab_size, self.padded_vocab_size = model_vocab_sizes(cfg, tensor_parallel_size)
        self.num_decoder_layers = cfg.num_decoder_layers or cfg.num_layers
        self.embed = nn.Embedding(self.padded_vocab_size, cfg.hidden_size)
        self.encoder = T5Stack(cfg, cfg.num_layers, decoder=False)
        self.decoder = T5Stack(cfg, self.num_decoder_layers, decoder=True)
        self.tied = cfg.share_embeddings_and_output_weights
        self.head: nn.Linear | None = (None if self.tied
                                       else nn.Linear(cfg.hidden_size, self.padded_vocab_size, bias=False))

    def generate_seq2seq(self, encoder_tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        """Decode new ids [b, n] for ``encoder_tokens`` [b, s_enc]: :func:`~toolkit.models.t5.generation.generate_seq2seq`."""
        return generate_seq2seq(self, encoder_tokens, **kwargs)

    # ---- initialization ------------------------------------------------------------------
    def init_rules(self) -> dict:
        """Hugging Face T5 init (factor 1.0), per parameter name (``toolkit.models.common.init``);
        computed on the ``meta`` model."""
        h, d_ff = self.cfg.hidden_size, ffn_size(self.cfg)
        inner = self.cfg.num_attention_heads * head_dim(self.cfg)
        stds = {"q": (h * head_dim(self.cfg)) ** -0.5, "k": h ** -0.5, "v": h ** -0.5, "out": inner ** -0.5,
                "fc1": h ** -0.5, "gate": h ** -0.5, "fc2": d_ff ** -0.5}
        rules: dict[str, ParamInit] = {}
        for name, module in self.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, nn.RMSNorm):
                rules[f"{name}.weight"] = ONES
            elif isinstance(module, RelativePositionBias):
                rules[f"{name}.weight"] = normal(h ** -0.5)
            elif isinstance(module, nn.Embedding) or (isinstance(module, nn.Linear) and leaf == "head"):
                rules[f"{name}.weight"] = normal(1.0)
            elif isinstance(module, nn.Linear) and leaf in stds:  # LoRA's lora_A/lora_B: their own rules (build)
                rules[f"{name}.weight"] = normal(stds[leaf])
            if isinstance(module, nn.Linear) and module.bias is not None:
                rules[f"{name}.bias"] = ZEROS
        return rules

    def init_weights(self, seed: int = 0) -> None:
        """Initialize the materialized model from ``seed`` (each parameter keyed by its name, so any
        parallel layout starts identical)."""
        init_parameters(self, self.init_rules(), seed)

    # ---- forward -------------------------------------------------------------------------
    def encode(self, encoder_tokens: torch.Tensor, encoder_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder hidden states [b, s_enc, hidden] of ``encoder_tokens`` [b, s_enc]."""
        return self.encoder(self.embed(encoder_tokens), padding_mask=encoder_padding_mask)

    def decode(self, decoder_input_tokens: torch.Tensor, encoder_hidden: torch.Tensor,
               encoder_padding_mask: torch.Tensor | None = None, decoder_padding_mask: torch.Tensor | None = None,
               *, start_pos: int = 0, caches: T5Caches | None = None) -> torch.Tensor:
        """Logits [b, s_dec, padded_vocab] for decoder inputs at positions ``start_pos …``.

        With ``caches`` (from :meth:`new_caches`), call with the whole prefix first, then one or
        more new tokens at a time with ``start_pos`` = tokens already decoded; the encoder's keys
        are computed once and reused. ``decoder_padding_mask`` [b, start_pos + s_dec] covers every
        key position (cached ones included).
        """
        h = self.decoder(self.embed(decoder_input_tokens), padding_mask=decoder_padding_mask,
                         encoder_hidden=encoder_hidden, encoder_padding_mask=encoder_padding_mask,
                         start_pos=start_pos, caches=caches)
        if self.tied:
            h = h * self.cfg.hidden_size ** -0.5  # v1.0: rescale before the tied projection (Mesh TF)
        return vocab_logits(h, self.output_weight(), self.vocab_size)  # [b, s_dec, padded_vocab]

    def forward(self, encoder_tokens: torch.Tensor, decoder_input_tokens: torch.Tensor,
                encoder_padding_mask: torch.Tensor | None = None,
                decoder_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [b, s_dec, padded_vocab]. Padding masks are bool [b, s] with True = real token
        (Hugging Face's ``attention_mask`` convention); None means no padding."""
        encoder_hidden = self.encode(encoder_tokens, encoder_padding_mask)
        return self.decode(decoder_input_tokens, encoder_hidden, encoder_padding_mask, decoder_padding_mask)

    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.tied else self.head.weight

    # ---- generation and bookkeeping -------------------------------------------------------
    def new_caches(self, batch: int, max_len: int, encoder_length: int, *, device, dtype) -> T5Caches:
        """Empty caches for decoding up to ``max_len`` decoder positions against ``encoder_length`` keys."""
        heads, d = self.cfg.num_attention_heads, head_dim(self.cfg)
        n = self.num_decoder_layers
        return T5Caches(
            self_attn=[KVCache.empty(batch, heads, max_len, d, device=device, dtype=dtype) for _ in range(n)],
            cross_attn=[KVCache.empty(batch, heads, encoder_length, d, device=device, dtype=dtype) for _ in range(n)],
        )

    def data_parallel_units(self) -> list[nn.Module]:
        """Modules FSDP must shard as units of their own, besides the transformer layers: each
        stack's relative position bias is called by the stack, outside its first layer's forward."""
        return [s.layers["0"].relative_bias for s in (self.encoder, self.decoder) if len(s.layers)]

    def num_parameters(self, *, exclude_positions: bool = False) -> int:
        """Parameter count (the shared embedding once). ``exclude_positions`` drops the relative
        position bias tables (T5 has no absolute position table)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_positions:
            n -= sum(s.layers["0"].relative_bias.weight.numel() for s in (self.encoder, self.decoder) if len(s.layers))
        return n

