"""LoRA trains under tensor parallelism (adapters split to match their column/row-parallel base),
sequence parallelism and FSDP2 (full sharding, frozen base) exactly like one process: one torchrun
launch of 4 ranks (tp2 × dp2) against a single-process reference — 3 steps of losses within rtol
1e-5, and the final adapter weights (Llama shape, adapters on all seven attention/MLP linears). The
same under pipeline parallelism (pp2, 4 micro-batches a step through 1F1B: each stage trains the
adapters of its own layers)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.parallel.helpers import LLAMA, TINY, losses, train_ok, vocab_pad, weights
from toolkit.checkpoint.reshard import saved_tensor_shapes

LORA = [*TINY, *LLAMA, "model.ffn_hidden_size=96", "trainer.max_steps=3", "peft.method=lora", "peft.rank=4",
        "peft.alpha=8", "peft.target_modules=[q,k,v,out,gate,fc1,fc2]"]


def assert_same_adapters(run: Path, ref: Path, layers: int) -> None:
    """Same 3 losses; the checkpoint holds the adapters alone (A and B of 7 linears a layer), each trained
    and equal to the single-process run's."""
    got, want = losses(run), losses(ref)
    assert len(got) == len(want) == 3
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0)
    saved = {n[len("model."):] for n in saved_tensor_shapes(run / "checkpoints" / "step_3") if n.startswith("model.")}
    assert len(saved) == layers * 7 * 2 and all(".lora_A." in n or ".lora_B." in n for n in saved)  # adapters only
    a, b = weights(run), weights(ref)
    for k in saved:  # the trained adapters (the base is rebuilt from the seed on both sides)
        assert b[k].abs().max() > 0, k
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_lora_tp2_sp_fsdp_matches_single_process(tmp_path: Path):
    ref = train_ok(tmp_path / "ref", 1, *LORA, vocab_pad(1))
    run = train_ok(tmp_path / "tp2_dp2", 4, *LORA, "parallel.tensor_model_parallel_size=2",
                   "parallel.sequence_parallel=true", "parallel.data_parallel_sharding=full", vocab_pad(2))
    assert_same_adapters(run, ref, layers=2)


def test_lora_pp2_matches_single_process(tmp_path: Path):
    ref = train_ok(tmp_path / "ref", 1, *LORA, "model.num_layers=4", vocab_pad(1))
    run = train_ok(tmp_path / "pp2", 2, *LORA, "model.num_layers=4", "parallel.pipeline_model_parallel_size=2",
                   vocab_pad(1))
    assert_same_adapters(run, ref, layers=4)
