"""Megatron-LM's saved ``args`` → a megaforge :class:`~toolkit.config.ModelConfig`: whichever spelling a
Megatron-LM version wrote (``norm_epsilon`` / ``layernorm_epsilon``, ``seq_length`` /
``encoder_seq_length``, …), with what megaforge cannot hold (mixture of experts, partial rotary, …)
refused naming the argument. Used by the legacy Megatron-LM import and, through the args it builds
from a NeMo config, by the NeMo import.
"""

from __future__ import annotations

from typing import Any

from toolkit.config import ModelConfig
from toolkit.errors import CheckpointError


def read_arg(args: Any, *names: str, default: Any = None) -> Any:
    """The first of ``names`` that ``args`` sets (not None): Megatron renamed several over time."""
    for n in names:
        v = args.get(n) if isinstance(args, dict) else getattr(args, n, None)
        if v is not None:
            return v
    return default


def _required(args: Any, *names: str) -> int:
    v = read_arg(args, *names)
    if v is None:
        spelled = " or ".join(repr(n) for n in names)
        raise CheckpointError(f"the checkpoint's args have no {spelled}; megaforge needs it to know the model shape")
    try:
        return int(v)
    except (TypeError, ValueError):
        raise CheckpointError(f"the checkpoint's args.{names[0]} is {v!r}, not a number") from None


#: (argument spellings, value that megaforge cannot import, what it is)
_UNSUPPORTED_ARGS: list[tuple[tuple[str, ...], Any, str]] = [
    (("apply_residual_connection_post_layernorm", "apply_residual_connection_post_norm"), True,
     "post-LN residuals"),
    (("apply_layernorm_1p",), True, "LayerNorm 1p (zero-centred gamma)"),
    (("squared_relu",), True, "squared ReLU"),
    (("rotary_interleaved",), True, "interleaved rotary embeddings"),
    (("qk_layernorm",), True, "QK normalization"),
    (("multi_latent_attention",), True, "multi-latent attention"),
    (("use_rope_scaling",), True, "RoPE frequency scaling"),
    (("moe_grouped_gemm",), True, "mixture of experts"),
]


def _check_supported(args: Any) -> None:
    for names, bad, what in _UNSUPPORTED_ARGS:
        for n in names:
            if read_arg(args, n) == bad:
                raise CheckpointError(f"Megatron models with {n}={bad} ({what}) are not supported")
    experts = read_arg(args, "num_experts")
    if experts not in (None, 0, 1):
        raise CheckpointError(f"Megatron models with num_experts={experts} (mixture of experts) are not supported")
    percent = float(read_arg(args, "rotary_percent", default=1.0))
    if percent != 1.0:
        raise CheckpointError(f"Megatron models with rotary_percent={percent:g} (partial rotary) are not supported")
    factor = read_arg(args, "rotary_seq_len_interpolation_factor")
    if factor not in (None, 1, 1.0):
        raise CheckpointError(f"Megatron models with rotary_seq_len_interpolation_factor={factor} are not supported")
    pos = read_arg(args, "position_embedding_type", default="learned_absolute")
    if pos not in ("learned_absolute", "rope"):
        raise CheckpointError(f"Megatron models with position_embedding_type={pos!r} are not supported "
                              "(learned_absolute and rope are)")
    if read_arg(args, "add_position_embedding") is False and pos != "rope" \
            and not read_arg(args, "use_rotary_position_embeddings", default=False):
        raise CheckpointError("Megatron models with add_position_embedding=False and no rotary embeddings "
                              "(no positions at all) are not supported")
    norm = read_arg(args, "normalization", default="LayerNorm")
    if norm not in ("LayerNorm", "RMSNorm"):
        raise CheckpointError(f"Megatron models with normalization={norm!r} are not supported (LayerNorm and "
                              "RMSNorm are)")


