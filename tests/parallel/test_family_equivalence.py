"""BERT (post-LN) and T5 (v1.0 and v1.1) train under tensor, sequence and data parallelism exactly
like one process: 5 steps of losses within rtol 1e-5 and the final weights. (GatorTron, pre-LN,
runs tp2 + sp + pp2 in test_bert_pipeline.py.)

Each layout runs the real CLI under torchrun (fp32, no dropout, gradient accumulation over 4 or 2
micro-batches); its DCP checkpoint is loaded unsharded into a single-process model and compared
with the single-process reference run. Vocabulary sizes are odd (not divisible by tp) and padded to
the same size in every layout (``vocab_pad``). Masking and span corruption are pure functions of
(seed, sample index), so every rank of a layout sees the samples of the reference run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.parallel.helpers import assert_same_run, train_recipe_ok, vocab_pad

COMMON = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
          "model.seq_length=32", "model.hidden_dropout=0.0", "model.attention_dropout=0.0",
          "trainer.micro_batch_size=2", "trainer.global_batch_size=8", "trainer.max_steps=5",
          "trainer.eval_interval=0", "checkpoint.save_interval=0", "optim.lr=1e-2", "optim.lr_warmup_steps=0",
          "optim.clip_grad=0.5", "optim.adam_eps=1e-4", "logging.wandb.enabled=false",
          "logging.progress_bar=false", "logging.plot=false", "trainer.num_threads=1"]
# recipe and its overrides: odd vocabularies (tokenizers: 8192 WordPiece, 8000 SentencePiece)
FAMILIES = {
    "bert": ("bert-tiny", [*COMMON, "model.vocab_size=8193"]),
    "t5": ("t5-tiny", [*COMMON, "model.num_decoder_layers=2", "model.kv_channels=16",
                       "model.decoder_seq_length=8", "model.vocab_size=8001"]),
}
# T5 v1.1: gated-GELU MLP (fc1 and gate column-parallel) and an untied, column-parallel head
T5_V11 = ["model.activation=geglu", "model.share_embeddings_and_output_weights=false"]
TP2 = ["parallel.tensor_model_parallel_size=2", vocab_pad(2)]
SP = ["parallel.sequence_parallel=true"]
DP2 = ["parallel.data_parallel_sharding=full", vocab_pad(1)]

# Tensor parallelism alone is in the tp2 + sp cases (sequence parallel adds to TP, it does not
# replace it); GatorTron's tp2 + sp runs with pp2 in test_bert_pipeline.py.
CASES = {  # name → (family, extra reference overrides, nproc, layout overrides)
    "bert_tp2_sp": ("bert", [], 2, TP2 + SP),
    "bert_dp2_fsdp": ("bert", [], 2, DP2),
    "t5_tp2": ("t5", [], 2, TP2),
    "t5_dp2_fsdp": ("t5", [], 2, DP2),
    "t5_v1_1_tp2_sp": ("t5", T5_V11, 2, TP2 + SP),
}

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Single-process run of a family (with extra overrides), made once per module and shared."""
    runs: dict[tuple[str, tuple[str, ...]], Path] = {}

    def get(family: str, extra: list[str]) -> Path:
        key = (family, tuple(extra))
        if key not in runs:
            recipe, overrides = FAMILIES[family]
            run = tmp_path_factory.mktemp(f"ref_{family}") / "run"
            runs[key] = train_recipe_ok(recipe, run, 1, *overrides, *extra, vocab_pad(1))
        return runs[key]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_layout_matches_single_process(case: str, reference, tmp_path: Path):
    family, extra, nproc, layout = CASES[case]
    recipe, overrides = FAMILIES[family]
    ref = reference(family, extra)
    run = train_recipe_ok(recipe, tmp_path / "run", nproc, *overrides, *extra, *layout)
    assert_same_run(run, ref)


def test_t5_sequence_parallel_needs_divisible_decoder_length():
    """t5-tiny's 29 target tokens cannot be sequence-sharded over 2 ranks: one line, before any process group."""
    from toolkit.config import load_config
    from toolkit.errors import ParallelConfigError
    from toolkit.parallel import validate_parallel

    cfg = load_config("t5-tiny", ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"])
    with pytest.raises(ParallelConfigError, match=r"model.decoder_seq_length=29 is not divisible by "
                                                  r"parallel.tensor_model_parallel_size=2"):
        validate_parallel(cfg, 2)
    validate_parallel(load_config("t5-tiny", ["parallel.tensor_model_parallel_size=2"]), 2)  # tp alone is fine
    validate_parallel(load_config("bert-tiny", ["parallel.tensor_model_parallel_size=2",
                                                "parallel.sequence_parallel=true"]), 2)
