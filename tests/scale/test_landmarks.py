"""The landmark recipes: their meta-built parameter counts match the published figures, and
``megaforge recipes`` lists them with those counts."""

from __future__ import annotations

import pytest

from tests.conftest import cli_main
from toolkit.config import list_recipes, load_config
from toolkit.recipes import recipe_model_on_meta

# published parameter counts: GPT-3 (Brown et al. 2020), MT-NLG (Smith et al. 2022), GatorTron-large
# (Yang et al. 2022), Llama 2 70B (the Hugging Face checkpoint: 68,976,648,192)
PUBLISHED = {"gpt3-175b": 175.0e9, "mt-nlg-530b": 530.0e9, "gatortron-large": 8.9e9, "llama2-70b": 68.98e9}


@pytest.fixture(scope="module")
def counts() -> dict[str, int]:
    return {name: sum(p.numel() for p in recipe_model_on_meta(load_config(name)).parameters()) for name in PUBLISHED}


def test_landmark_parameter_counts_within_one_percent_of_published(counts):
    for name, published in PUBLISHED.items():
        assert abs(counts[name] - published) / published < 0.01, (name, counts[name], published)
    # the shapes themselves, not only the totals
    gpt3, mtnlg, llama = (load_config(n).model for n in ("gpt3-175b", "mt-nlg-530b", "llama2-70b"))
    assert (gpt3.num_layers, gpt3.hidden_size, gpt3.num_attention_heads, gpt3.seq_length) == (96, 12288, 96, 2048)
    assert (mtnlg.num_layers, mtnlg.hidden_size, mtnlg.num_attention_heads, mtnlg.seq_length) == (105, 20480, 128, 2048)
    assert (llama.num_query_groups, llama.ffn_hidden_size, llama.vocab_size) == (8, 28672, 32000)


def test_published_layout_of_mt_nlg_is_in_its_recipe():
    p = load_config("mt-nlg-530b").parallel
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size) == (8, 35)


def test_recipes_command_lists_the_landmarks(counts, monkeypatch):
    assert set(PUBLISHED) <= set(list_recipes())
    monkeypatch.setattr("toolkit.recipes.list_recipes", lambda: list(PUBLISHED))  # the table of just these rows
    out = cli_main("recipes")
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split()[3] for line in out.stdout.splitlines()[1:]}
    assert rows == {name: f"{n / 1e9:.2f}B" for name, n in counts.items()}