def config_from_args(args: Any, vocab_size: int, *, family: str = "gpt", num_tokentypes: int = 0,
                     binary_head: bool = False) -> ModelConfig:
    """Megatron-LM ``args`` (argparse Namespace, or a dict) → our :class:`ModelConfig` of ``family``
    (gpt | bert; for BERT the tensors say how many token types there are and whether the
    sentence-pair head is there). Every spelling a Megatron-LM version wrote is read
    (``norm_epsilon`` / ``layernorm_epsilon``, ``seq_length`` / ``encoder_seq_length``, …); features
    megaforge does not have are refused, naming the argument."""
    if args is None:
        raise CheckpointError("the checkpoint has no 'args'; megaforge needs them to know the model shape")
    _check_supported(args)
    hidden, heads = _required(args, "hidden_size"), _required(args, "num_attention_heads")
    num_layers = _required(args, "num_layers", "encoder_num_layers")
    bias = bool(read_arg(args, "add_bias_linear", default=True))
    if read_arg(args, "add_qkv_bias", default=False) and not bias:  # megatron-core: QKV bias = either flag
        raise CheckpointError("Megatron models with add_qkv_bias=True but add_bias_linear=False (a bias on the "
                              "QKV projection only) are not supported")
    swiglu = bool(read_arg(args, "swiglu", default=False))
    if swiglu:
        activation = "swiglu"
    elif read_arg(args, "openai_gelu", default=False) or (bias and read_arg(args, "bias_gelu_fusion", default=False)):
        activation = "gelu_tanh"  # Megatron's fused bias-GELU is the tanh approximation
    else:
        activation = "gelu"
    rope = (read_arg(args, "position_embedding_type", default="learned_absolute") == "rope"
            or bool(read_arg(args, "use_rotary_position_embeddings", default=False)))
    kv = int(read_arg(args, "kv_channels", default=hidden // heads))
    groups = None
    if read_arg(args, "group_query_attention", default=False):
        groups = _required(args, "num_query_groups")
        if heads % groups:
            raise CheckpointError(f"args.num_attention_heads={heads} is not a multiple of "
                                  f"args.num_query_groups={groups}")
    seq = _required(args, "seq_length", "encoder_seq_length", "max_position_embeddings")
    untied = bool(read_arg(args, "untie_embeddings_and_output_weights", default=False))
    extra: dict[str, Any] = {}
    if family == "bert":
        if rope or swiglu:
            raise CheckpointError("Megatron BERT checkpoints with rotary positions or SwiGLU are not supported")
        if untied:
            raise CheckpointError("Megatron BERT checkpoints with untie_embeddings_and_output_weights=True (an "
                                  "MLM decoder apart from the word embeddings) are not supported")
        # Megatron-BERT is pre-LN with a final LayerNorm; its MLM head is tied to the word embeddings
        extra = dict(layernorm_position="pre", num_tokentypes=num_tokentypes, bert_binary_head=binary_head)
    return ModelConfig(
        family=family, num_layers=num_layers, hidden_size=hidden,
        ffn_hidden_size=int(read_arg(args, "ffn_hidden_size", default=4 * hidden)), num_attention_heads=heads,
        num_query_groups=groups, kv_channels=None if kv * heads == hidden else kv, seq_length=seq,
        max_position_embeddings=int(read_arg(args, "max_position_embeddings", default=seq)),
        position_embedding_type="rope" if rope else "learned_absolute",
        rotary_base=float(read_arg(args, "rotary_base", default=10000.0)),
        normalization=read_arg(args, "normalization", default="LayerNorm"),
        layernorm_epsilon=float(read_arg(args, "norm_epsilon", "layernorm_epsilon", default=1e-5)),
        activation=activation, add_bias_linear=bias,
        share_embeddings_and_output_weights=not untied,
        hidden_dropout=float(read_arg(args, "hidden_dropout", default=0.1)),
        attention_dropout=float(read_arg(args, "attention_dropout", default=0.1)),
        init_method_std=float(read_arg(args, "init_method_std", default=0.02)),
        make_vocab_size_divisible_by=int(read_arg(args, "make_vocab_size_divisible_by", default=128)),
        vocab_size=vocab_size, **extra,
    )
