"""Run configuration: the dataclass schema (:mod:`.schema`), recipe loading and overrides
(:mod:`.loading`), validation (:mod:`.validation`) and the sizes derived from a model config
(:mod:`.sizes`). Import from here: ``from toolkit.config import RunConfig, load_config``.
"""

from omegaconf import MISSING

from toolkit.config.loading import list_recipes, load_config, parse_overrides, resolve_recipe, save_config, to_yaml
from toolkit.config.schema import (
    CHOICES,
    SCHEMA_KEYS,
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    PeftConfig,
    RunConfig,
    TaskConfig,
    TensorBoardConfig,
    TokenizerConfig,
    TrainerConfig,
    WandbConfig,
)
from toolkit.config.sizes import ffn_size, head_dim, model_vocab_sizes, padded_vocab_size
from toolkit.config.validation import check_model_config, validate

__all__ = [
    "RunConfig", "ModelConfig", "ParallelConfig", "DataConfig", "TokenizerConfig", "OptimConfig",
    "TrainerConfig", "CheckpointConfig", "LoggingConfig", "WandbConfig", "TensorBoardConfig", "TaskConfig",
    "PeftConfig", "CHOICES", "SCHEMA_KEYS", "load_config", "parse_overrides", "list_recipes", "resolve_recipe",
    "validate", "check_model_config", "to_yaml", "save_config", "head_dim", "ffn_size", "padded_vocab_size",
    "model_vocab_sizes", "MISSING",
]
