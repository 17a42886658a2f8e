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
    # pipeline schedules (torch.distributed.pipelining's micro-batch rules, checked up front)
    (2, ["parallel.pipeline_model_parallel_size=2", "parallel.pipeline_schedule=interleaved_1f1b"],
     "interleaved_1f1b needs parallel.virtual_pipeline_model_parallel_size > 1, got 1"),
    (2, ["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2",
         "model.num_layers=4", "parallel.pipeline_schedule=gpipe"], "gpipe runs one stage per rank"),
    (4, ["parallel.pipeline_model_parallel_size=4", "model.num_layers=4", "trainer.global_batch_size=4"],
     "2 micro-batches per step (global_batch_size / (micro_batch_size × dp)) is fewer than "
     "pipeline_model_parallel_size=4"),
    (2, ["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2",
         "model.num_layers=4", "trainer.global_batch_size=10"], "5 micro-batches per step"),
    (2, ["parallel.pipeline_model_parallel_size=2", "trainer.compile=true"], "trainer.compile=true is not supported"),
])
def test_bad_layouts(world, overrides, needle):
    with pytest.raises(ParallelConfigError) as e:
        validate_parallel(cfg(*overrides), world)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_good_layout_passes():
    validate_parallel(cfg("parallel.tensor_model_parallel_size=2"), 4)
    validate_parallel(cfg("parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2",
                          "model.num_layers=4"), 2)  # 1f1b with vpp > 1 runs interleaved 1F1B


def test_pipeline_needs_a_family_split(monkeypatch):
    import dataclasses

    from toolkit import registry

    gpt = registry.get_spec("gpt")
    monkeypatch.setitem(registry._specs(), "gpt", dataclasses.replace(gpt, pipeline_split=None,
                                                                        pipeline_objective=None))
    with pytest.raises(ParallelConfigError, match="model.family=gpt has no pipeline split"):
        validate_parallel(cfg("parallel.pipeline_model_parallel_size=2"), 2)


def test_t5_refuses_pipeline_parallelism():
    """T5 has no pipeline split: one line naming the families that have one — before the layer count
    (t5-tiny's 3 layers do not divide by 2, which is not what the user needs to hear)."""
    t5 = load_config("t5-tiny", ["parallel.pipeline_model_parallel_size=2"])
    with pytest.raises(ParallelConfigError) as e:
        validate_parallel(t5, 2)
    assert str(e.value) == ("model.family=t5 has no pipeline split: pipeline parallelism "
                            "(parallel.pipeline_model_parallel_size=2) supports model.family bert or gpt; use "
                            "tensor or data parallelism (pipeline_model_parallel_size=1)")
    validate_parallel(load_config("bert-tiny", ["parallel.pipeline_model_parallel_size=2",
                                                "trainer.global_batch_size=32"]), 2)  # BERT has one


def test_pipeline_schedule_rules_match_torch():
    """The up-front micro-batch rule for interleaved 1F1B agrees with torch's own check."""
    from types import SimpleNamespace

    from torch.distributed.pipelining import ScheduleInterleaved1F1B

    from toolkit.parallel.pipeline import schedule_problem

    for pp, vpp, n in [(p, v, n) for p in (2, 3, 4) for v in (2, 3) for n in range(1, 13)]:
        stages = [SimpleNamespace(group_size=pp, group_rank=0, num_stages=pp * vpp, stage_index=c * pp,
                                  is_first=c == 0, is_last=False) for c in range(vpp)]
        try:
            ScheduleInterleaved1F1B(stages, n)
            torch_ok = True
        except ValueError:
            torch_ok = False
        ours_ok = schedule_problem("interleaved_1f1b", pp=pp, vpp=vpp, num_microbatches=n) is None
        assert ours_ok == torch_ok, (pp, vpp, n)


def test_cli_exits_2_before_any_collective(tmp_path):
    """tp=2 on a single process: exit code 2 with the one-line message (no process group needed)."""
    out = launch(tmp_path / "run", 1, *TINY, "parallel.tensor_model_parallel_size=2", timeout=120)
    assert out.returncode == 2
    assert "world size 1 is not divisible" in out.stderr
