"""Parallel layouts that cannot work fail before any collective, in one line naming both numbers."""

from __future__ import annotations

import pytest

from tests.parallel.helpers import TINY, launch
from toolkit.config import load_config
from toolkit.errors import ParallelConfigError
from toolkit.parallel import validate_parallel


def cfg(*overrides: str):
    return load_config("gpt-tiny", [*TINY, *overrides])


@pytest.mark.parametrize("world,overrides,needle", [
    (3, ["parallel.tensor_model_parallel_size=2"], "world size 3 is not divisible"),
    (2, ["parallel.tensor_model_parallel_size=2", "model.num_attention_heads=3", "model.hidden_size=48",
         "model.num_query_groups=null"], "num_attention_heads=3 is not divisible by parallel.tensor_model_parallel_size=2"),
    (4, ["parallel.tensor_model_parallel_size=4", "model.num_query_groups=2"], "num_query_groups=2"),
    (2, ["parallel.pipeline_model_parallel_size=2", "model.num_layers=3"], "num_layers=3 is not divisible"),
    (4, ["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2",
         "model.num_layers=2"], "2 × 2 = 4"),
    (4, ["trainer.micro_batch_size=4", "trainer.global_batch_size=12"], "global_batch_size=12 is not divisible"),
    (1, ["parallel.sequence_parallel=true"], "sequence_parallel=true needs"),
])
def test_bad_layouts(world, overrides, needle):
    with pytest.raises(ParallelConfigError) as e:
        validate_parallel(cfg(*overrides), world)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_good_layout_passes():
    validate_parallel(cfg("parallel.tensor_model_parallel_size=2"), 4)


def test_cli_exits_2_before_any_collective(tmp_path):
    """tp=2 on a single process: exit code 2 with the one-line message (no process group needed)."""
    out = launch(tmp_path / "run", 1, *TINY, "parallel.tensor_model_parallel_size=2", timeout=120)
    assert out.returncode == 2
    assert "world size 1 is not divisible" in out.stderr
