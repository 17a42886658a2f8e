"""Property-based fuzzing of the safe loaders: legacy Megatron-LM ``.pt`` pickles (``safe_load``:
``weights_only`` plus an allow-list), safetensors files and their headers and index, and Hugging
Face ``config.json`` values. Whatever the bytes, loading either succeeds or raises a one-line
:class:`~toolkit.errors.MegaforgeError`; never another exception, and nothing in a file runs code."""

from __future__ import annotations

import argparse
import io
import json
import pickle
import struct
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from safetensors.torch import save_file

from tests.reliability.fuzzing import fuzz_settings, outcome
from toolkit.convert.safe_load import safe_load
from toolkit.convert.streaming import SafetensorsSource
from toolkit.errors import CheckpointError, MegaforgeError

FUZZ = fuzz_settings(50)




TRICKY = ["", "\n", "\x00", '"', "{", "}", "[", "]", ",", ":", "\\", "é", "\ufeff", "NaN", "-1", "1e999"]


def mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    """``valid`` itself, truncated, with a byte changed, or random bytes."""
    n = len(valid)
    return st.one_of(
        st.just(valid),
        st.integers(0, n - 1).map(lambda k: valid[:k]),
        st.tuples(st.integers(0, n - 1), st.integers(0, 255)).map(
            lambda kb: valid[:kb[0]] + bytes([kb[1]]) + valid[kb[0] + 1:]),
        st.binary(max_size=120),
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.integers(-2, 8) | st.floats()
    | st.text(max_size=6) | st.sampled_from(TRICKY),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


# ---------------------------------------------------------------------------- legacy .pt (safe_load)


def legacy_checkpoint() -> bytes:
    """A Megatron-LM style ``model_optim_rng.pt``: args Namespace, tensors, a numpy RNG state."""
    obj = {"args": argparse.Namespace(num_layers=2, hidden_size=8, params_dtype=torch.float32),
           "iteration": 3, "model": {"language_model": {"w": torch.arange(6.0).reshape(2, 3)}},
           "rng_state": [{"np_rng_state": ("MT19937", np.arange(4, dtype=np.uint32), 1, 0, 0.0)}]}
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


LEGACY = legacy_checkpoint()


def with_pickle(data_pkl: bytes) -> bytes:
    """The legacy checkpoint's zip with its ``data.pkl`` replaced by ``data_pkl``."""
    src, out = zipfile.ZipFile(io.BytesIO(LEGACY)), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info, data_pkl if info.filename.endswith("/data.pkl") else src.read(info))
    return out.getvalue()


ident = st.one_of(st.sampled_from(["os", "posix", "builtins", "argparse", "megatron.model.enums", "apex.x",
                                   "numpy", "torch", "collections", "io", "", "a b", "x\ny", "__main__"]),
                  st.text(max_size=8))
attr = st.one_of(st.sampled_from(["system", "eval", "Namespace", "AttnMaskType", "OrderedDict", "BytesIO",
                                  "dtype", "", "x\ny", "__reduce__"]), st.text(max_size=8))


def global_pickle(args) -> bytes:
    """A pickle calling ``module.name(...)``: GLOBAL (newline-terminated names) or STACK_GLOBAL
    (names as strings, so they may hold line breaks)."""
    module, name, stack, arg = args
    if stack:
        def string(text: str) -> bytes:
            return pickle.BINUNICODE + struct.pack("<I", len(text.encode())) + text.encode()

        head = pickle.PROTO + b"\x04" + string(module) + string(name) + pickle.STACK_GLOBAL
    else:
        head = pickle.PROTO + b"\x02" + pickle.GLOBAL + module.encode() + b"\n" + name.encode() + b"\n"
    return head + pickle.dumps((arg,), protocol=2)[2:-1] + pickle.REDUCE + pickle.STOP


@FUZZ
@given(raw=st.one_of(
    mutations(LEGACY),
    st.tuples(ident, attr, st.booleans(), st.sampled_from(["echo pwned", 0, None])).map(global_pickle).map(with_pickle),
    st.binary(max_size=60).map(with_pickle),
))
@example(raw=with_pickle(global_pickle(("os", "system", False, "echo pwned"))))
def test_legacy_pt_loads_safely_or_fails_in_one_line(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("pt") / "model_optim_rng.pt"
    path.write_bytes(raw)
    outcome(safe_load, path)


# ---------------------------------------------------------------------------- safetensors


def safetensors_file() -> bytes:
    folder_buf = io.BytesIO()
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2, dtype=torch.int64)},
                  str(path), metadata={"format": "pt"})
        folder_buf.write(path.read_bytes())
    return folder_buf.getvalue()


SAFETENSORS = safetensors_file()
entry = st.one_of(
    st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "I64", "BF16", "F8_E4M3", "X", ""]) | json_values,
                           "shape": st.lists(st.integers(-1, 4), max_size=3) | json_values,
                           "data_offsets": st.lists(st.integers(-1, 40), min_size=2, max_size=2) | json_values}),
    json_values,
)
header_json = st.one_of(
    st.dictionaries(st.sampled_from(["a", "b", "__metadata__", "", "x\ny"]) | st.text(max_size=4), entry, max_size=3),
    json_values,
)


