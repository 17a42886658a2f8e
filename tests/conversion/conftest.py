"""Shared builders for the conversion tests: tiny random models on both sides."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from toolkit.checkpoint import CheckpointManager
from toolkit.config import ModelConfig, RunConfig, save_config
from toolkit.tokenization import load_tokenizer
from toolkit.training.run import build_initialized_model

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

#: tiny model shapes shared by the tests (vocabulary 1000: not a multiple of 128)
GPT2_STYLE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32, max_position_embeddings=64,
                  position_embedding_type="learned_absolute", normalization="LayerNorm", activation="gelu_tanh",
                  hidden_dropout=0.0, attention_dropout=0.0)
LLAMA_STYLE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
                   seq_length=32, max_position_embeddings=64, position_embedding_type="rope", rotary_base=50000.0,
                   normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
                   share_embeddings_and_output_weights=False, hidden_dropout=0.0, attention_dropout=0.0)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP waits dominate."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter, so zero biases and unit norms are not hiding mapping mistakes."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * std)
    return model


def hf_config(kind: str, **kw):
    if kind == "gpt2":
        base = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=1000, n_positions=64, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2Config(**{**base, **kw})
    base = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                intermediate_size=48, max_position_embeddings=64, rope_theta=50000.0, rms_norm_eps=1e-5,
                bos_token_id=0, eos_token_id=0)
    return transformers.LlamaConfig(**{**base, **kw})


def save_hf_model(kind: str, folder: Path, seed: int = 0, **kw):
    """A tiny random transformers model saved with ``save_pretrained``; returns the model (eval)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(kind, **kw))
    perturb(model, seed).eval()
    model.save_pretrained(folder)
    return model


def make_run(folder: Path, model_kw: dict, *, tokenizer: str = "english-bpe", seed: int = 0,
             vocab_size: int | None = None) -> tuple[Path, torch.nn.Module]:
    """A run directory (config.yaml, tokenizer/, checkpoints/step_1) holding a tiny random model."""
    tok = load_tokenizer(tokenizer)
    cfg = RunConfig(name=folder.name, model=ModelConfig(**model_kw, vocab_size=vocab_size or tok.vocab_size))
    folder.mkdir(parents=True, exist_ok=True)
    save_config(cfg, folder / "config.yaml")
    tok.save(folder / "tokenizer")
    model = perturb(build_initialized_model(cfg, torch.device("cpu")), seed).eval()
    with warnings.catch_warnings():  # DCP notes it runs without a process group: on purpose here
        warnings.simplefilter("ignore", UserWarning)
        CheckpointManager(folder / "checkpoints").save(1, model, None, {"step": 1})
    return folder, model


@torch.no_grad()
def max_logit_diff(ours: torch.nn.Module, theirs: torch.nn.Module, vocab: int, seed: int = 0) -> float:
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))
    a = ours(ids)[..., :vocab]
    b = theirs(input_ids=ids).logits if hasattr(theirs, "config") else theirs(ids)[..., :vocab]
    return float((a - b).abs().max())
