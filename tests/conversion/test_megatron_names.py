"""Megatron-LM checkpoints in every naming scheme megaforge reads — legacy (``language_model.…``, the
RMSNorm-era ``input_norm``/``final_norm``) and megatron-core (``decoder.layers.N…`` for GPT and
Llama-style models, ``encoder.layers.N…`` plus ``lm_head.layer_norm``/``output_layer.bias`` for
BERT) — with ``args`` spelled as the version that wrote them did, at tensor parallel 2 × pipeline 2;
the one-step ``--to hf`` path; and the messages of what is refused."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conversion.conftest import (
    GPT2_STYLE,
    LLAMA_STYLE,
    MEGATRON_BERT_STYLE,
    max_logit_diff,
    mlm_logit_diff,
    perturb,
    transformers,
)
from tests.conversion.test_megatron_legacy import global_layer_shards
from toolkit.checkpoint import load_megaforge_model
from toolkit.cli import main
from toolkit.config import ModelConfig, RunConfig
from toolkit.convert import convert
from toolkit.convert.adapters import adapter_for_model_type
from toolkit.convert.megatron_legacy import import_megatron
from toolkit.errors import CheckpointError
from toolkit.models.build import build_initialized_model

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

VOCAB = 100  # padded to 256 rows at tp 2 (128 × tp): the importer must drop the padding
TP, PP = 2, 2
STYLES = {"gpt": GPT2_STYLE, "llama": LLAMA_STYLE, "bert": dict(MEGATRON_BERT_STYLE, num_tokentypes=2)}


def reference(style: str) -> tuple[torch.nn.Module, ModelConfig]:
    cfg = ModelConfig(**{**STYLES[style], "vocab_size": VOCAB})
    return perturb(build_initialized_model(RunConfig(model=cfg), torch.device("cpu"))).eval(), cfg


# ---------------------------------------------------------------------------- writing checkpoints

# canonical (legacy) layer names → how each scheme spells them
_MCORE_LOCAL = [("self_attention.query_key_value.", "self_attention.linear_qkv."),
                ("self_attention.dense.", "self_attention.linear_proj."),
                ("post_attention_layernorm.", "pre_mlp_layernorm."),
                ("mlp.dense_h_to_4h.", "mlp.linear_fc1."), ("mlp.dense_4h_to_h.", "mlp.linear_fc2.")]
_MCORE_TE = [("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),  # Transformer Engine's fused norms
             ("post_attention_layernorm.", "mlp.linear_fc1.layer_norm_")] + _MCORE_LOCAL
_LEGACY_NORM = [("input_layernorm.", "input_norm."), ("post_attention_layernorm.", "post_attention_norm.")]


def _spell(name: str, renames) -> str:
    for old, new in renames:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def padded(t: torch.Tensor, tp: int) -> torch.Tensor:
    rows = -(-VOCAB // (128 * tp)) * 128 * tp
    return torch.cat([t[:VOCAB], torch.randn(rows - VOCAB, *t.shape[1:])])


def write_checkpoint(root: Path, model, cfg: ModelConfig, args, *, scheme: str, tp: int = TP, pp: int = PP,
                     extra: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
    """``scheme``: legacy (nested ``language_model`` dicts; ``input_norm``/``final_norm`` for RMSNorm
    models, as legacy Megatron-LM wrote them after adding RMSNorm), mcore (flat megatron-core keys,
    local layer spec) or mcore-te (Transformer Engine spec: fused norms, ``_extra_state``). ``extra``:
    more entries for rank (0, 0); ``drop``: keys left out."""
    sd = model.state_dict()
    bert = cfg.family == "bert"
    tied = cfg.share_embeddings_and_output_weights
    per_stage = cfg.num_layers // pp
    version = 3.0
    rms = cfg.normalization == "RMSNorm"
    renames = {"mcore": _MCORE_LOCAL, "mcore-te": _MCORE_TE}.get(scheme, _LEGACY_NORM if rms else [])
    mcore = scheme.startswith("mcore")
    stack = "encoder" if bert else "decoder"
    pair = lambda ours: {k.split(".")[-1]: v for k, v in sd.items() if k.startswith(ours + ".")}  # noqa: E731
    folder = root / "iter_0000042"
    for r in range(tp):
        for p in range(pp):
            first, last = p == 0, p == pp - 1
            layers = {}
            for local in range(per_stage):
                for name, shards in global_layer_shards(sd, cfg, p * per_stage + local, tp, version).items():
                    layers[f"layers.{local}.{_spell(name, renames)}"] = shards[r]
                if scheme == "mcore-te":
                    layers[f"layers.{local}.self_attention.core_attention._extra_state"] = torch.empty(0)
            words = padded(sd["embed.tokens.weight"], tp).chunk(tp)[r]
            emb = {}
            if first:
                emb["word_embeddings.weight"] = words
                if "embed.positions.weight" in sd:
                    emb["position_embeddings.weight"] = sd["embed.positions.weight"]
                if bert:
                    emb["tokentype_embeddings.weight"] = sd["embed.tokentypes.weight"]
            final = pair("final_norm") if last else {}
            heads: dict[str, torch.Tensor] = {}
            if last and bert:
                heads.update({f"pooler.dense.{k}": v for k, v in pair("pooler.dense").items()})
                heads.update({f"binary_head.{k}": v for k, v in pair("binary_head").items()})
                heads.update({f"lm_head.dense.{k}": v for k, v in pair("lm_head.dense").items()})
                norm = "layer_norm" if mcore else "layernorm"
                heads.update({f"lm_head.{norm}.{k}": v for k, v in pair("lm_head.norm").items()})
                bias = padded(sd["lm_head.bias"], tp).chunk(tp)[r]
                heads["output_layer.bias" if mcore else "lm_head.bias"] = bias
            head = None
            if last and not tied:
                head = padded(sd["head.weight"], tp).chunk(tp)[r]
            elif last and not first:
                head = words  # the last stage's copy of the tied word embeddings
            if mcore:
                state = {f"{stack}.{k}": v for k, v in layers.items()}
                state.update({f"embedding.{k}": v for k, v in emb.items()})
                state.update({f"{stack}.final_layernorm.{k}": v for k, v in final.items()})
                state.update(heads)
                if head is not None:
                    state["output_layer.weight"] = head
            else:
                final_name = "final_norm" if rms else "final_layernorm"
                lm: dict = {"encoder": {**layers, **{f"{final_name}.{k}": v for k, v in final.items()}}}
                if emb:
                    lm["embedding"] = {k.split(".")[0]: {"weight": v} for k, v in emb.items()}
                state = {"language_model": lm}
                for k, v in heads.items():
                    if k.startswith("pooler."):
                        lm.setdefault("pooler", {})[k[len("pooler."):]] = v
                    else:
                        top, rest = k.split(".", 1)
                        state.setdefault(top, {})[rest] = v
                if head is not None and not tied:
                    lm["output_layer"] = {"weight": head}
                elif head is not None:
                    state["word_embeddings_for_head"] = {"weight": head}
            if (r, p) == (0, 0) and extra:
                state.update(extra)
            for key in drop:
                state.pop(key, None)
            name = f"mp_rank_{r:02d}" + (f"_{p:03d}" if pp > 1 else "")
            (folder / name).mkdir(parents=True)
            torch.save({"args": args, "checkpoint_version": version, "iteration": 42, "model": state,
                        "rng_state": [{"random_rng_state": np.random.get_state()}]},
                       folder / name / "model_optim_rng.pt")
    (root / "latest_checkpointed_iteration.txt").write_text("42")
    return root


def megatron_args(cfg: ModelConfig, scheme: str, tp: int = TP, pp: int = PP, **kw) -> argparse.Namespace:
    """``args`` as that generation of Megatron-LM saved them: older ones spell ``layernorm_epsilon``;
    megatron-core era ones ``norm_epsilon``, ``add_qkv_bias=False`` beside ``add_bias_linear``, and
    ``position_embedding_type``; the oldest Llama-style ones ``use_rotary_position_embeddings``."""
    rope, swiglu = cfg.position_embedding_type == "rope", cfg.activation == "swiglu"
    base = dict(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                ffn_hidden_size=cfg.ffn_hidden_size or 4 * cfg.hidden_size, max_position_embeddings=64,
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, make_vocab_size_divisible_by=128,
                padded_vocab_size=-(-VOCAB // (128 * tp)) * 128 * tp, vocab_size=VOCAB, hidden_dropout=0.0,
                attention_dropout=0.0, add_bias_linear=cfg.add_bias_linear, swiglu=swiglu,
                bias_gelu_fusion=cfg.activation == "gelu_tanh", openai_gelu=False,
                untie_embeddings_and_output_weights=not cfg.share_embeddings_and_output_weights,
                group_query_attention=bool(cfg.num_query_groups), num_query_groups=cfg.num_query_groups or 1,
                bert_binary_head=cfg.family == "bert", normalization=cfg.normalization)
    if scheme.startswith("mcore"):
        base.update(norm_epsilon=cfg.layernorm_epsilon, add_qkv_bias=False, seq_length=None, encoder_seq_length=32,
                    position_embedding_type="rope" if rope else "learned_absolute", rotary_base=cfg.rotary_base,
                    rotary_percent=1.0, qk_layernorm=False, num_experts=None, use_legacy_models=False)
    else:
        base.update(layernorm_epsilon=cfg.layernorm_epsilon, seq_length=32, use_rotary_position_embeddings=rope,
                    rotary_base=cfg.rotary_base)
    return argparse.Namespace(**{**base, **kw})


def _compare(style: str, ours, model) -> float:
    return mlm_logit_diff(ours, model, VOCAB) if style == "bert" else max_logit_diff(ours, model, VOCAB)


# ---------------------------------------------------------------------------- both naming schemes


@pytest.mark.parametrize("style,scheme", [("gpt", "legacy"), ("gpt", "mcore"), ("llama", "legacy"),
                                          ("llama", "mcore-te"), ("bert", "legacy"), ("bert", "mcore")])
def test_naming_schemes_tp2_pp2(tmp_path, style, scheme):
    model, cfg = reference(style)
    src = write_checkpoint(tmp_path / "megatron", model, cfg, megatron_args(cfg, scheme), scheme=scheme)
    out = import_megatron(src, tmp_path / "mf")
    ours, imported, _ = load_megaforge_model(out)
    m = imported.model
    assert (m.family, m.vocab_size, m.normalization, m.activation, m.num_query_groups, m.layernorm_epsilon,
            m.share_embeddings_and_output_weights) == (cfg.family, VOCAB, cfg.normalization, cfg.activation,
                                                       cfg.num_query_groups, cfg.layernorm_epsilon,
                                                       cfg.share_embeddings_and_output_weights)
    if style == "bert":
        assert (m.layernorm_position, m.bert_binary_head, m.num_tokentypes) == ("pre", True, 2)
    assert _compare(style, ours, model) <= 1e-5


# ---------------------------------------------------------------------------- one step to Hugging Face


@pytest.mark.parametrize("style,cls", [("gpt", "GPT2LMHeadModel"), ("bert", "MegatronBertForPreTraining")])
def test_one_step_to_hf(tmp_path, capsys, style, cls):
    model, cfg = reference(style)
    src = write_checkpoint(tmp_path / "megatron", model, cfg, megatron_args(cfg, "mcore"), scheme="mcore")
    out = tmp_path / "hf"
    assert main(["convert", str(src), str(out), "--to", "hf", "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "finite logits" in printed and "merged tensors match" in printed  # the import's checks
    assert "max |logit difference|" in printed  # the export's comparison with transformers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "megatron"]  # no intermediate folder left
    theirs = getattr(transformers, cls).from_pretrained(out, dtype=torch.float32).eval()
    assert _compare(style, model, theirs) <= 1e-4
    provenance = json.loads((out / "megaforge.json").read_text())
    assert provenance["checkpoint"]["imported_from"] == str(src)
    assert provenance["config"]["tokenizer"]["path"] is None  # not the removed temporary folder


def test_one_step_cleans_up_on_failure(tmp_path, monkeypatch):
    model, cfg = reference("gpt")
    src = write_checkpoint(tmp_path / "megatron", model, cfg, megatron_args(cfg, "mcore", 1, 1), scheme="mcore",
                           tp=1, pp=1)
    seen = []

    def failing_export(folder, out, **kw):
        seen.append(Path(folder))
        assert (Path(folder) / "checkpoints").is_dir()
        raise CheckpointError("export failed on purpose")

    monkeypatch.setattr("toolkit.convert.dispatch.export_hf", failing_export)
    with pytest.raises(CheckpointError, match="on purpose"):
        convert(src, tmp_path / "hf", to="hf")
    assert seen and not seen[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["megatron"]


def test_one_step_refuses_before_writing(tmp_path, capsys):
    # RoPE with LayerNorm: megaforge imports it, but no Hugging Face class holds it
    model, cfg = reference("gpt")
    args = megatron_args(cfg, "mcore", 1, 1, position_embedding_type="rope")
    src = write_checkpoint(tmp_path / "megatron", model, cfg, args, scheme="mcore", tp=1, pp=1,
                           drop=("embedding.position_embeddings.weight",))
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf"]) == 2
    assert "cannot export" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["megatron"]


# ---------------------------------------------------------------------------- refusals and messages


def _tiny(tmp_path, style="gpt", scheme="mcore", model=None, **kw):
    ref, cfg = reference(style)
    model = ref if model is None else model
    args = kw.pop("args", None) or megatron_args(cfg, scheme, 1, 1)
    return write_checkpoint(tmp_path / "megatron", model, cfg, args, scheme=scheme, tp=1, pp=1, **kw)


def test_bert_without_mlm_bias_names_both_spellings(tmp_path):
    src = _tiny(tmp_path, "bert", drop=("output_layer.bias",))
    with pytest.raises(CheckpointError, match=r"incomplete: it has no 'lm_head.bias' \(legacy\) or "
                                              r"'output_layer.bias' \(megatron-core\)"):
        import_megatron(src, tmp_path / "mf")


def test_unsupported_tensor_is_named(tmp_path):
    src = _tiny(tmp_path, extra={"decoder.layers.0.self_attention.q_layernorm.weight": torch.ones(8)})
    with pytest.raises(CheckpointError, match=r"'decoder.layers.0.self_attention.q_layernorm.weight' belongs to "
                                              r"QK normalization"):
        import_megatron(src, tmp_path / "mf")


@pytest.mark.parametrize("change,message", [
    (dict(hidden_size=None), r"args have no 'hidden_size'"),
    (dict(qk_layernorm=True), r"qk_layernorm=True \(QK normalization\) are not supported"),
    (dict(num_experts=8), r"num_experts=8 \(mixture of experts\)"),
    (dict(position_embedding_type="none"), r"position_embedding_type='none'"),
    (dict(ffn_hidden_size=64), r"'decoder.layers.0.mlp.linear_fc2.weight' merges over tensor parallel 1 to shape "
                               r"\(32, 128\) \(per rank \(32, 128\)\), but args describe \(32, 64\)"),
])
def test_args_refusals_name_the_argument(tmp_path, change, message):
    model, cfg = reference("gpt")
    args = megatron_args(cfg, "mcore", 1, 1, **change)
    src = write_checkpoint(tmp_path / "megatron", model, cfg, args, scheme="mcore", tp=1, pp=1)
    with pytest.raises(CheckpointError, match=message):
        import_megatron(src, tmp_path / "mf")


def test_verify_reports_logit_statistics_and_fails_on_nan(tmp_path, capsys):
    model, cfg = reference("gpt")
    with torch.no_grad():
        model.final_norm.weight[0] = float("nan")  # a corrupt weight every position reads
    src = _tiny(tmp_path, "gpt", "legacy", model=model)
    assert main(["convert", str(src), str(tmp_path / "mf"), "--to", "megaforge", "--verify"]) == 1
    err = capsys.readouterr().err
    assert "verification FAILED" in err and "NON-FINITE logits" in err and "merged tensors match" in err


def test_missing_source_and_model_type_list(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["convert", "nowhere", "out", "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert "nowhere does not exist" in err and "Hugging Face model" not in err
    def offline(**kw):
        raise OSError("no network here")

    monkeypatch.setattr("toolkit.convert.hf.snapshot_download", offline)
    assert main(["convert", "nowhere", "out", "--to", "megaforge"]) == 2
    assert "nowhere does not exist here, nor can it be downloaded as a Hugging Face Hub id: no network" in \
        capsys.readouterr().err
    (tmp_path / "weights.pt").write_bytes(b"")
    assert main(["convert", "weights.pt", "out", "--to", "megaforge"]) == 2
    assert "is a file, not a checkpoint folder" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="supported") as e:
        adapter_for_model_type("not-a-model")
    listed = str(e.value).split("supported: ")[1].rstrip(")").split(", ")
    assert len(listed) == len(set(listed)) and {"gpt2", "llama", "bert", "megatron-bert", "t5"} <= set(listed)


def test_distributed_checkpoint_is_refused_with_what_to_do(tmp_path, capsys):
    (tmp_path / "dist" / "iter_0000005").mkdir(parents=True)
    (tmp_path / "dist" / "latest_checkpointed_iteration.txt").write_text("5")
    (tmp_path / "dist" / "iter_0000005" / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    (tmp_path / "dist" / "iter_0000005" / "common.pt").write_bytes(b"")
    assert main(["convert", str(tmp_path / "dist"), str(tmp_path / "out"), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert "distributed megatron-core checkpoint" in err and "--ckpt-convert-format torch" in err


def test_args_saved_as_a_dict(tmp_path):
    model, cfg = reference("llama")
    src = _tiny(tmp_path, "llama", "mcore-te", args=vars(megatron_args(cfg, "mcore-te", 1, 1)))
    ours, _, _ = load_megaforge_model(import_megatron(src, tmp_path / "mf"))
    assert max_logit_diff(ours, model, VOCAB) <= 1e-5
