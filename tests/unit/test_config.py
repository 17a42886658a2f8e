from pathlib import Path

import pytest

from toolkit.config import SCHEMA_KEYS, list_recipes, load_config
from toolkit.errors import ConfigError, RecipeError


def test_every_recipe_loads():
    recipes = list_recipes()
    assert {"gpt-tiny", "gpt2-124m", "gpt2-350m", "gpt-1.3b", "llama-tiny", "tinyllama-1.1b"} <= set(recipes)
    for name in recipes:
        cfg = load_config(name)
        assert cfg.name == name
        assert cfg.description


def test_overrides_apply_with_types():
    cfg = load_config("gpt-tiny", ["trainer.max_steps=7", "model.hidden_dropout=0.2", "logging.wandb.enabled=false"])
    assert cfg.trainer.max_steps == 7 and cfg.model.hidden_dropout == 0.2 and cfg.logging.wandb.enabled is False


def test_megatron_names_exist():
    for key in ("trainer.micro_batch_size", "trainer.global_batch_size", "model.num_layers", "model.hidden_size",
                "model.ffn_hidden_size", "model.num_attention_heads", "model.make_vocab_size_divisible_by",
                "parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size",
                "parallel.virtual_pipeline_model_parallel_size", "parallel.sequence_parallel",
                "checkpoint.save_interval", "trainer.run_dir", "trainer.seed", "trainer.deterministic"):
        assert key in SCHEMA_KEYS


def test_unknown_override_names_closest_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.max_step'; did you mean 'trainer.max_steps'"):
        load_config("gpt-tiny", ["trainer.max_step=3"])


def test_unknown_key_in_yaml_names_file_and_line(tmp_path: Path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("model:\n  num_layers: 2\n  hiden_size: 32\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(recipe))
    msg = str(err.value)
    assert f"{recipe}:3" in msg and "model.hidden_size" in msg and "\n" not in msg


def test_bad_value_type_is_one_line():
    with pytest.raises(ConfigError, match="trainer.max_steps") as err:
        load_config("gpt-tiny", ["trainer.max_steps=many"])
    assert "\n" not in str(err.value)


def test_bad_choice_suggests():
    with pytest.raises(ConfigError, match="did you mean 'RMSNorm'"):
        load_config("gpt-tiny", ["model.normalization=RMSnorm"])


def test_unknown_recipe_suggests_nearest():
    with pytest.raises(RecipeError, match="did you mean 'gpt-tiny'"):
        load_config("gpt-tiyn")


def test_validation_of_shapes():
    with pytest.raises(ConfigError, match="not divisible by model.num_attention_heads"):
        load_config("gpt-tiny", ["model.hidden_size=100", "model.num_attention_heads=3"])
    with pytest.raises(ConfigError, match="global_batch_size=10 is not divisible"):
        load_config("gpt-tiny", ["trainer.global_batch_size=10", "trainer.micro_batch_size=4"])


def test_every_key_is_documented():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    import dataclasses

    from toolkit.config import RunConfig

    sections = {f.name for f in dataclasses.fields(RunConfig)}
    missing = [k for k in SCHEMA_KEYS if k not in sections and k != "logging.wandb" and f"`{k}`" not in doc]
    assert not missing, f"document these keys in docs/configuration.md: {missing}"
