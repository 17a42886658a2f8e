"""Sharded initialization: build on ``meta``, apply the layout, materialize only this rank's shards —
and start bitwise equal to one process under every layout.

The layouts are checked by one ``torchrun`` launch of two CPU ranks (gloo) running this module as a
script (``python -m tests.parallel.test_meta_init``): for each layout it builds the parts with
``build_model_parts`` and compares every parameter's local shard, bitwise, with the matching slice
of the single-process model (``build_initialized_model``), gathered back with ``full_tensor`` for
DTensors. The memory check runs in process on a fake two-rank process group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import REPO
from tests.parallel.helpers import LLAMA, TINY, _free_port, vocab_pad

# (name, recipe, overrides): every layout a 2-rank world allows, over the three families
BERT = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2", "model.seq_length=16",
        "model.vocab_size=1000", "trainer.micro_batch_size=2", "trainer.global_batch_size=4"]
T5 = ["model.vocab_size=1000", "trainer.micro_batch_size=2", "trainer.global_batch_size=4"]
LAYOUTS = [
    ("gpt-tp2-sp", "gpt-tiny", [*TINY, vocab_pad(2), "parallel.tensor_model_parallel_size=2",
                                "parallel.sequence_parallel=true"]),
    ("gpt-llama-tp2", "gpt-tiny", [*TINY, *LLAMA, vocab_pad(2), "parallel.tensor_model_parallel_size=2"]),
    ("gpt-pp2-tied", "gpt-tiny", [*TINY, vocab_pad(1), "parallel.pipeline_model_parallel_size=2"]),
    ("gpt-llama-pp2", "gpt-tiny", [*TINY, *LLAMA, vocab_pad(1), "parallel.pipeline_model_parallel_size=2"]),
    ("gpt-dp2-full", "gpt-tiny", [*TINY, vocab_pad(1), "parallel.data_parallel_sharding=full"]),
    ("gpt-dp2-none", "gpt-tiny", [*TINY, vocab_pad(1), "parallel.data_parallel_sharding=none"]),
    ("bert-tp2-sp", "bert-tiny", [*BERT, "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]),
    ("bert-pp2", "bert-tiny", [*BERT, "parallel.pipeline_model_parallel_size=2"]),
    ("t5-tp2", "t5-tiny", [*T5, "parallel.tensor_model_parallel_size=2"]),
    ("t5-dp2-full", "t5-tiny", [*T5, "parallel.data_parallel_sharding=full"]),
]


def _runtime(cfg, world_size: int):
    """A runtime for ``cfg`` over an already joined process group (one group for every layout)."""
    from toolkit.parallel.mesh import ParallelDims, build_mesh
    from toolkit.parallel.runtime import ParallelRuntime

    p = cfg.parallel
    dims = ParallelDims(world_size=world_size, tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size,
                        vpp=p.virtual_pipeline_model_parallel_size or 1)
    device = torch.device("cpu")
    return ParallelRuntime(dims=dims, mesh=build_mesh(dims, device), rank=torch.distributed.get_rank(),
                           device=device, sequence_parallel=p.sequence_parallel,
                           data_parallel_sharding=p.data_parallel_sharding, pipeline_schedule=p.pipeline_schedule)


def _worker(out_dir: Path) -> None:
    """Under torchrun: every layout's parts against the single-process model, parameter by parameter."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from toolkit.config import load_config
    from toolkit.models.build import build_initialized_model
    from toolkit.training.run import build_model_parts

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    report: dict[str, dict] = {}
    for name, recipe, overrides in LAYOUTS:
        cfg = load_config(recipe, overrides)
        reference = dict(build_initialized_model(cfg, torch.device("cpu")).named_parameters())
        parts, _, _ = build_model_parts(cfg, _runtime(cfg, world))
        seen, mismatched, sharded = [], [], 0
        for part in parts:
            for pname, param in part.named_parameters():
                got = param.full_tensor() if isinstance(param, DTensor) else param.detach()
                sharded += isinstance(param, DTensor) and param.to_local().numel() < param.numel()
                seen.append(pname)
                if not torch.equal(got, reference[pname].detach()):
                    mismatched.append(pname)
        report[name] = {"params": seen, "mismatched": mismatched, "sharded": sharded,
                        "devices": sorted({str(p.device) for part in parts for p in part.parameters()})}
        dist.barrier()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def layout_reports(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("meta_init")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "tests.parallel.test_meta_init", str(out)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("layout", [name for name, _, _ in LAYOUTS])
def test_every_layout_starts_bitwise_equal_to_one_process(layout_reports, layout):
    reports = [r[layout] for r in layout_reports]
    for rank, r in enumerate(reports):
        assert r["params"], f"rank {rank} holds no parameter"
        assert not r["mismatched"], f"rank {rank}: {r['mismatched'][:5]} differ from the single-process init"
        assert r["devices"] == ["cpu"]
    if "pp2" in layout:  # the stages split the model between them (a tied embedding is held by both)
        assert set(reports[0]["params"]) != set(reports[1]["params"])
        if "tied" in layout or "bert" in layout:
            assert "embed.tokens.weight" in set(reports[0]["params"]) & set(reports[1]["params"])
    elif "dp2-none" not in layout:  # replicated data parallel keeps whole parameters
        assert all(r["sharded"] > 0 for r in reports)  # really sharded


# ---- in process --------------------------------------------------------------------------------------
def _tiny_gpt(*extra: str):
    from toolkit.config import load_config

    return load_config("gpt-tiny", [*TINY, *extra])


def test_keyed_init_is_deterministic_and_order_independent():
    from toolkit.models.build import build_initialized_model, build_meta_model
    from toolkit.models.common.init import full_init, init_rules_check, param_seed

    cfg = _tiny_gpt(*LLAMA)
    a = dict(build_initialized_model(cfg, torch.device("cpu")).named_parameters())
    b = dict(build_initialized_model(cfg, torch.device("cpu")).named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a)
    # each parameter alone, from its name and the seed (no other parameter, no visiting order)
    meta = build_meta_model(cfg)
    rules = meta.init_rules()
    init_rules_check(meta, rules)
    for name in reversed(list(a)):
        assert torch.equal(full_init(rules[name], name, cfg.trainer.seed, a[name].shape), a[name].detach()), name
    # another seed, other weights; distinct parameters of one shape, distinct draws
    c = dict(build_initialized_model(_tiny_gpt(*LLAMA, "trainer.seed=1"), torch.device("cpu")).named_parameters())
    assert not torch.equal(a["layers.0.attn.q.weight"], c["layers.0.attn.q.weight"])
    assert not torch.equal(a["layers.0.attn.q.weight"], a["layers.1.attn.q.weight"])
    assert param_seed(1234, "embed.tokens.weight") == 8096598136336990695  # pinned: stable across processes and versions
    # the family's rules: std, scaled residual outputs, zero biases, unit norms
    assert rules["layers.0.attn.q.weight"].std == cfg.model.init_method_std
    assert rules["layers.1.mlp.fc2.weight"].std == pytest.approx(cfg.model.init_method_std / 2.0)
    assert rules["final_norm.weight"].kind == "ones"
    d = dict(build_initialized_model(_tiny_gpt(), torch.device("cpu")).named_parameters())
    assert (d["layers.0.attn.q.bias"] == 0).all() and (d["layers.0.attn_norm.weight"] == 1).all()


def test_every_family_has_a_rule_for_every_parameter():
    from toolkit.config import load_config
    from toolkit.models.build import build_meta_model
    from toolkit.models.common.init import init_rules_check

    for recipe, overrides in [("gpt-tiny", TINY), ("bert-tiny", BERT), ("t5-tiny", T5),
                              ("t5-tiny", [*T5, "model.share_embeddings_and_output_weights=false"]),
                              ("bert-tiny", [*BERT, "task.type=sequence_classification", "task.labels=[a,b,c]"])]:
        model = build_meta_model(load_config(recipe, overrides))
        init_rules_check(model, model.init_rules())


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of the live storages created by ops on a real device (DTensors: their local shard),
    and the largest single allocation. A storage counts until it is freed (``weakref.finalize``)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest = 0
        self.seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = getattr(t, "_local_tensor", t).untyped_storage()
            key = id(storage)
            if key in self.seen:  # a view of a tracked storage
                continue
            self.seen.add(key)
            self.live += storage.nbytes()
            self.largest = max(self.largest, storage.nbytes())
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, storage.nbytes())
        return out


