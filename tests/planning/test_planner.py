"""``megaforge plan``: its memory against PyTorch's own accounting, its parameter counts against the
built model's shards, and the layouts it proposes (tests/planning/accounting.py measures)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import cli_main
from tests.planning.accounting import measure
from toolkit.config import load_config
from toolkit.parallel.validate import validate_parallel
from toolkit.planning import Layout, memory
from toolkit.planning.memory import Shape, stage_params, total_params

NO_ATTN_DROPOUT = "model.attention_dropout=0"  # CPU attention with dropout falls back to the s×s math kernel
# Under fake tensors PyTorch traces the fused AdamW kernel out of place (it allocates copies the real,
# in-place kernel does not: tests/unit/test_optim.py measures both on real memory), so the fake-tensor
# comparisons run the foreach step, whose extra fp32 copy is real and planned as such
FOREACH = "optim.implementation=foreach"

# (recipe, overrides): real widths and sequence lengths, 2 layers to keep the test fast
SHAPES = [
    ("gpt-1.3b", ["model.num_layers=2", NO_ATTN_DROPOUT]),  # 2048 × 2048 tokens, bf16, hidden dropout, tied
    ("gpt-1.3b", ["model.num_layers=2", NO_ATTN_DROPOUT, "trainer.precision=fp32", "model.hidden_dropout=0",
                  "trainer.micro_batch_size=2", "model.seq_length=1024"]),
    ("gpt-1.3b", ["model.num_layers=2", NO_ATTN_DROPOUT, "model.recompute_granularity=full"]),
    ("gpt-1.3b", ["model.num_layers=2", NO_ATTN_DROPOUT, "model.fused_cross_entropy=true"]),  # logits in chunks
    ("gpt-1.3b", ["model.num_layers=2", NO_ATTN_DROPOUT, "model.fused_qkv=true"]),  # q, k, v: one cast input
    ("gpt-1.3b", ["model.num_layers=2", NO_ATTN_DROPOUT, "trainer.precision=fp32", "model.hidden_dropout=0",
                  "trainer.micro_batch_size=2", "model.seq_length=1024", "model.fused_qkv=true"]),  # fp32 weight copy
    ("tinyllama-1.1b", ["model.num_layers=2", "model.recompute_granularity=selective"]),  # GQA, SwiGLU, RMSNorm
    ("bert-base", ["model.num_layers=2", NO_ATTN_DROPOUT, "trainer.precision=bf16"]),  # post-LN, MLM + pair heads
]


def _single_gpu_layout(cfg) -> Layout:
    return Layout(tp=1, pp=1, vpp=1, dp=1, sharding="none", sp=False, recompute=cfg.model.recompute_granularity,
                  micro_batch=cfg.trainer.micro_batch_size, num_microbatches=1)


@pytest.mark.parametrize("recipe,overrides", SHAPES, ids=lambda x: x if isinstance(x, str) else x[-1])
def test_memory_within_10_percent_of_memtracker(recipe, overrides):
    overrides = overrides + ["trainer.micro_batch_size=1"] * ("trainer.micro_batch_size=2" not in overrides)
    cfg = load_config(recipe, overrides + ["trainer.global_batch_size=4", FOREACH])
    measured = measure(cfg)
    mem = memory(cfg, _single_gpu_layout(cfg))
    planned = {"params": mem.weights, "optimizer": mem.optimizer,
               "activations": mem.activations + mem.weight_casts, "peak": mem.peak}
    for key, value in measured.items():
        assert planned[key] == pytest.approx(value, rel=0.10), (key, planned[key] / value)
    assert planned["params"] == measured["params"]  # parameter counts are exact


GPT2 = ("gpt-1.3b", ["model.num_layers=2", NO_ATTN_DROPOUT])
# (recipe, overrides, layout, rank measured): one rank of each layout, in a fake process group
PARALLEL_SHAPES = [
    (*GPT2, dict(tp=2), 0),  # vocabulary-parallel embedding, head and loss (loss_parallel)
    (*GPT2, dict(tp=2, sp=True), 0),
    ("gpt-1.3b", ["model.num_layers=2", NO_ATTN_DROPOUT, "model.fused_qkv=true"], dict(tp=2, sp=True), 0),
    ("tinyllama-1.1b", ["model.num_layers=2", "model.recompute_granularity=selective"], dict(tp=2, sp=True), 0),
    (*GPT2, dict(dp=2, sharding="full"), 0),  # FSDP2, parameters re-gathered for backward
    ("gpt-1.3b", ["model.num_layers=4", NO_ATTN_DROPOUT], dict(pp=2), 0),  # first stage: embedding + 2 layers
    ("gpt-1.3b", ["model.num_layers=4", NO_ATTN_DROPOUT], dict(pp=2), 1),  # last: 2 layers, head, tied copy
    ("gpt-1.3b", ["model.num_layers=4", NO_ATTN_DROPOUT, "model.fused_cross_entropy=true"], dict(pp=2), 1),
]


def _layout_id(value):
    if isinstance(value, dict):
        return "-".join(f"{k}{v}" if k != "sharding" else v for k, v in value.items())
    if isinstance(value, list):
        return value[0]  # model.num_layers=N
    return value if isinstance(value, str) else f"rank{value}"


@pytest.mark.parametrize("recipe,overrides,knobs,rank", PARALLEL_SHAPES, ids=_layout_id)
def test_multi_rank_memory_within_10_percent_of_memtracker(recipe, overrides, knobs, rank):
    """One rank of tp2, tp2 + SP, FSDP2 (dp2, full) and pp2 (one micro-batch through a stage)."""
    from tests.planning.accounting import measure_parallel
    from toolkit.planning.memory import _rank_memory

    layout = Layout(**{**dict(tp=1, pp=1, vpp=1, dp=1, sharding="none", sp=False, recompute="none", micro_batch=1,
                              num_microbatches=1), **knobs})
    cfg = load_config(recipe, overrides + [FOREACH,
        f"parallel.tensor_model_parallel_size={layout.tp}", f"parallel.pipeline_model_parallel_size={layout.pp}",
        f"parallel.sequence_parallel={str(layout.sp).lower()}", f"parallel.data_parallel_sharding={layout.sharding}",
        "trainer.micro_batch_size=1", f"trainer.global_batch_size={layout.dp}"])
    layout = Layout(**{**layout.__dict__, "recompute": cfg.model.recompute_granularity})
    measured = measure_parallel(cfg, layout.tp * layout.pp * layout.dp, rank=rank)
    pp_rank = rank // (layout.tp * layout.dp)
    first, last = pp_rank == 0, pp_rank == layout.pp - 1
    mem = _rank_memory(cfg, Shape.of(cfg), layout, "measured", first=first, last=last, rank=pp_rank)
    planned = {"params": mem.weights, "optimizer": mem.optimizer,
               "activations": mem.activations + mem.weight_casts, "peak": mem.peak}
    for key, value in measured.items():
        assert planned[key] == pytest.approx(value, rel=0.10), (key, planned[key] / value)
    assert planned["params"] == measured["params"]  # this rank's shards, exactly
    if layout.pp == 1:
        assert memory(cfg, layout).peak == mem.peak


def test_memory_of_a_real_tiny_step_on_cpu():
    cfg = load_config("gpt-tiny", ["model.vocab_size=512", "model.num_layers=2",
                                   "trainer.micro_batch_size=2", "trainer.global_batch_size=2"])
    from tests.planning.accounting import measure_real

    measured = measure_real(cfg)
    mem = memory(cfg, _single_gpu_layout(cfg))
    assert mem.activations + mem.weight_casts == pytest.approx(measured["activations"], rel=0.10)
    assert mem.peak == pytest.approx(measured["peak"], rel=0.10)


def test_parameters_per_rank_match_the_built_shards():
    """tp=4 shards (DTensor TP plan on a fake 4-rank process group) and pp=2 stages of the meta model."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from toolkit.models.build import build_model
    from toolkit.registry import get_spec

    def local(model):
        return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    try:
        mesh = init_device_mesh("cpu", (4,))
        for recipe in ("gpt-1.3b", "tinyllama-1.1b", "bert-base"):
            cfg = load_config(recipe, ["model.num_layers=4"])
            sh, spec = Shape.of(cfg), get_spec(cfg.model.family)
            with torch.device("meta"):
                whole = build_model(cfg.model)
                sharded = build_model(cfg.model, tensor_parallel_size=4)
            assert total_params(sh) == local(whole), recipe
            tp4 = Layout(tp=4, pp=1, vpp=1, dp=1, sharding="none", sp=False, recompute="none", micro_batch=1,
                         num_microbatches=1)
            spec.tensor_parallel(sharded, mesh, sequence_parallel=False)
            assert stage_params(sh, tp4, first=True, last=True).total == local(sharded), recipe
            pp2 = Layout(tp=1, pp=2, vpp=1, dp=1, sharding="none", sp=False, recompute="none", micro_batch=1,
                         num_microbatches=2)
            for first, ids in ((True, ["0", "1"]), (False, ["2", "3"])):
                stage = spec.pipeline_split(whole, ids, first=first, last=not first)
                assert stage_params(sh, pp2, first=first, last=not first).total == local(stage), (recipe, first)
    finally:
        dist.destroy_process_group()


