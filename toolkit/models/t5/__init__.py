"""T5 encoder–decoder models (v1.0 ReLU/tied and v1.1 gated-GELU/untied) and seq2seq decoding.
``SPEC`` declares the family."""

from __future__ import annotations

from toolkit.config import RunConfig
from toolkit.data.t5_dataset import build_t5_datasets
from toolkit.errors import ParallelConfigError
from toolkit.models.t5.generation import generate_seq2seq
from toolkit.models.t5.hf import ADAPTER
from toolkit.models.t5.model import T5Caches, T5Layer, T5Model, T5Stack
from toolkit.models.t5.objective import seq2seq_lm, t5_span_corruption
from toolkit.models.t5.parallelize import parallelize_t5
from toolkit.models.t5.position_bias import RelativePositionBias, relative_position_bucket
from toolkit.registry import ModelSpec


def _validate_parallel(cfg: RunConfig) -> None:
    tp = cfg.parallel.tensor_model_parallel_size
    if cfg.parallel.sequence_parallel and tp > 1 and cfg.model.decoder_seq_length % tp:
        raise ParallelConfigError(f"model.decoder_seq_length={cfg.model.decoder_seq_length} is not divisible by "
                                  f"parallel.tensor_model_parallel_size={tp} (needed by sequence_parallel)")


SPEC = ModelSpec(
    name="t5",
    build=T5Model,
    objective=t5_span_corruption,
    datasets=build_t5_datasets,
    default_tokenizer="english-t5-spm",
    tokens_per_sample=lambda cfg: cfg.model.seq_length + cfg.model.decoder_seq_length,
    tensor_parallel=parallelize_t5,
    hf_adapter=ADAPTER,
    validate_parallel=_validate_parallel,
    build_task=lambda cfg, task, *, tensor_parallel_size=1: T5Model(cfg, tensor_parallel_size=tensor_parallel_size),
    task_objectives={"seq2seq": seq2seq_lm},  # input → target fine-tuning: the model itself, loss on the targets
)

__all__ = ["T5Model", "T5Stack", "T5Layer", "T5Caches", "RelativePositionBias", "relative_position_bucket",
           "generate_seq2seq", "SPEC"]
