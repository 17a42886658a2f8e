"""BERT (post-LN) and GatorTron (pre-LN) train under pipeline parallelism exactly like one process.

5 steps through the real CLI under torchrun (fp32, no dropout, 4 micro-batches per step for 1F1B):
losses within rtol 1e-5, the final weights (the DCP checkpoint loaded into a single-process model),
the clipped grad norm (the word embedding, held by the first stage and — tied to the MLM
projection — by the last, counts once), and the validation loss of the evaluation at step 5 (run
through the pipeline too). Every stage masks padding: the padding mask reaches each one.

* ``bert-tiny`` pp2: post-LN, embedding norm on the first stage, MLM + next-sentence heads on the last;
* ``gatortron-tiny`` tp2 × pp2 with sequence parallelism: pre-LN, final norm on the last stage,
  sequence-sharded hidden states passed stage to stage, vocab-parallel tied MLM projection.

In one process (no launcher): the two stages of the split compose to the full model's outputs
exactly, and the last stage's outputs change without the padding mask (so it must reach every stage).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.parallel.helpers import assert_same_run, train_recipe_ok, vocab_pad

# 2 layers (one per stage); micro 2 × global 8: 4 micro-batches per step (1F1B needs ≥ pp); one
# evaluation of 2 micro-batches at step 5
COMMON = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
          "model.seq_length=32", "model.hidden_dropout=0.0", "model.attention_dropout=0.0",
          "trainer.micro_batch_size=2", "trainer.global_batch_size=8", "trainer.max_steps=5",
          "trainer.eval_interval=5", "trainer.eval_iters=2", "checkpoint.save_interval=0", "optim.lr=1e-2",
          "optim.lr_warmup_steps=0", "optim.clip_grad=0.5", "optim.adam_eps=1e-4", "logging.wandb.enabled=false",
          "logging.progress_bar=false", "logging.plot=false", "trainer.num_threads=1"]
PP2 = "parallel.pipeline_model_parallel_size=2"
CASES = {  # name → (recipe, overrides of both runs, nproc, layout overrides)
    "bert_pp2": ("bert-tiny", ["model.vocab_size=8193"], 2, [PP2, vocab_pad(1)]),
    "gatortron_tp2_sp_pp2": ("gatortron-tiny", ["model.vocab_size=2971"], 4,
                             [PP2, "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
                              vocab_pad(2)]),
}


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_matches_single_process(case: str, tmp_path: Path):
    recipe, overrides, nproc, layout = CASES[case]
    ref = train_recipe_ok(recipe, tmp_path / "ref", 1, *COMMON, *overrides, vocab_pad(1))
    run = train_recipe_ok(recipe, tmp_path / "run", nproc, *COMMON, *overrides, *layout)
    assert_same_run(run, ref)
    got, want = records(run), records(ref)
    # grad norm: one process measures it in fp32 foreach (bert-tiny step 1: 7.5e-5 below the float64
    # norm, which the pipeline run matches to 1e-8); a word embedding counted twice or not at all is
    # off by far more
    assert got[0]["grad_norm"] == pytest.approx(want[0]["grad_norm"], rel=2e-4)
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in want], rel=1e-3)
    assert got[-1]["val_loss"] == pytest.approx(want[-1]["val_loss"], rel=1e-5)
    state = json.loads((run / "checkpoints" / "step_5" / "trainer_state.json").read_text())
    assert state["layout"]["pp"] == 2
    # the first and the last stage hold embed.tokens.weight (and its Adam state); DCP stores it once
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(run / "checkpoints" / "step_5")).read_metadata().state_dict_metadata
    tp = state["layout"]["tp"]
    for key in ("model.embed.tokens.weight", "optim.state.embed.tokens.weight.exp_avg"):
        assert len(saved[key].chunks) == tp, key  # one chunk per vocab-parallel shard


@pytest.mark.parametrize("recipe", ["bert-tiny", "gatortron-tiny"])
def test_stages_compose_to_the_model(recipe: str):
    """In one process: stage 0 then stage 1 of the split give the full model's outputs exactly; the
    last stage holds a copy of the word embedding (not the first stage's tensor); and the padding mask
    matters on the last stage (without it the outputs differ), so it must reach every stage."""
    import torch

    from toolkit.config import load_config
    from toolkit.models.bert import BertModel
    from toolkit.models.bert.parallelize import pipeline_split_bert

    cfg = load_config(recipe, ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2",
                               "model.ffn_hidden_size=64", "model.vocab_size=100", "model.seq_length=16",
                               "model.init_method_std=0.5"])  # large weights: attention far from uniform
    model = BertModel(cfg.model)
    model.init_weights(seed=0)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 100, (3, 16), generator=gen)  # [b, s]
    token_types = (torch.arange(16) >= 8).long().expand(3, 16)  # [b, s]
    padding_mask = (torch.arange(16) < torch.tensor([[16], [10], [5]])).long()  # [b, s]: 0, 6 and 11 pad tokens
    first = pipeline_split_bert(model, ["0"], first=True, last=False)
    last = pipeline_split_bert(model, ["1"], first=False, last=True)
    assert {n.split(".")[0] for n, _ in first.named_parameters()} == {"embed", "layers"}
    assert {n for n, _ in last.named_parameters() if n.startswith("embed")} == {"embed.tokens.weight"}
    assert last.embed.tokens.weight is not model.embed.tokens.weight
    assert torch.equal(last.embed.tokens.weight, model.embed.tokens.weight)
    with torch.no_grad():
        want = model(tokens, token_types=token_types, padding_mask=padding_mask)
        h = first(tokens, token_types=token_types, padding_mask=padding_mask)  # [b, s, hidden]
        mlm_logits, binary_logits = last(h, token_types=token_types, padding_mask=padding_mask)
        unmasked, _ = last(h, token_types=token_types)
    assert torch.equal(mlm_logits, want["mlm_logits"]) and torch.equal(binary_logits, want["binary_logits"])
    real = padding_mask.bool()  # at real tokens, over the real vocabulary (padded columns are -inf)
    assert (unmasked[real][:, :100] - mlm_logits[real][:, :100]).abs().max() > 1e-2
