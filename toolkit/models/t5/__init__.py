"""T5 encoder–decoder models (v1.0 ReLU/tied and v1.1 gated-GELU/untied) and seq2seq decoding."""

from toolkit.models.t5.generation import generate_seq2seq
from toolkit.models.t5.model import T5Caches, T5Layer, T5Model, T5Stack
from toolkit.models.t5.position_bias import RelativePositionBias, relative_position_bucket

__all__ = ["T5Model", "T5Stack", "T5Layer", "T5Caches", "RelativePositionBias", "relative_position_bucket",
           "generate_seq2seq"]
