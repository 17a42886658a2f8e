"""The proof: every parallel layout trains exactly like one process (5 steps, losses and weights).

Each layout runs through the real CLI under torchrun; its DCP checkpoint is loaded unsharded into a
single-process model and compared with the single-process reference run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.parallel.helpers import LLAMA, TINY, assert_same_run, train_ok, vocab_pad


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return train_ok(tmp_path_factory.mktemp("ref") / "run", 1, *TINY, vocab_pad(1))


@pytest.fixture(scope="module")
def llama_reference(tmp_path_factory) -> Path:
    return train_ok(tmp_path_factory.mktemp("llama_ref") / "run", 1, *TINY, *LLAMA, vocab_pad(1))


LAYOUTS = {
    "tp2": (2, ["parallel.tensor_model_parallel_size=2", vocab_pad(2)]),
    "tp2_sp": (2, ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true", vocab_pad(2)]),
    "dp2_fsdp": (2, ["parallel.data_parallel_sharding=full", vocab_pad(1)]),
    "dp2_zero2": (2, ["parallel.data_parallel_sharding=optimizer_and_grads", vocab_pad(1)]),
    "dp2_replicated": (2, ["parallel.data_parallel_sharding=none", vocab_pad(1)]),
    "tp2_dp2": (4, ["parallel.tensor_model_parallel_size=2", "parallel.data_parallel_sharding=full", vocab_pad(2)]),
    # model.fused_qkv: one process, FSDP2 (unsharded weights) and tp (each rank's columns, DTensor matmul)
    "fused_qkv": (1, ["model.fused_qkv=true", vocab_pad(1)]),
    "dp2_fsdp_fused_qkv": (2, ["parallel.data_parallel_sharding=full", "model.fused_qkv=true", vocab_pad(1)]),
    "tp2_fused_qkv": (2, ["parallel.tensor_model_parallel_size=2", "model.fused_qkv=true", vocab_pad(2)]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout: str, reference: Path, tmp_path: Path):
    nproc, extra = LAYOUTS[layout]
    run = train_ok(tmp_path / "run", nproc, *TINY, *extra)
    assert_same_run(run, reference)


def test_llama_style_tp2_sequence_parallel(llama_reference: Path, tmp_path: Path):
    """RoPE, RMSNorm, SwiGLU, no biases, untied head (column-parallel), GQA, sequence parallel."""
    run = train_ok(tmp_path / "run", 2, *TINY, *LLAMA, "parallel.tensor_model_parallel_size=2",
                   "parallel.sequence_parallel=true", vocab_pad(2))
    assert_same_run(run, llama_reference)


def test_llama_style_tp2_sequence_parallel_fused_qkv(llama_reference: Path, tmp_path: Path):
    """model.fused_qkv under tp2 + sequence parallelism with GQA and RoPE: each rank's q, k, v columns in one matmul."""
    run = train_ok(tmp_path / "run", 2, *TINY, *LLAMA, "parallel.tensor_model_parallel_size=2",
                   "parallel.sequence_parallel=true", "model.fused_qkv=true", vocab_pad(2))
    assert_same_run(run, llama_reference)