def crafted(args) -> bytes:
    header, declared, data = args
    body = json.dumps(header).encode()
    size = len(body) if declared is None else declared
    return struct.pack("<Q", size) + body + data


@FUZZ
@given(raw=st.one_of(
    mutations(SAFETENSORS),
    st.tuples(header_json, st.one_of(st.none(), st.integers(0, 2 ** 64 - 1)), st.binary(max_size=48)).map(crafted),
))
def test_safetensors_headers(tmp_path_factory, raw):
    folder = tmp_path_factory.mktemp("st")
    (folder / "model.safetensors").write_bytes(raw)
    source = outcome(SafetensorsSource, folder)
    if not isinstance(source, MegaforgeError):
        outcome(source.load, source.names())


@FUZZ
@given(index=st.one_of(json_values, st.builds(lambda m: {"weight_map": m}, json_values)))
def test_safetensors_index(tmp_path_factory, index):
    """An index whose JSON is not {"weight_map": {name: file}} is one line."""
    folder = tmp_path_factory.mktemp("sti")
    (folder / "model.safetensors").write_bytes(SAFETENSORS)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    outcome(SafetensorsSource, folder)


@FUZZ
@given(weight_map=st.dictionaries(st.sampled_from(["a", "b", "c", "", "x\ny"]),
                                  st.sampled_from(["model.safetensors", "missing.safetensors", "../model.safetensors",
                                                   "", "."]), max_size=3),
       raw_index=st.one_of(st.none(), st.binary(max_size=30)))
def test_safetensors_index_well_formed_json(tmp_path_factory, weight_map, raw_index):
    folder = tmp_path_factory.mktemp("sti")
    (folder / "model.safetensors").write_bytes(SAFETENSORS)
    index = folder / "model.safetensors.index.json"
    if raw_index is None:
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        index.write_bytes(raw_index)
    outcome(SafetensorsSource, folder)


# ---------------------------------------------------------------------------- Hugging Face config.json

HF_KEYS = sorted({
    "model_type", "architectures", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
    "activation_function", "layer_norm_epsilon", "tie_word_embeddings", "scale_attn_weights", "hidden_size",
    "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
    "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "attention_bias",
    "mlp_bias", "type_vocab_size", "position_embedding_type", "layer_norm_eps", "is_decoder", "d_model", "d_kv",
    "d_ff", "num_layers", "num_decoder_layers", "num_heads", "feed_forward_proj", "dropout_rate",
    "relative_attention_num_buckets", "id2label", "label2id", "problem_type", "initializer_range",
})
hf_value = st.one_of(json_values, st.integers(-1, 64), st.sampled_from(["gelu", "silu", "relu", "gated-gelu", "absolute"]))
hf_config = st.one_of(
    st.builds(lambda base, extra: {**base, **extra},
              st.fixed_dictionaries({"model_type": st.sampled_from(["gpt2", "llama", "bert", "megatron-bert", "t5"])
                                     | json_values}),
              st.dictionaries(st.sampled_from(HF_KEYS), hf_value, max_size=6)),
    json_values,
)


def import_config_json(folder):
    """What ``megaforge convert`` reads from a Hugging Face folder before any weight is converted: the
    config.json, its model_type's adapter, the safetensors names and the ModelConfig and task they give."""
    from toolkit.convert.hf import import_hf

    return import_hf(folder, folder / "out")


@FUZZ
@given(config=hf_config)
def test_hf_config_values(tmp_path_factory, config):
    """Malformed config.json values (wrong types, zero or negative sizes, a non-object) are one line."""
    folder = tmp_path_factory.mktemp("hf")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(SAFETENSORS)
    outcome(import_config_json, folder)


@FUZZ
@given(raw=st.one_of(st.binary(max_size=40), st.sampled_from([b"", b"{", b"\xff\xfe{}", b"[]", b"null"])))
def test_hf_config_json_bytes(tmp_path_factory, raw):
    from toolkit.convert.hf import read_hf_config

    folder = tmp_path_factory.mktemp("hfb")
    (folder / "config.json").write_bytes(raw)
    outcome(read_hf_config, folder)


@FUZZ
@given(fields=st.dictionaries(st.sampled_from(["num_layers", "hidden_size", "num_attention_heads", "seq_length",
                                               "vocab_size", "kv_channels", "layernorm_epsilon", "activation",
                                               "share_embeddings_and_output_weights", "family"]),
                              hf_value, max_size=4))
def test_check_model_config(fields):
    """``check_model_config``, the type check an imported config.json's ModelConfig goes through."""
    from toolkit.config import ModelConfig, check_model_config

    outcome(check_model_config, ModelConfig(**fields), "config.json")


@pytest.mark.parametrize("id2label", [5, [0, 1], {"0": "a", "1\n": "b"}, {"x": "a", "y": "b"}, {"0": "a"}])
def test_bad_id2label_is_one_line(id2label):
    from toolkit.convert.adapters import task_from_hf

    with pytest.raises(CheckpointError) as e:
        task_from_hf({"id2label": id2label}, "token_classification", where="config.json")
    assert "\n" not in str(e.value) and "id2label" in str(e.value)
