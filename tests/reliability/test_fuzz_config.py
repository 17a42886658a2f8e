"""Property-based fuzzing of configuration input: ``KEY=VALUE`` overrides (random keys, types and
values), recipe YAML files and parallel layouts. Whatever the input, loading and validating either
succeeds or raises a one-line :class:`~toolkit.errors.MegaforgeError`; never another exception."""

from __future__ import annotations

import signal

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.reliability.fuzzing import fuzz_settings, outcome
from toolkit.config import CHOICES, SCHEMA_KEYS, load_config
from toolkit.errors import MegaforgeError
from toolkit.parallel.validate import validate_parallel

# load_config costs ~0.1 s on a loaded CI machine (OmegaConf), so the budgets are small; the properties
# were also run with 600 random (not derandomized) examples each while writing them.
FUZZ = fuzz_settings(35)

RECIPES = [None, "gpt-tiny", "llama-tiny", "bert-tiny", "t5-small", "gatortron-tiny-clinical-ner",
           "gpt-tiny-sft-clinical"]




# ---------------------------------------------------------------------------- strategies

KEYS = sorted(SCHEMA_KEYS)
TRICKY_VALUES = [
    "", "null", "~", "???", "[]", "{}", "[1, 2]", "{a: 1}", "[a, {b: 1}]", "'quoted'", '"dq"', "'", '"', "[", "{",
    "${", "${model.hidden_size}", "${model.num_layers}", "${nope}", "${oc.env:MEGAFORGE_NO_SUCH_VAR}",
    "${oc.decode:'[1'}", "${model}", "${trainer.seed}${trainer.seed}", "a=b", "true", "False", "yes", "nan", "-inf",
    "1e999", "0x10", "1_000", "0", "-1", "2**64", "18446744073709551617", "SIGUSR1", "SIGKILL", "SIG_DFL",
    "SIGRTMIN", "\n", "x\ny", "\\", "é", "\x00", "0.7 a 0.3 b", "a b c",
]
scalar_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
values = st.one_of(
    st.sampled_from(TRICKY_VALUES),
    st.integers(-(2 ** 70), 2 ** 70).map(str),
    st.integers(-3, 9).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from([v for allowed in CHOICES.values() for v in allowed]),
    scalar_text,
    st.lists(st.one_of(st.integers(-3, 9).map(str), st.sampled_from(["a", "0.5", "null", "[1]"])),
             max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
)
keys = st.one_of(
    st.sampled_from(KEYS),
    st.sampled_from(KEYS).flatmap(lambda k: st.sampled_from([k + "x", k.upper(), k + ".x", k.replace(".", "..", 1),
                                                               k.rsplit(".", 1)[0], "." + k, k + "[0]"])),
    scalar_text,
)
override = st.one_of(st.builds(lambda k, v: f"{k}={v}", keys, values), scalar_text)
overrides = st.lists(override, max_size=5)


# ---------------------------------------------------------------------------- properties


@FUZZ
@given(recipe=st.sampled_from(RECIPES), items=overrides)
# inputs that once escaped as other exceptions or multi-line messages:
@example(recipe="gpt-tiny", items=["checkpoint='"])  # yaml ScannerError
@example(recipe="gpt-tiny", items=["optim.adam_beta2.x=\x1d"])  # yaml ReaderError
@example(recipe="gpt-tiny", items=["model.hidden_size=${nope}"])  # InterpolationKeyError
@example(recipe="gpt-tiny", items=["model.hidden_size=${model.num_layers}"])  # a valid interpolation
@example(recipe="gpt-tiny", items=["model.family=${oc.decode:'[1'}"])  # InterpolationResolutionError
@example(recipe="gpt-tiny", items=["data.data_prefix={a: 1}"])  # TypeError from OmegaConf.merge
@example(recipe="gpt-tiny", items=["a\nb=1"])  # a line break in the unknown key
@example(recipe="gpt-tiny", items=["x\ny"])  # ... in an override without '='
@example(recipe="gpt-tiny", items=["trainer.exit_signal=SIG_DFL"])  # accepted, then fails in signal.signal
def test_overrides_load_or_fail_in_one_line(recipe, items):
    cfg = outcome(load_config, recipe, items)
    if not isinstance(cfg, MegaforgeError) and cfg.trainer.exit_signal is not None:
        # an accepted exit_signal must be a signal the trainer can install a handler for
        assert isinstance(getattr(signal, cfg.trainer.exit_signal), signal.Signals)


PARALLEL_INTS = ["parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size",
                 "parallel.virtual_pipeline_model_parallel_size", "parallel.timeout_seconds", "model.num_layers",
                 "model.num_attention_heads", "model.num_query_groups", "model.hidden_size", "model.seq_length",
                 "model.decoder_seq_length", "model.kv_channels", "trainer.micro_batch_size",
                 "trainer.global_batch_size"]
layout = st.lists(
    st.one_of(
        st.builds(lambda k, v: f"{k}={v}", st.sampled_from(PARALLEL_INTS), st.integers(-2, 16)),
        st.builds(lambda k, v: f"{k}={v}", st.sampled_from(PARALLEL_INTS), st.sampled_from(["null", "0", "1"])),
        st.builds(lambda v: f"parallel.sequence_parallel={v}", st.booleans()),
        st.builds(lambda v: f"parallel.pipeline_schedule={v}", st.sampled_from(CHOICES["parallel.pipeline_schedule"])),
        st.builds(lambda v: f"trainer.compile={v}", st.booleans()),
        st.builds(lambda v: f"task.packing={v}", st.booleans()),
    ),
    max_size=8,
)


@FUZZ
@given(recipe=st.sampled_from(RECIPES[1:]), items=layout, world_size=st.integers(0, 17))
@example(recipe="gpt-tiny", items=[], world_size=0)  # ZeroDivisionError
def test_parallel_layouts_validate_or_fail_in_one_line(recipe, items, world_size):
    cfg = outcome(load_config, recipe, items)
    if not isinstance(cfg, MegaforgeError):
        outcome(validate_parallel, cfg, world_size)


yaml_scalar = st.one_of(st.sampled_from(TRICKY_VALUES).map(repr), st.integers(-3, 2 ** 65), st.floats(),
                        st.booleans(), st.none())
yaml_line = st.one_of(
    st.builds(lambda k, v: f"{k}: {v}", st.sampled_from(sorted({k.split('.')[0] for k in KEYS}) + ["x", "1"]),
              yaml_scalar),
    st.builds(lambda k, v: f"  {k}: {v}", st.sampled_from(sorted({k.split('.')[-1] for k in KEYS}) + ["zz"]),
              yaml_scalar),
    st.sampled_from(["model:", "trainer:", "- 1", "---", "...", "a: [1, 2", "b: {", "  - x", "\t", "key: value: x",
                     "&a x: *a", "!!python/object:os.system x", "%YAML 1.2", "? complex", "name:", "'", ""]),
    scalar_text,
)


@FUZZ
@given(lines=st.lists(yaml_line, max_size=8), raw=st.binary(max_size=40), use_raw=st.booleans())
def test_recipe_files_load_or_fail_in_one_line(tmp_path_factory, lines, raw, use_raw):
    path = tmp_path_factory.mktemp("recipe") / "fuzz.yaml"
    if use_raw:
        path.write_bytes(raw)
    else:
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    outcome(load_config, str(path), [])


@pytest.mark.parametrize("name", ["SIG_DFL", "SIG_IGN", "SIG_BLOCK", "SIGKILL", "SIGSTOP", "NSIG", "SIGNOPE", "usr1"])
def test_exit_signal_must_be_a_catchable_signal(name):
    with pytest.raises(MegaforgeError, match="exit_signal"):
        load_config("gpt-tiny", [f"trainer.exit_signal={name}"])
