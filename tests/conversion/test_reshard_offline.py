"""Offline resharding: ``megaforge convert SRC OUT --to megaforge --tensor-parallel N``.

The result is laid out for tp=N (vocabulary padded to a multiple of 128·N), keeps the real rows of
every tensor (weights and Adam moments) bit for bit, and an HF → megaforge (tp=2) → HF round trip
gives back identical tensors.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import run_cli
from tests.conversion.conftest import GPT2_STYLE, LLAMA_STYLE, assert_same_safetensors, make_run, save_hf_model
from toolkit.checkpoint import CheckpointManager, load_megaforge_model
from toolkit.checkpoint.reshard import has_optimizer_state
from toolkit.config import load_config
from toolkit.convert import convert
from toolkit.errors import CheckpointError, ParallelConfigError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
VOCAB = 1100  # padded to 1152 at tp=1 (9 × 128) and 1280 at tp=2 (5 × 256)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hf_to_megaforge_at_tp2_and_back_is_bit_identical(kind, tmp_path):
    save_hf_model(kind, tmp_path / "hf", vocab_size=VOCAB)
    out = convert(tmp_path / "hf", tmp_path / "mf", to="megaforge", tensor_parallel=2)
    cfg = load_config(str(out / "config.yaml"))
    assert cfg.parallel.tensor_model_parallel_size == 2
    ours, _, _ = load_megaforge_model(out)  # built for tp=2 from its config: 1280 rows
    assert ours.padded_vocab_size == 1280 and ours.embed.tokens.weight.shape[0] == 1280
    convert(out, tmp_path / "back", to="hf")
    assert_same_safetensors(tmp_path / "hf", tmp_path / "back")


def _with_optimizer_state(run, model_kw):
    """Give a run's checkpoint Adam moments (two optimizer steps on random data)."""
    from toolkit.optim import build_optimizer

    model, cfg, _ = load_megaforge_model(run)
    model.train()
    opt = build_optimizer(model, cfg.optim)
    for seed in range(2):
        ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(seed))
        model(ids)[..., :VOCAB].logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    CheckpointManager(run / "checkpoints").save(2, model, opt, {"step": 2, "consumed_samples": 16})
    return model, opt


def test_cli_reshards_model_and_optimizer_state(tmp_path):
    run, _ = make_run(tmp_path / "run", LLAMA_STYLE, vocab_size=VOCAB)
    model, opt = _with_optimizer_state(run, LLAMA_STYLE)
    out = run_cli("convert", str(run), str(tmp_path / "tp2"), "--to", "megaforge", "--tensor-parallel", "2")
    assert out.returncode == 0, out.stderr
    assert "vocabulary padding re-laid in" in out.stdout
    dst = tmp_path / "tp2"
    step = CheckpointManager(dst / "checkpoints").latest()
    assert step.name == "step_2" and has_optimizer_state(step)
    cfg = load_config(str(dst / "config.yaml"))
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.trainer.run_dir == str(dst)

    # load it back (model + optimizer, built for tp=2) and compare every real row with the source
    from toolkit.models.build import build_model
    from toolkit.optim import build_optimizer

    with torch.device("meta"):
        new = build_model(cfg.model, tensor_parallel_size=2)
    new.to_empty(device="cpu")
    new_opt = build_optimizer(new, cfg.optim)
    state = CheckpointManager(step.parent).load(step, new, new_opt)
    assert state["layout"]["tp"] == 2 and not state["repadded"]  # already laid out for tp=2
    old_params, new_params = dict(model.named_parameters()), dict(new.named_parameters())
    for name, p in old_params.items():
        q = new_params[name]
        if q.shape != p.shape:
            assert q.shape[0] == 1280 and p.shape[0] == 1152, name
            assert torch.equal(q[:VOCAB], p[:VOCAB]) and not q[1152:].any(), name
            for key in ("exp_avg", "exp_avg_sq"):
                a, b = opt.state[p][key], new_opt.state[q][key]
                assert torch.equal(b[:VOCAB], a[:VOCAB]) and not b[1152:].any(), (name, key)
        else:
            assert torch.equal(q, p), name
            assert torch.equal(new_opt.state[q]["exp_avg"], opt.state[p]["exp_avg"]), name


def test_bad_layout_and_output_are_one_line_errors(tmp_path):
    run, _ = make_run(tmp_path / "run", GPT2_STYLE, vocab_size=VOCAB)
    with pytest.raises(ParallelConfigError, match="num_attention_heads=4 is not divisible"):
        convert(run, tmp_path / "tp3", to="megaforge", tensor_parallel=3)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(CheckpointError, match="not empty"):
        convert(run, tmp_path / "full", to="megaforge", tensor_parallel=2)
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    with pytest.raises(CheckpointError, match="apply to --to megaforge"):
        convert(run, tmp_path / "hf", to="hf", tensor_parallel=2)
    out = run_cli("convert", str(run), str(tmp_path / "tp3"), "--to", "megaforge", "--tensor-parallel", "3")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