def test_sharded_set_up_holds_the_shard_plus_one_parameter():
    """tp2 × dp2 (FSDP2) on a fake four-rank process group, in process: during the set-up this rank
    never holds more than its shards plus about one full parameter — never the whole model."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from toolkit.models.build import build_meta_model
    from toolkit.training.run import build_model_parts

    cfg = _tiny_gpt(vocab_pad(2), "model.num_layers=8", "model.hidden_size=128", "model.vocab_size=1000",
                    "parallel.tensor_model_parallel_size=2", "parallel.data_parallel_sharding=full")
    full = build_meta_model(cfg)
    total = sum(p.numel() for p in full.parameters()) * 4
    largest = max(p.numel() for p in full.parameters()) * 4
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    try:
        with _LiveBytes() as mode:
            parts, _, _ = build_model_parts(cfg, _runtime(cfg, 4))
    finally:
        dist.destroy_process_group()
    held = sum(p.to_local().numel() for part in parts for p in part.parameters()) * 4
    assert held < total / 3  # tp2 × dp2: about a quarter (norms stay whole on the tp ranks)
    assert mode.largest <= largest  # one full parameter at a time, at most
    # the shards, plus one full draw at a time (and small index/bias temporaries)
    assert mode.peak <= held + largest * 5 // 4, (mode.peak, held, largest, total)
    assert mode.peak < total / 2  # the old set-up materialized the whole model on every rank


if __name__ == "__main__":  # the torchrun worker of layout_reports
    _worker(Path(sys.argv[1]))