def test_mt_nlg_530b_plan_is_the_published_layout_family():
    result = cli_main("plan", "mt-nlg-530b", "--gpus", "4480", "--gpu", "a100-80gb", "--json", "--top", "5")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["layouts"]
    best = rows[0]
    assert best["fits"] and best["memory_gib"]["peak"] <= 72
    assert (best["layout"]["tp"], best["layout"]["pp"], best["layout"]["dp"]) == (8, 35, 16)  # as published
    assert best["layout"]["micro_batch"] == 1
    assert 0.3 < best["mfu"] < 0.6  # published: 113–126 TFLOP/s of 312 (36–40%)


def test_gpt_1_3b_on_8_h100_table_explain_and_overrides_train_accepts():
    result = cli_main("plan", "gpt-1.3b", "--gpus", "8", "--gpu", "h100", "--top", "3")
    assert result.returncode == 0, result.stderr
    assert "tp1 pp1 dp8" in result.stdout.splitlines()[3]  # a 1.3B model wants no model parallelism on 8 H100s
    explained = cli_main("plan", "gpt-1.3b", "--gpus", "8", "--gpu", "h100", "--explain", "2")
    assert explained.returncode == 0 and "layout #2" in explained.stdout
    overrides = explained.stdout.split("overrides:")[1].split()
    cfg = load_config("gpt-1.3b", overrides)
    validate_parallel(cfg, 8)  # what the planner proposes, megaforge train accepts


@pytest.mark.parametrize("args,words", [
    (["gpt-1.3b", "--gpus", "8", "--gpu", "h1000"], "did you mean 'h100'"),
    (["gpt-1.3b", "--gpus", "12", "--gpu", "h100"], "not a multiple of 8 GPUs per node"),
    (["mt-nlg-530b", "--gpus", "8"], "closest"),
    (["gpt-tiny", "--gpus", "8"], "model.vocab_size is unset"),
])
def test_bad_input_is_one_line_exit_2(args, words):
    result = cli_main("plan", *args)
    assert result.returncode == 2
    assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpt_1_3b_peak_against_cuda_max_memory_allocated():
    from toolkit.models.build import build_model
    from toolkit.optim import build_optimizer
    from toolkit.registry import get_spec

    cfg = load_config("gpt-1.3b", ["trainer.micro_batch_size=1", "trainer.global_batch_size=1"])
    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with device:
        model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    batch = {"tokens": torch.randint(0, cfg.model.vocab_size, (1, cfg.model.seq_length + 1), device=device)}
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = get_spec("gpt").objective(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peak = torch.cuda.max_memory_allocated() - base
    assert memory(cfg, _single_gpu_layout(cfg)).peak == pytest.approx(peak, rel=0.10)
