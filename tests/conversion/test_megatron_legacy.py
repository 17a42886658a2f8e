"""Legacy Megatron-LM GPT and BERT import: checkpoints synthesized in the exact on-disk layout from a known
single-device model (TP/PP shards, fused QKV per checkpoint_version, legacy and megatron-core names);
BERT imports are checked against transformers' MegatronBertForPreTraining loaded from their export."""

from __future__ import annotations

import argparse
import enum
import io
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conversion.conftest import (
    LLAMA_STYLE,
    MEGATRON_BERT_STYLE,
    max_logit_diff,
    mlm_logit_diff,
    perturb,
    transformers,
)
from toolkit.checkpoint import load_megaforge_model
from toolkit.cli import main
from toolkit.config import ModelConfig, RunConfig
from toolkit.convert import export_hf
from toolkit.convert.megatron_legacy import import_megatron
from toolkit.errors import CheckpointError
from toolkit.models.build import build_initialized_model

VOCAB = 1000
# native checkpoints load through DCP without a process group, on purpose
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def build_model(**kw) -> tuple[torch.nn.Module, ModelConfig]:
    cfg = ModelConfig(**{**kw, "num_layers": 4, "vocab_size": VOCAB})
    return perturb(build_initialized_model(RunConfig(model=cfg), torch.device("cpu"))).eval(), cfg


# ---------------------------------------------------------------------------- writing Megatron shards


