"""Reshard on load: a checkpoint written under one layout continues under another — model and
optimizer state, including the vocabulary padding that depends on tp — exactly like the
continuation under the layout that wrote it.

Each source run trains 3 of 5 steps (``trainer.exit_interval=3``) and stops; copies of its run
directory are continued under other layouts. The main source is tp2 × pp2 (4 processes): its
checkpoint continues at tp1 (one process), dp2 FSDP2 and pp2 × vpp2 (interleaved), each compared
with the continuation at tp2 × pp2. The default ``make_vocab_size_divisible_by=128`` pads
the 8193-token vocabulary to 8320 rows at tp=1 and 8448 at tp=2, so moving between them re-lays the
embedding rows and their Adam moments.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.parallel.helpers import TINY, launch, losses, train_ok, weights

VOCAB = 8193

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
COMMON = [*TINY, "model.make_vocab_size_divisible_by=128", "model.num_layers=4"]
TP2 = ["parallel.tensor_model_parallel_size=2"]
TP2_PP2 = [*TP2, "parallel.pipeline_model_parallel_size=2"]
CONTINUE_AS = {
    "tp1": (1, []),
    "dp2_fsdp": (2, ["parallel.data_parallel_sharding=full"]),
    "pp2_vpp2": (2, ["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2"]),
}


def assert_same_run(run: Path, ref: Path) -> None:
    """Losses within rtol 1e-5; weights too, over the real vocabulary rows (the padding differs)."""
    torch.testing.assert_close(torch.tensor(losses(run)), torch.tensor(losses(ref)), rtol=1e-5, atol=0)
    a, b = weights(run), weights(ref)
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if x.shape != y.shape:  # vocabulary-padded tensors: compare the real rows, padding is never used
            assert x.shape[1:] == y.shape[1:] and min(x.shape[0], y.shape[0]) >= VOCAB, k
            x, y = x[:VOCAB], y[:VOCAB]
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def _stop_at_3(run: Path, nproc: int, *layout: str) -> Path:
    return train_ok(run, nproc, *COMMON, *layout, "trainer.exit_interval=3")


def _continue(src: Path, dst: Path, nproc: int, *layout: str) -> Path:
    shutil.copytree(src, dst)
    run = train_ok(dst, nproc, *COMMON, *layout)
    out = (dst / "metrics.jsonl").read_text()
    assert out.count('"step"') == 5
    return run


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Steps 1–3 at tp2 × pp2 (vocabulary padded to 8448 rows)."""
    return _stop_at_3(tmp_path_factory.mktemp("src") / "run", 4, *TP2_PP2)


@pytest.fixture(scope="module")
def continued(source: Path, tmp_path_factory) -> Path:
    """The unresharded continuation: the same layout that wrote the checkpoint."""
    return _continue(source, tmp_path_factory.mktemp("same") / "run", 4, *TP2_PP2)


@pytest.mark.parametrize("layout", list(CONTINUE_AS))
def test_tp2_pp2_checkpoint_continues_under(layout: str, source: Path, continued: Path, tmp_path: Path):
    nproc, extra = CONTINUE_AS[layout]
    run = _continue(source, tmp_path / "run", nproc, *extra)
    assert_same_run(run, continued)


def test_tp2_dp2_fsdp_resumes_exactly_and_from_a_single_process_checkpoint(tmp_path: Path):
    """2-D (dp × tp) FSDP2-over-TP sharding: a run resumed from its own step-3 checkpoint ends bitwise
    like the run that went straight through; and a single-process checkpoint (tp=1 padding, 8320 rows)
    grows to tp=2 padding (8448) and continues like the single process does."""
    import json

    layout = [*TP2, "parallel.data_parallel_sharding=full"]
    straight = train_ok(tmp_path / "straight", 4, *COMMON, *layout, "checkpoint.save_interval=3")
    resumed = tmp_path / "resumed"  # the straight run as it was after step 3: the same files, step_5 not yet written
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_5")
    (resumed / "checkpoints" / "latest").write_text("step_3\n")
    (resumed / "metrics.jsonl").write_text("".join((straight / "metrics.jsonl").read_text().splitlines(True)[:3]))
    train_ok(resumed, 4, *COMMON, *layout)
    assert losses(resumed) == losses(straight)
    a, b = weights(resumed), weights(straight)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    state = json.loads((resumed / "checkpoints" / "step_5" / "trainer_state.json").read_text())
    assert state["layout"] == {"tp": 2, "pp": 1, "dp": 2}

    src = _stop_at_3(tmp_path / "src", 1)
    same = _continue(src, tmp_path / "same", 1)
    run = _continue(src, tmp_path / "run", 4, *layout)
    assert_same_run(run, same)


def test_resume_prints_the_layout_change(source: Path, tmp_path: Path):
    dst = tmp_path / "run"
    shutil.copytree(source, dst)
    out = launch(dst, 1, *COMMON)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "saved under {'tp': 2, 'pp': 2, 'dp': 1}, now {'tp': 1, 'pp': 1, 'dp': 1}" in out.stdout
    assert "vocabulary padding re-laid in" in out.stdout


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_init_from_hugging_face_under_tp2(tmp_path: Path):
    """``checkpoint.init_from`` loads an HF model into a tensor-parallel run (vocabulary 8193, imported
    with 8320 rows, re-padded to 8448 for tp=2): with lr 0 the final checkpoint is the HF model."""
    from tests.conversion.conftest import GPT2_STYLE, make_run
    from tests.integration.test_init_from import FROZEN, _logit_diff
    from toolkit.convert.hf import export_hf

    run, _ = make_run(tmp_path / "src", GPT2_STYLE, vocab_size=8193)
    hf = export_hf(run, tmp_path / "hf")
    out = launch(tmp_path / "run", 2, *[o for o in FROZEN if not o.startswith("trainer.num_threads")],
                 "parallel.tensor_model_parallel_size=2", f"checkpoint.init_from={hf}",
                 env={"MEGAFORGE_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "vocabulary padding re-laid in" in out.stdout
    assert _logit_diff(tmp_path / "run", hf) <= 1e-4
