"""Shared builders for the conversion tests: tiny random models on both sides."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from toolkit.checkpoint import CheckpointManager
from toolkit.config import ModelConfig, RunConfig, save_config
from toolkit.models.build import build_initialized_model
from toolkit.tokenization import load_tokenizer

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
BERT_STYLE = dict(family="bert", num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, seq_length=32,
                  max_position_embeddings=64, layernorm_position="post", layernorm_epsilon=1e-12, activation="gelu",
                  hidden_dropout=0.0, attention_dropout=0.0)
MEGATRON_BERT_STYLE = dict(BERT_STYLE, layernorm_position="pre")  # GatorTron's layout
T5_V10_STYLE = dict(family="t5", num_layers=2, num_decoder_layers=3, hidden_size=32, num_attention_heads=4,
                    kv_channels=6, ffn_hidden_size=48, seq_length=32, position_embedding_type="relative",
                    relative_attention_num_buckets=8, relative_attention_max_distance=20, normalization="RMSNorm",
                    layernorm_epsilon=1e-6, activation="relu", add_bias_linear=False,
                    share_embeddings_and_output_weights=True, hidden_dropout=0.0, attention_dropout=0.0)
T5_V11_STYLE = dict(T5_V10_STYLE, num_decoder_layers=2, kv_channels=None, activation="geglu",
                    share_embeddings_and_output_weights=False)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every conversion test runs on one torch thread (see tests/conftest.py)."""
    yield


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter, so zero biases and unit norms are not hiding mapping mistakes."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * std)
    return model


#: kind → the transformers class save_hf_model builds (tiny configs from hf_config)
HF_CLASSES = {"gpt2": "AutoModelForCausalLM", "llama": "AutoModelForCausalLM", "bert": "BertForPreTraining",
              "bert-mlm": "BertForMaskedLM", "megatron-bert": "MegatronBertForPreTraining",
              "megatron-bert-mlm": "MegatronBertForMaskedLM", "bert-headless": "BertModel",
              "megatron-bert-headless": "MegatronBertModel", "bert-token": "BertForTokenClassification",
              "megatron-bert-token": "MegatronBertForTokenClassification",
              "bert-sequence": "BertForSequenceClassification",
              "megatron-bert-sequence": "MegatronBertForSequenceClassification", "t5": "T5ForConditionalGeneration",
              "t5-v1_1": "T5ForConditionalGeneration"}


def hf_config(kind: str, **kw):
    if kind.startswith(("bert", "megatron-bert")):
        cls = transformers.MegatronBertConfig if kind.startswith("megatron") else transformers.BertConfig
        base = dict(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                    max_position_embeddings=64, type_vocab_size=2, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, pad_token_id=0)
        return cls(**{**base, **kw})
    if kind.startswith("t5"):
        v11 = kind == "t5-v1_1"
        base = dict(vocab_size=1000, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
                    relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
                    feed_forward_proj="gated-gelu" if v11 else "relu", tie_word_embeddings=not v11,
                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        return transformers.T5Config(**{**base, **kw})
    if kind == "gpt2":
        base = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=1000, n_positions=64, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2Config(**{**base, **kw})
    base = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                intermediate_size=48, max_position_embeddings=64, rope_theta=50000.0, rms_norm_eps=1e-5,
                bos_token_id=0, eos_token_id=0)
    return transformers.LlamaConfig(**{**base, **kw})


def save_hf_model(kind: str, folder: Path, seed: int = 0, **kw):
    """A tiny random transformers model saved with ``save_pretrained``; returns the model (eval).

    ``t5-v1_1`` gets its own ``lm_head`` (as google/t5-v1_1-* have): transformers 5 ties it to
    ``shared`` whatever the config says, so it is replaced by a separate parameter here.
    """
    torch.manual_seed(seed)
    config = hf_config(kind, **kw)
    cls = getattr(transformers, HF_CLASSES[kind])
    model = cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
    if kind == "t5-v1_1" and model.lm_head.weight is model.shared.weight:
        model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
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


def probe_batch(vocab: int, seed: int = 0, b: int = 2, s: int = 12):
    """ids [b, s], token types (segment B from the middle) and a padding mask (last row: 3 pads)."""
    ids = torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))
    types = (torch.arange(s) >= s // 2).long().expand(b, s)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[-1, -3:] = 0
    return ids, types, mask


def hf_mlm_outputs(hf_model, ids, types, mask) -> tuple[torch.Tensor, torch.Tensor | None]:
    """MLM logits (and NSP logits of *ForPreTraining, else None) of a transformers BERT."""
    out = hf_model(input_ids=ids, token_type_ids=types, attention_mask=mask)
    if hasattr(out, "prediction_logits"):
        return out.prediction_logits, out.seq_relationship_logits
    return out.logits, None


@torch.no_grad()
def mlm_logit_diff(ours: torch.nn.Module, theirs: torch.nn.Module, vocab: int, seed: int = 0) -> float:
    """Max |MLM logit difference| over real (unpadded) positions, and NSP logits where both have them;
    ``theirs`` is a transformers BERT or our own BertModel."""
    ids, types, mask = probe_batch(vocab, seed)
    a = ours(ids, token_types=types if ours.cfg.num_tokentypes else None, padding_mask=mask)
    if hasattr(theirs, "config"):
        b_mlm, b_nsp = hf_mlm_outputs(theirs, ids, types, mask)
    else:
        b = theirs(ids, token_types=types if theirs.cfg.num_tokentypes else None, padding_mask=mask)
        b_mlm, b_nsp = b["mlm_logits"], b["binary_logits"]
    keep = mask.bool()
    worst = float((a["mlm_logits"][..., :vocab] - b_mlm[..., :vocab])[keep].abs().max())
    assert (a["binary_logits"] is None) == (b_nsp is None), "one side has a sentence-pair head, the other not"
    if b_nsp is not None:
        worst = max(worst, float((a["binary_logits"] - b_nsp).abs().max()))
    return worst


@torch.no_grad()
def seq2seq_logit_diff(ours: torch.nn.Module, theirs: torch.nn.Module, vocab: int, seed: int = 0) -> float:
    """Max |decoder logit difference| (encoder padding in the last row); ``theirs`` is a transformers
    T5 or our own T5Model."""
    ids, _, mask = probe_batch(vocab, seed)
    dec = torch.cat([torch.zeros_like(ids[:, :1]), ids[:, :-1]], dim=1)  # pad id, then shifted right
    a = ours(ids, dec, encoder_padding_mask=mask.bool())[..., :vocab]
    if hasattr(theirs, "config"):
        b = theirs(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits[..., :vocab]
    else:
        b = theirs(ids, dec, encoder_padding_mask=mask.bool())[..., :vocab]
    assert float(a.std()) > 0.1, "degenerate logits would hide mapping mistakes"
    return float((a - b).abs().max())


def assert_same_safetensors(a: Path, b: Path) -> dict[str, torch.Tensor]:
    """Two Hugging Face folders hold the same tensor names with bit-identical values; returns ``a``'s."""
    before, after = read_safetensors(a), read_safetensors(b)
    assert sorted(before) == sorted(after)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    return before


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder (single file or shards)."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out