def padded_rows(t: torch.Tensor, tp: int) -> torch.Tensor:
    """True vocabulary rows + random padding up to a multiple of 128 × tp (the importer must drop it)."""
    rows = -(-VOCAB // (128 * tp)) * 128 * tp
    return torch.cat([t[:VOCAB], torch.randn(rows - VOCAB, *t.shape[1:])])


def qkv_shards(sd: dict, i: int, cfg: ModelConfig, tp: int, version: float, part: str) -> list[torch.Tensor]:
    heads, groups = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads
    hd = cfg.hidden_size // heads
    q, k, v = (sd[f"layers.{i}.attn.{n}.{part}"] for n in "qkv")
    rest = q.shape[1:]
    grouped = torch.cat([q.reshape(groups, heads // groups, hd, *rest), k.reshape(groups, 1, hd, *rest),
                         v.reshape(groups, 1, hd, *rest)], dim=1)  # [groups, q/group + 2, hd, ...]
    out = []
    for shard in grouped.chunk(tp, dim=0):
        if version < 2.0:  # only plain multi-head attention existed: [heads, 3, hd] per rank
            shard = shard.transpose(1, 2) if version >= 1.0 else shard.transpose(0, 1)  # [h, hd, 3] / [3, h, hd]
        out.append(shard.reshape(-1, *rest))
    return out


def global_layer_shards(sd, cfg, i, tp, version) -> dict[str, list[torch.Tensor]]:
    """Canonical (legacy) per-layer names → one tensor per tensor-parallel rank."""
    rep = lambda t: [t] * tp  # noqa: E731 - replicated
    out = {"input_layernorm.weight": rep(sd[f"layers.{i}.attn_norm.weight"]),
           "self_attention.query_key_value.weight": qkv_shards(sd, i, cfg, tp, version, "weight"),
           "self_attention.dense.weight": list(sd[f"layers.{i}.attn.out.weight"].chunk(tp, dim=1)),
           "post_attention_layernorm.weight": rep(sd[f"layers.{i}.mlp_norm.weight"]),
           "mlp.dense_4h_to_h.weight": list(sd[f"layers.{i}.mlp.fc2.weight"].chunk(tp, dim=1))}
    if cfg.activation == "swiglu":
        out["mlp.dense_h_to_4h.weight"] = [torch.cat([g, u]) for g, u in zip(
            sd[f"layers.{i}.mlp.gate.weight"].chunk(tp), sd[f"layers.{i}.mlp.fc1.weight"].chunk(tp))]
    else:
        out["mlp.dense_h_to_4h.weight"] = list(sd[f"layers.{i}.mlp.fc1.weight"].chunk(tp))
    if cfg.normalization == "LayerNorm":
        out["input_layernorm.bias"] = rep(sd[f"layers.{i}.attn_norm.bias"])
        out["post_attention_layernorm.bias"] = rep(sd[f"layers.{i}.mlp_norm.bias"])
    if cfg.add_bias_linear:
        out["self_attention.query_key_value.bias"] = qkv_shards(sd, i, cfg, tp, version, "bias")
        out["self_attention.dense.bias"] = rep(sd[f"layers.{i}.attn.out.bias"])
        out["mlp.dense_h_to_4h.bias"] = list(sd[f"layers.{i}.mlp.fc1.bias"].chunk(tp))
        out["mlp.dense_4h_to_h.bias"] = rep(sd[f"layers.{i}.mlp.fc2.bias"])
    return out


MCORE = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",  # Transformer Engine fused norms
         "self_attention.query_key_value.weight": "self_attention.linear_qkv.weight",
         "self_attention.dense.weight": "self_attention.linear_proj.weight",
         "post_attention_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
         "mlp.dense_h_to_4h.weight": "mlp.linear_fc1.weight", "mlp.dense_4h_to_h.weight": "mlp.linear_fc2.weight"}


def write_megatron(root: Path, model, cfg: ModelConfig, args, *, tp: int, pp: int, vp: int = 1, version: float = 3.0,
                   mcore: bool = False, iteration: int = 100) -> Path:
    sd = model.state_dict()
    chunks = pp * vp
    per_chunk = cfg.num_layers // chunks
    tied = cfg.share_embeddings_and_output_weights
    folder = root / f"iter_{iteration:07d}"
    for r in range(tp):
        for p in range(pp):
            models = {}
            for c in range(vp):
                stage = c * pp + p  # virtual pipeline: chunk-major order of global layers
                layers, glob = {}, {}
                for local in range(per_chunk):
                    for name, shards in global_layer_shards(sd, cfg, stage * per_chunk + local, tp, version).items():
                        key = f"decoder.layers.{local}.{MCORE.get(name, name)}" if mcore else f"layers.{local}.{name}"
                        layers[key] = shards[r]
                    if mcore:
                        layers[f"decoder.layers.{local}.self_attention.linear_qkv._extra_state"] = io.BytesIO(b"te")
                if stage == 0:
                    glob["word_embeddings"] = padded_rows(sd["embed.tokens.weight"], tp).chunk(tp)[r]
                    if "embed.positions.weight" in sd:
                        glob["position_embeddings"] = sd["embed.positions.weight"]
                last = stage == chunks - 1
                final = {k.split(".")[-1]: v for k, v in sd.items() if k.startswith("final_norm.")} if last else {}
                head = (padded_rows(sd["head.weight"], tp).chunk(tp)[r] if not tied
                        else padded_rows(sd["embed.tokens.weight"], tp).chunk(tp)[r]) if last else None
                if mcore:
                    state = dict(layers)
                    state.update({f"embedding.{k}.weight": v for k, v in glob.items()})
                    state.update({f"decoder.final_layernorm.{k}": v for k, v in final.items()})
                    if head is not None and (not tied or stage > 0):
                        state["output_layer.weight"] = head
                else:
                    lm = {"embedding": {k: {"weight": v} for k, v in glob.items()}} if glob else {}
                    lm["encoder"] = {**layers, **{f"final_layernorm.{k}": v for k, v in final.items()}}
                    state = {"language_model": lm}
                    if head is not None and not tied:
                        lm["output_layer"] = {"weight": head}
                    elif head is not None and stage > 0:
                        state["word_embeddings_for_head"] = {"weight": head}
                models["model" if vp == 1 else f"model{c}"] = state
            name = f"mp_rank_{r:02d}" + (f"_{p:03d}" if pp > 1 else "")
            (folder / name).mkdir(parents=True)
            torch.save({"args": args, "checkpoint_version": version, "iteration": iteration, **models,
                        "optimizer": {"step": 1}, "rng_state": [{"random_rng_state": np.random.get_state(),
                                                                  "torch_rng_state": torch.get_rng_state()}]},
                       folder / name / "model_optim_rng.pt")
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return root


def write_megatron_bert(root: Path, model, cfg: ModelConfig, args, *, tp: int, pp: int, version: float = 3.0,
                        iteration: int = 200, lm_head: bool = True) -> Path:
    """megatron/model/bert_model.py's checkpoint: ``language_model`` {embedding, encoder, pooler} and the
    top-level ``lm_head`` {dense, layernorm, bias (vocabulary-parallel)} and ``binary_head``, split by
    tensor (mp_rank_XX) and pipeline (…_YYY) rank; the last stage keeps a copy of the word embeddings."""
    sd = model.state_dict()
    per_stage = cfg.num_layers // pp
    folder = root / f"iter_{iteration:07d}"
    pair = lambda prefix: {"weight": sd[f"{prefix}.weight"], "bias": sd[f"{prefix}.bias"]}  # noqa: E731
    for r in range(tp):
        for p in range(pp):
            encoder = {f"layers.{local}.{name}": shards[r]
                       for local in range(per_stage)
                       for name, shards in global_layer_shards(sd, cfg, p * per_stage + local, tp, version).items()}
            lm: dict = {}
            state: dict = {"language_model": lm}
            words = padded_rows(sd["embed.tokens.weight"], tp).chunk(tp)[r]
            if p == 0:
                lm["embedding"] = {"word_embeddings": {"weight": words},
                                   "position_embeddings": {"weight": sd["embed.positions.weight"]}}
                if cfg.num_tokentypes:
                    lm["embedding"]["tokentype_embeddings"] = {"weight": sd["embed.tokentypes.weight"]}
            if p == pp - 1:
                encoder.update({f"final_layernorm.{k}": v for k, v in pair("final_norm").items()})
                if lm_head:
                    state["lm_head"] = {"bias": padded_rows(sd["lm_head.bias"], tp).chunk(tp)[r],
                                        **{f"dense.{k}": v for k, v in pair("lm_head.dense").items()},
                                        **{f"layernorm.{k}": v for k, v in pair("lm_head.norm").items()}}
                if cfg.bert_binary_head:
                    lm["pooler"] = {f"dense.{k}": v for k, v in pair("pooler.dense").items()}
                    state["binary_head"] = pair("binary_head")
                if p > 0:
                    state["word_embeddings_for_head"] = {"weight": words}
            lm["encoder"] = encoder
            name = f"mp_rank_{r:02d}" + (f"_{p:03d}" if pp > 1 else "")
            (folder / name).mkdir(parents=True)
            torch.save({"args": args, "checkpoint_version": version, "iteration": iteration, "model": state,
                        "optimizer": {"step": 1}}, folder / name / "model_optim_rng.pt")
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return root


def gpt_args(cfg: ModelConfig, tp: int, pp: int, **kw) -> argparse.Namespace:
    base = dict(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size or
                4 * cfg.hidden_size, num_attention_heads=cfg.num_attention_heads, seq_length=32,
                max_position_embeddings=cfg.max_position_embeddings or cfg.seq_length, tensor_model_parallel_size=tp,
                pipeline_model_parallel_size=pp, make_vocab_size_divisible_by=128,
                padded_vocab_size=-(-VOCAB // (128 * tp)) * 128 * tp,
                layernorm_epsilon=cfg.layernorm_epsilon, hidden_dropout=0.0, attention_dropout=0.0,
                params_dtype=torch.float16)
    return argparse.Namespace(**{**base, **kw})


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("version", [3.0, 1.0, 0.0])
def test_legacy_gpt_tp2_pp2(tmp_path, version):
    model, cfg = build_model(hidden_size=32, num_attention_heads=4, seq_length=32, max_position_embeddings=64,
                             activation="gelu_tanh", hidden_dropout=0.0, attention_dropout=0.0)
    args = gpt_args(cfg, 2, 2, bias_gelu_fusion=True, openai_gelu=False, swiglu=False, add_bias_linear=True)
    src = write_megatron(tmp_path / "megatron", model, cfg, args, tp=2, pp=2, version=version)
    out = import_megatron(src, tmp_path / "mf", vocab_size=VOCAB)
    ours, imported_cfg, _ = load_megaforge_model(out)
    assert imported_cfg.model.activation == "gelu_tanh" and imported_cfg.model.vocab_size == VOCAB
    assert max_logit_diff(ours, model, VOCAB) <= 1e-5


def _fake_megatron_enum():
    """An enum pickled from a module named like megatron-core's (loaded back as a placeholder)."""
    mod = types.ModuleType("megatron.core.transformer.enums")

    class AttnBackend(enum.Enum):
        auto = 5

    AttnBackend.__module__, AttnBackend.__qualname__ = mod.__name__, "AttnBackend"
    mod.AttnBackend = AttnBackend
    return mod, AttnBackend.auto


@pytest.mark.parametrize("tp,pp,vp", [(2, 2, 1), (1, 2, 2)])
def test_megatron_core_names_gqa_swiglu(tmp_path, monkeypatch, tp, pp, vp):
    model, cfg = build_model(**LLAMA_STYLE)
    mod, backend = _fake_megatron_enum()
    for name in ("megatron", "megatron.core", "megatron.core.transformer"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    args = gpt_args(cfg, tp, pp, position_embedding_type="rope", rotary_base=cfg.rotary_base, normalization="RMSNorm",
                    norm_epsilon=cfg.layernorm_epsilon, swiglu=True, add_bias_linear=False, group_query_attention=True,
                    num_query_groups=2, untie_embeddings_and_output_weights=True, vocab_size=VOCAB,
                    attention_backend=backend, virtual_pipeline_model_parallel_size=vp if vp > 1 else None)
    src = write_megatron(tmp_path / "megatron", model, cfg, args, tp=tp, pp=pp, vp=vp, mcore=True)
    for name in [n for n in sys.modules if n.startswith("megatron")]:
        monkeypatch.delitem(sys.modules, name)  # the importer must not need megatron installed
    out = import_megatron(src, tmp_path / "mf")
    ours, imported_cfg, _ = load_megaforge_model(out)
    m = imported_cfg.model
    assert (m.num_query_groups, m.activation, m.normalization, m.share_embeddings_and_output_weights) == \
        (2, "swiglu", "RMSNorm", False)
    assert max_logit_diff(ours, model, VOCAB) <= 1e-5


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_non_allow_listed_global_is_refused(tmp_path, capsys):
    folder = tmp_path / "bad" / "release" / "mp_rank_00"
    folder.mkdir(parents=True)
    (tmp_path / "bad" / "latest_checkpointed_iteration.txt").write_text("release")
    torch.save({"args": argparse.Namespace(payload=Evil()), "model": {}}, folder / "model_optim_rng.pt")
    with pytest.raises(CheckpointError, match="refusing to unpickle 'builtins.print'") as e:
        import_megatron(tmp_path / "bad", tmp_path / "out")
    assert "\n" not in str(e.value)
    assert main(["convert", str(tmp_path / "bad"), str(tmp_path / "out"), "--to", "megaforge"]) == 2
    captured = capsys.readouterr()
    assert "this must never run" not in captured.out
    assert len(captured.err.strip().splitlines()) == 1 and "allow-list" in captured.err


def test_cli_auto_detects_legacy_checkpoint(tmp_path, capsys):
    model, cfg = build_model(hidden_size=32, num_attention_heads=4, seq_length=32, activation="gelu",
                             hidden_dropout=0.0, attention_dropout=0.0)
    args = gpt_args(cfg, 1, 1, bias_gelu_fusion=False, add_bias_linear=True, vocab_size=VOCAB)
    src = write_megatron(tmp_path / "megatron", model, cfg, args, tp=1, pp=1)
    assert main(["convert", str(src), str(tmp_path / "mf"), "--to", "megaforge", "--verify"]) == 0
    assert "finite logits" in capsys.readouterr().out
    ours, _, _ = load_megaforge_model(tmp_path / "mf")
    assert max_logit_diff(ours, model, VOCAB) <= 1e-5


@pytest.mark.parametrize("tp,pp,version,binary", [(2, 2, 3.0, True), (2, 1, 0.0, False)])
def test_legacy_bert_matches_exported_megatron_bert(tmp_path, tp, pp, version, binary):
    # GatorTron's format: pre-LN Megatron-BERT; with the sentence-pair head (and Megatron's default fused
    # bias-GELU, the tanh approximation) or without it and without token types (bert_no_binary_head)
    model, cfg = build_model(**dict(MEGATRON_BERT_STYLE, activation="gelu_tanh" if binary else "gelu",
                                    bert_binary_head=binary, num_tokentypes=2 if binary else 0))
    args = gpt_args(cfg, tp, pp, bias_gelu_fusion=binary, add_bias_linear=True, vocab_size=VOCAB,
                    bert_binary_head=binary)
    src = write_megatron_bert(tmp_path / "megatron", model, cfg, args, tp=tp, pp=pp, version=version)
    assert main(["convert", str(src), str(tmp_path / "mf"), "--to", "megaforge", "--verify"]) == 0
    ours, imported_cfg, _ = load_megaforge_model(tmp_path / "mf")
    m = imported_cfg.model
    assert (m.family, m.layernorm_position, m.bert_binary_head, m.num_tokentypes, m.activation) == \
        ("bert", "pre", binary, cfg.num_tokentypes, cfg.activation)
    assert mlm_logit_diff(ours, model, VOCAB) <= 1e-5
    out = export_hf(tmp_path / "mf", tmp_path / "hf")
    cls = "MegatronBertForPreTraining" if binary else "MegatronBertForMaskedLM"
    hf_model = getattr(transformers, cls).from_pretrained(out, dtype=torch.float32).eval()
    assert mlm_logit_diff(model, hf_model, VOCAB) <= 1e-4


def test_legacy_bert_without_lm_head_is_refused(tmp_path):
    model, cfg = build_model(**MEGATRON_BERT_STYLE)
    # a fine-tuned classifier keeps the encoder (and its own head) but no masked-LM head
    src = write_megatron_bert(tmp_path / "megatron", model, cfg, gpt_args(cfg, 1, 1), tp=1, pp=1, lm_head=False)
    with pytest.raises(CheckpointError, match="no lm_head"):
        import_megatron(src, tmp_path / "mf")
