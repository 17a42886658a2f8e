"""Checks on a whole run config that need no process group, and on a model config read from another
program's file."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from toolkit.config.schema import CHOICES, ModelConfig, RunConfig
from toolkit.errors import ConfigError, closest, first_line


def _get(cfg: RunConfig, dotted: str):
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: RunConfig) -> None:
    """Checks that need no process group: the family, choices, positivity, head and batch arithmetic,
    then the family's own checks (its ``ModelSpec.validate``)."""
    from toolkit.registry import get_spec

    spec = get_spec(cfg.model.family)
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            hint = closest(str(value), allowed)
            raise ConfigError(
                f"{key}={value!r} is not one of {', '.join(allowed)}" + (f"; did you mean '{hint}'?" if hint else "")
            )
    m, t = cfg.model, cfg.trainer
    for key in ("model.num_layers", "model.hidden_size", "model.num_attention_heads", "model.seq_length",
                "trainer.max_steps", "trainer.micro_batch_size", "trainer.global_batch_size"):
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {_get(cfg, key)}")
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
            f"{m.num_attention_heads}; change one or set model.kv_channels"
        )
    groups = m.num_query_groups or m.num_attention_heads
    if m.num_attention_heads % groups:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"model.num_query_groups={groups}"
        )
    if m.position_embedding_type == "learned_absolute" and (m.max_position_embeddings or m.seq_length) < m.seq_length:
        raise ConfigError(
            f"model.seq_length={m.seq_length} exceeds model.max_position_embeddings={m.max_position_embeddings}"
        )
    if t.max_skipped_steps < 1:
        raise ConfigError(f"trainer.max_skipped_steps must be at least 1, got {t.max_skipped_steps}")
    if t.exit_signal is not None:
        import signal

        if not isinstance(getattr(signal, t.exit_signal, None), signal.Signals) or t.exit_signal in (
                "SIGKILL", "SIGSTOP"):  # SIG_DFL, SIG_IGN, SIG_BLOCK are attributes of signal but no signals
            raise ConfigError(f"trainer.exit_signal={t.exit_signal!r} is not a signal that can be caught; use a "
                              "name such as SIGUSR1, SIGUSR2 or SIGINT")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"trainer.global_batch_size={t.global_batch_size} is not divisible by "
            f"trainer.micro_batch_size={t.micro_batch_size}"
        )
    for key in ("model.hidden_dropout", "model.attention_dropout"):
        if not 0.0 <= _get(cfg, key) < 1.0:
            raise ConfigError(f"{key} must be in [0, 1), got {_get(cfg, key)}")
    if cfg.task.type != "none" and spec.build_task is None:
        raise ConfigError(f"model.family={m.family} has no task heads (task.type={cfg.task.type}); fine-tune an "
                          f"encoder family")
    if cfg.task.packing and cfg.task.type != "sft":
        raise ConfigError(f"task.packing=true packs SFT samples; task.type={cfg.task.type} does not pack")
    if cfg.task.type != "none" and cfg.task.type not in spec.task_objectives:
        raise ConfigError(f"model.family={m.family} fine-tunes for task.type {', '.join(spec.task_objectives)}, not "
                          f"{cfg.task.type}")
    if cfg.peft.method == "lora":
        if cfg.peft.rank <= 0 or cfg.peft.alpha <= 0:
            raise ConfigError(f"peft.rank and peft.alpha must be positive, got {cfg.peft.rank} and {cfg.peft.alpha}")
        if not 0.0 <= cfg.peft.dropout < 1.0:
            raise ConfigError(f"peft.dropout must be in [0, 1), got {cfg.peft.dropout}")
        if not cfg.peft.target_modules:
            raise ConfigError("peft.method=lora needs peft.target_modules (e.g. [q, v] or [q_proj, v_proj])")
    if spec.validate is not None:
        spec.validate(cfg)


_MODEL_SIZES = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "ffn_hidden_size", "num_query_groups",
                "kv_channels", "max_position_embeddings", "vocab_size", "num_decoder_layers", "decoder_seq_length")


def check_model_config(cfg: ModelConfig, where: str) -> ModelConfig:
    """``cfg`` with every field converted to its schema type (``"12"`` → 12), for a ModelConfig built
    from another program's file (an imported ``config.json``): a value of the wrong type, or a size
    that is not positive, is a one-line ConfigError naming ``where`` and the field."""
    try:
        checked: ModelConfig = OmegaConf.to_object(OmegaConf.structured(cfg))  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{where}: invalid value for model.{key}: {first_line(e)}") from None
    for key in _MODEL_SIZES:
        value = getattr(checked, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{where}: model.{key} must be a positive integer, got {value}")
    return checked
