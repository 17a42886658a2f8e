"""``megaforge train RECIPE --dry-run``: the real TP/PP/FSDP plans on ``meta`` for a simulated world
(fake process group), checked on the landmark shapes no test machine can hold."""

from __future__ import annotations

import pytest

from tests.conftest import cli_main
from toolkit.config import load_config
from toolkit.training.dry_run import DryRunReport, RankReport, dry_run


def run(recipe: str, *overrides: str) -> DryRunReport:
    return dry_run(load_config(recipe, ["trainer.dry_run=true", *overrides]))


def stage_count(r: RankReport, tp: int) -> int:
    """The parameters of ``r``'s stage, from its shards alone: split parameters times the tp ranks
    (every tp rank's shard is the same size), replicated ones once."""
    return sum(_numel(q.local_shape) * (tp if q.replicas == 1 else 1) for q in r.params)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def check_layout(report: DryRunReport, *, tp: int, pp: int, layers_per_stage: int) -> int:
    """Check the shards of the shown ranks; returns the model's count rebuilt from them by symmetry."""
    by_pp = {}
    for r in report.ranks:
        by_pp.setdefault(r.pp_rank, []).append(r)
        assert r.stages == [r.pp_rank] and r.layers[0] == (r.pp_rank * layers_per_stage,
                                                           (r.pp_rank + 1) * layers_per_stage - 1)
        shapes = {q.name: q for q in r.params}
        layer = f"layers.{r.layers[0][0]}"
        q, out, fc1 = (shapes[f"{layer}.{n}.weight"] for n in ("attn.q", "attn.out", "mlp.fc1"))
        assert q.local_shape[0] * tp == q.global_shape[0] and q.local_shape[1] == q.global_shape[1]  # column-parallel
        assert out.local_shape[1] * tp == out.global_shape[1] and out.local_shape[0] == out.global_shape[0]  # row
        assert fc1.local_shape[0] * tp == fc1.global_shape[0]
        if "embed.tokens.weight" in shapes:  # vocab-parallel
            e = shapes["embed.tokens.weight"]
            assert e.local_shape[0] * tp == e.global_shape[0]
    assert {0, pp // 2, pp - 1} <= set(by_pp)
    for ranks in by_pp.values():  # two tp ranks of each shown stage hold equal shards
        assert len({r.tp_rank for r in ranks}) == 2 and len({r.local_params for r in ranks}) == 1
    first, middle, last = (stage_count(by_pp[s][0], tp) for s in (0, pp // 2, pp - 1))
    embedding = _numel(next(q.global_shape for q in by_pp[0][0].params if q.name == "embed.tokens.weight"))
    # the last stage holds a synced copy of the tied word embedding: counted once
    return first + (pp - 2) * middle + last - embedding


def test_gpt3_175b_tp8_pp8():
    report = run("gpt3-175b", "parallel.pipeline_model_parallel_size=8")
    assert report.layout == {"tp": 8, "pp": 8, "dp": 1} and report.world_size == 64
    single = 174_615_846_912  # the single-process model (tests/scale/test_landmarks.py), vocabulary padded to 51200
    assert report.model_params == single
    assert check_layout(report, tp=8, pp=8, layers_per_stage=12) == single
    assert report.ok and report.total_params == single
    assert report.ranks[-1].shared == {"embed.tokens.weight": (51200 * 12288, 2)}  # first and last stage


def test_mt_nlg_530b_tp8_pp35_published_layout():
    report = run("mt-nlg-530b")  # the recipe's layout: tp 8 × pp 35, Megatron's split: 105 / 35 = 3 layers each
    assert report.layout == {"tp": 8, "pp": 35, "dp": 1}
    assert check_layout(report, tp=8, pp=35, layers_per_stage=3) == report.model_params
    assert report.total_params == report.model_params and abs(report.model_params - 530e9) / 530e9 < 0.01
    # a middle GPU holds 3 layers: weights 12·h²/8, column-parallel biases (q, k, v, fc1: 7·h)/8, and
    # whole the row-parallel biases (out, fc2: 2·h) and two norms (4·h): 1.89B parameters, 7 GiB in fp32
    h = 20480
    middle = next(r for r in report.ranks if r.pp_rank == 17)
    assert middle.local_params == 3 * ((12 * h * h + 7 * h) // 8 + 6 * h) == 1_887_859_200


def test_fsdp_over_dp_shards_the_tp_shards():
    report = run("gpt3-175b", "parallel.pipeline_model_parallel_size=8", "trainer.dry_run_world_size=128",
                 "parallel.data_parallel_sharding=full", "trainer.dry_run_ranks=[0,64,127]")
    assert report.layout["dp"] == 2 and report.total_params == report.model_params
    r = report.ranks[0]  # (pp 0, dp 0, tp 0)
    q = next(x for x in r.params if x.name == "layers.0.attn.q.weight")
    assert q.global_shape == (12288, 12288) and q.local_shape == (768, 12288)  # / tp 8 / dp 2
    assert [x.pp_rank for x in report.ranks] == [0, 4, 7] and report.ranks[2].dp_rank == 1
    # a middle stage's tp shard (12 layers: weights 12·h²/8, column biases 7·h/8, row biases and norms 6·h),
    # halved by FSDP over dp 2
    h = 12288
    assert report.ranks[1].local_params * 2 == 12 * ((12 * h * h + 7 * h) // 8 + 6 * h)


def test_uneven_fsdp_shards_sum_exactly_when_every_rank_is_shown():
    report = run("gpt-tiny", "trainer.dry_run_world_size=3", "trainer.global_batch_size=12", "trainer.micro_batch_size=4",
                 "parallel.data_parallel_sharding=full", "trainer.dry_run_ranks=[0,1,2]")
    assert len({r.local_params for r in report.ranks}) == 2  # dims not divisible by 3: the last shard is smaller
    assert sum(r.unique_params for r in report.ranks) == report.model_params == report.total_params


def test_cli_dry_run_exits_0_and_prints_ranks():
    out = cli_main("train", "mt-nlg-530b", "trainer.dry_run_ranks=[0,2176,4479]", "trainer.dry_run_world_size=4480",
                   "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "simulated world of 4480 ranks (tp8 × pp35 × dp16)" in out.stdout
    assert "rank 4479 (pp 34, dp 15, tp 7): stage 34 (layers 102–104)" in out.stdout
    # FSDP2 over the 16 data-parallel replicas (data_parallel_sharding=optimizer_and_grads) shards the tp shards
    assert f"rank 2176 (pp 17, dp 0, tp 0): stage 17 (layers 51–53): {1_887_859_200 // 16:,} parameters" in out.stdout
    assert "layers.102.attn.q.weight" in out.stdout
    assert "total over all 4480 ranks: 529,600,819,200 parameters = the single-process model's" in out.stdout


@pytest.mark.parametrize("overrides, message", [
    (["trainer.dry_run_world_size=100"], "world size 100 is not divisible by"),
    (["parallel.tensor_model_parallel_size=7"], "num_attention_heads=128 is not divisible by"),
    (["parallel.pipeline_model_parallel_size=10"], "num_layers=105 is not divisible by"),
    (["trainer.dry_run_ranks=[280]"], "outside the simulated world of 280"),
])
def test_bad_layout_is_one_line_exit_2(overrides, message):
    out = cli_main("train", "mt-nlg-530b", *overrides, "--dry-run")
    assert out.returncode == 2 and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
