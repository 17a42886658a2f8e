"""NeMo checkpoints in and out: NeMo 1.x ``.nemo`` archives (megatron-core and legacy names, tensor ×
pipeline parallel rank files, the distributed ``model_weights/`` folder, tar and tar.gz) and NeMo 2.0
folders (``context/`` + ``weights/``) built by hand in those layouts from a known model, imported and
checked by logits; and a megaforge run exported to ``.nemo`` and imported back unchanged."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml

from tests.conversion.conftest import GPT2_STYLE, LLAMA_STYLE, make_run, max_logit_diff, transformers
from tests.conversion.test_megatron_names import VOCAB, _compare, megatron_args, reference, write_checkpoint
from toolkit.checkpoint import load_megaforge_model
from toolkit.cli import main
from toolkit.config import ModelConfig
from toolkit.convert import convert, detect_source
from toolkit.convert.megatron_legacy import flatten
from toolkit.convert.nemo import import_nemo
from toolkit.errors import CheckpointError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


# ---------------------------------------------------------------------------- writing NeMo checkpoints


def nemo1_config(cfg: ModelConfig, tp: int = 1, pp: int = 1, *, mcore: bool = True, **kw) -> dict:
    """``model_config.yaml`` as NeMo 1.x saves it (with an unresolved interpolation, as NeMo leaves them)."""
    act = {"gelu": "gelu", "gelu_tanh": "gelu", "swiglu": "fast-swiglu"}[cfg.activation]
    base = {
        ("mcore_bert" if cfg.family == "bert" else "mcore_gpt"): mcore,
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "encoder_seq_length": 32,
        "max_position_embeddings": "${.encoder_seq_length}" if cfg.position_embedding_type == "rope" else 64,
        "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
        "ffn_hidden_size": cfg.ffn_hidden_size or 4 * cfg.hidden_size, "num_attention_heads": cfg.num_attention_heads,
        "num_query_groups": cfg.num_query_groups, "kv_channels": None, "hidden_dropout": 0.0,
        "attention_dropout": 0.0, "layernorm_epsilon": cfg.layernorm_epsilon,
        "normalization": cfg.normalization.lower(), "bias": cfg.add_bias_linear, "activation": act,
        "bias_activation_fusion": cfg.activation == "gelu_tanh",  # NeMo's fused bias-GELU: tanh approximation
        "make_vocab_size_divisible_by": 128, "position_embedding_type": cfg.position_embedding_type,
        "rotary_base": cfg.rotary_base, "rotary_percentage": 1.0, "transformer_block_type": "pre_ln",
        "share_embeddings_and_output_weights": cfg.share_embeddings_and_output_weights, "precision": 32,
        "tokenizer": {"library": "megatron", "type": None, "model": None, "vocab_file": None, "merge_file": None},
    }
    if cfg.family == "bert":
        base["bert_binary_head"] = True
    return {**base, **kw}


def rank_states(tmp_path: Path, model, cfg: ModelConfig, *, scheme: str, tp: int, pp: int) -> dict:
    """(tp, pp) → NeMo's flat ``model.``-prefixed state dict of that rank, from a Megatron-LM checkpoint
    written by the Megatron tests' helper in ``scheme`` (legacy, mcore, mcore-te)."""
    src = write_checkpoint(tmp_path / "megatron", model, cfg, megatron_args(cfg, scheme, tp, pp), scheme=scheme,
                           tp=tp, pp=pp)
    out = {}
    for folder in sorted((src / "iter_0000042").iterdir()):
        parts = folder.name.split("_")  # mp_rank_XX or mp_rank_XX_YYY
        state = torch.load(folder / "model_optim_rng.pt", weights_only=False)["model"]
        flat = {}
        for key, value in flatten(state).items():
            if key.startswith("word_embeddings_for_head."):
                key = key.replace("word_embeddings_for_head", "word_embeddings")  # NeMo's name for the copy
            flat["model." + key] = value
        out[(int(parts[2]), int(parts[3]) if len(parts) > 3 else 0)] = flat
    return out


def split_legacy_swiglu(state: dict) -> dict:
    """Legacy NeMo keeps SwiGLU's gate and up projections apart: dense_h_to_4h and dense_h_to_4h_2."""
    out = {}
    for k, v in state.items():
        if k.endswith("mlp.dense_h_to_4h.weight"):
            gate, up = v.chunk(2)
            out[k], out[k.replace("dense_h_to_4h", "dense_h_to_4h_2")] = gate, up
        else:
            out[k] = v
    return out


def write_nemo(path: Path, config: dict, files: dict[str, object], *, gz: bool = False) -> Path:
    """A ``.nemo`` archive: ``./model_config.yaml`` + ``files`` (archive name → state dict or bytes)."""
    stage = path.parent / (path.name + ".stage")
    stage.mkdir(parents=True)
    (stage / "model_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for name, value in files.items():
        target = stage / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(value, bytes):
            target.write_bytes(value)
        else:
            torch.save(value, target)
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for p in sorted(stage.rglob("*")):
            tar.add(p, arcname="./" + str(p.relative_to(stage)), recursive=False)
    return path


def stacked_dcp(folder: Path, state: dict, prefix: str, stack: str) -> None:
    """A distributed (torch_dist) checkpoint as megatron-core writes it: layers stacked on a leading axis
    under ``<prefix><stack>.layers.<name>``, saved with DCP in one process, plus metadata.json/common.pt."""
    layers: dict[str, dict[int, torch.Tensor]] = {}
    out: dict[str, object] = {}
    for key, value in state.items():
        name = key[len("model."):]
        head = f"{stack}.layers."
        if name.startswith(head):
            i, rest = name[len(head):].split(".", 1)
            layers.setdefault(rest, {})[int(i)] = value
        else:
            out[prefix + name] = value
    for rest, per_layer in layers.items():
        out[f"{prefix}{stack}.layers.{rest}"] = torch.stack([per_layer[i] for i in sorted(per_layer)])
    out[f"{prefix}{stack}.layers.self_attention.core_attention._extra_state"] = io.BytesIO(b"te")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(out, checkpoint_id=str(folder), no_dist=True)
    (folder / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}))
    torch.save({}, folder / "common.pt")


# ---------------------------------------------------------------------------- NeMo 1.x import


@pytest.mark.parametrize("style,scheme,tp,pp", [("gpt", "mcore-te", 2, 2), ("llama", "mcore-te", 2, 1),
                                                ("bert", "mcore", 1, 2)])
def test_nemo1_mcore_rank_files(tmp_path, style, scheme, tp, pp):
    model, cfg = reference(style)
    states = rank_states(tmp_path, model, cfg, scheme=scheme, tp=tp, pp=pp)
    name = (lambda t, p: f"tp_rank_{t:02d}_pp_rank_{p:03d}") if pp > 1 else (lambda t, p: f"mp_rank_{t:02d}")
    files = {f"{name(t, p)}/model_weights.ckpt": s for (t, p), s in states.items()}
    src = write_nemo(tmp_path / "model.nemo", nemo1_config(cfg, tp, pp), files, gz=style == "llama")
    assert detect_source(src) == "nemo"
    ours, imported, _ = load_megaforge_model(import_nemo(src, tmp_path / "mf", vocab_size=VOCAB))
    m = imported.model
    assert (m.family, m.vocab_size, m.activation, m.num_query_groups) == (cfg.family, VOCAB, cfg.activation,
                                                                          cfg.num_query_groups)
    assert imported.description.startswith("imported from NeMo checkpoint")
    assert _compare(style, ours, model) <= 1e-5


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_nemo1_legacy_names_tp2(tmp_path, style):
    model, cfg = reference(style)
    states = rank_states(tmp_path, model, cfg, scheme="legacy", tp=2, pp=1)
    files = {f"mp_rank_{t:02d}/model_weights.ckpt": split_legacy_swiglu(s) for (t, _), s in states.items()}
    if style == "llama":
        assert "model.language_model.encoder.layers.0.mlp.dense_h_to_4h_2.weight" in files["mp_rank_00/model_weights.ckpt"]
    src = write_nemo(tmp_path / "legacy.nemo", nemo1_config(cfg, 2, mcore=False), files)
    ours, _, _ = load_megaforge_model(import_nemo(src, tmp_path / "mf", vocab_size=VOCAB))
    assert _compare(style, ours, model) <= 1e-5


def test_nemo1_distributed_model_weights(tmp_path):
    model, cfg = reference("llama")
    state = rank_states(tmp_path, model, cfg, scheme="mcore-te", tp=1, pp=1)[(0, 0)]
    stage = tmp_path / "unpacked"
    stacked_dcp(stage / "model_weights", state, "model.", "decoder")
    (stage / "model_config.yaml").write_text(yaml.safe_dump(nemo1_config(cfg, dist_ckpt_format="torch_dist")))
    with tarfile.open(tmp_path / "dist.nemo", "w") as tar:
        tar.add(stage, arcname=".")
    for src in (tmp_path / "dist.nemo", stage):  # the archive, and the folder it was made from
        out = tmp_path / f"mf-{src.name}"
        ours, _, _ = load_megaforge_model(import_nemo(src, out, vocab_size=VOCAB))
        assert max_logit_diff(ours, model, VOCAB) <= 1e-5


def test_nemo1_tokenizer_from_archive_and_one_step_to_hf(tmp_path, capsys):
    model, cfg = reference("gpt")
    letters = [chr(ord("a") + i) for i in range(26)] + ["ab"]
    vocab = {t: i for i, t in enumerate(letters + [f"x{i}" for i in range(VOCAB - 28)] + ["<|endoftext|>"])}
    vocab_name, merges_name = "0123456789abcdef0123456789abcdef_vocab.json", "fedcba9876543210fedcba9876543210_merges.txt"
    config = nemo1_config(cfg, tokenizer={"library": "megatron", "type": "GPT2BPETokenizer", "model": None,
                                          "vocab_file": f"nemo:{vocab_name}", "merge_file": f"nemo:{merges_name}"})
    states = rank_states(tmp_path, model, cfg, scheme="mcore-te", tp=1, pp=1)
    src = write_nemo(tmp_path / "gpt.nemo", config, {"model_weights.ckpt": states[(0, 0)],
                                                     vocab_name: json.dumps(vocab).encode(),
                                                     merges_name: b"#version: 0.2\na b\n"})
    out = tmp_path / "hf"
    assert main(["convert", str(src), str(out), "--to", "hf", "--verify"]) == 0  # vocabulary: the archive's tokenizer
    printed = capsys.readouterr().out
    assert "finite logits" in printed and "max |logit difference|" in printed
    theirs = transformers.GPT2LMHeadModel.from_pretrained(out, dtype=torch.float32).eval()
    assert theirs.config.vocab_size == VOCAB
    assert max_logit_diff(model, theirs, VOCAB) <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt.nemo", "gpt.nemo.stage", "hf", "megatron"]


# ---------------------------------------------------------------------------- NeMo 2.0 import


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_nemo2_folder(tmp_path, style):
    model, cfg = reference(style)
    state = rank_states(tmp_path, model, cfg, scheme="mcore-te", tp=1, pp=1)[(0, 0)]
    root = tmp_path / "nemo2"
    stacked_dcp(root / "weights", state, "module.", "decoder")
    llama = style == "llama"
    config = {
        "_target_": "nemo.collections.llm.gpt.model.llama.LlamaConfig" if llama else
        "nemo.collections.llm.gpt.model.base.GPTConfig",
        "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "ffn_hidden_size": cfg.ffn_hidden_size or 128,
        "num_attention_heads": cfg.num_attention_heads, "num_query_groups": cfg.num_query_groups or 4,
        "kv_channels": None, "seq_length": 32, "max_position_embeddings": None if llama else 64,
        "normalization": cfg.normalization, "layernorm_epsilon": cfg.layernorm_epsilon,
        "add_bias_linear": cfg.add_bias_linear, "add_qkv_bias": False, "gated_linear_unit": llama,
        "activation_func": {"_target_": f"torch.nn.functional.{'silu' if llama else 'gelu'}", "_call_": False},
        "bias_activation_fusion": not llama, "position_embedding_type": cfg.position_embedding_type,
        "rotary_base": cfg.rotary_base, "rotary_percent": 1.0, "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "share_embeddings_and_output_weights": cfg.share_embeddings_and_output_weights,
        "make_vocab_size_divisible_by": 128, "vocab_size": VOCAB, "layernorm_zero_centered_gamma": False,
        "qk_layernorm": False, "num_moe_experts": None,
        "params_dtype": {"_target_": "torch.float32", "_call_": False},
    }
    (root / "context").mkdir()
    (root / "context" / "model.yaml").write_text(yaml.safe_dump({
        "_target_": "nemo.collections.llm.gpt.model.llama.LlamaModel" if llama else
        "nemo.collections.llm.gpt.model.base.GPTModel", "config": config}))
    (root / "context" / "io.json").write_text("{}")
    assert detect_source(root) == "nemo"
    out = convert(root, tmp_path / "mf", to="megaforge")
    ours, imported, _ = load_megaforge_model(out)
    assert imported.model.vocab_size == VOCAB
    assert max_logit_diff(ours, model, VOCAB) <= 1e-5


# ---------------------------------------------------------------------------- export and round trip


@pytest.mark.parametrize("style", [GPT2_STYLE, LLAMA_STYLE], ids=["gpt", "llama"])
def test_export_round_trip(tmp_path, capsys, style):
    run, model = make_run(tmp_path / "run", style)
    archive = tmp_path / "out.nemo"
    assert main(["convert", str(run), str(archive), "--to", "nemo", "--verify"]) == 0
    assert "verification passed" in capsys.readouterr().out
    with tarfile.open(archive) as tar:  # a plain tar, as NeMo >= 1.7 writes
        names = tar.getnames()
        config = yaml.safe_load(tar.extractfile("./model_config.yaml"))
        weights = torch.load(io.BytesIO(tar.extractfile("./model_weights.ckpt").read()), weights_only=True)
    assert {"./model_config.yaml", "./model_weights.ckpt"} <= set(names)
    assert any(n.endswith("_vocab.json") for n in names) and config["tokenizer"]["type"] == "GPT2BPETokenizer"
    assert config["tokenizer"]["vocab_file"].startswith("nemo:")
    cfg = ModelConfig(**style)
    assert (config["mcore_gpt"], config["num_layers"], config["hidden_size"], config["num_attention_heads"],
            config["normalization"], config["position_embedding_type"], config["share_embeddings_and_output_weights"],
            config["precision"]) == (True, 2, 32, 4, cfg.normalization.lower(), cfg.position_embedding_type,
                                     cfg.share_embeddings_and_output_weights, 32)
    vocab = model.cfg.vocab_size
    assert weights["model.embedding.word_embeddings.weight"].shape[0] == -(-vocab // 128) * 128
    for key in ("model.decoder.layers.1.self_attention.linear_qkv.weight",
                "model.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
                "model.decoder.layers.0.mlp.linear_fc1.layer_norm_weight", "model.decoder.layers.0.mlp.linear_fc2.weight",
                "model.decoder.layers.0.self_attention.linear_proj.weight", "model.decoder.final_layernorm.weight"):
        assert key in weights, key
    assert ("model.output_layer.weight" in weights) == (not cfg.share_embeddings_and_output_weights)
    assert ("model.embedding.position_embeddings.weight" in weights) == (cfg.position_embedding_type != "rope")

    back = convert(archive, tmp_path / "back", to="megaforge")
    ours, imported, tok = load_megaforge_model(back)
    assert imported.model.vocab_size == vocab and tok is not None and tok.vocab_size == vocab
    before, after = model.state_dict(), ours.state_dict()
    assert sorted(before) == sorted(after)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids), ours(ids))


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("change,message", [
    (dict(transformer_block_type="post_ln"), r"transformer_block_type='post_ln' are not supported"),
    (dict(activation="squared-relu"), r"activation='squared-relu' are not supported"),
    (dict(normalization="layernorm1p"), r"apply_layernorm_1p=True"),
    (dict(num_moe_experts=4), r"num_experts=4 \(mixture of experts\)"),
])
def test_nemo1_refusals_name_the_key(tmp_path, change, message):
    model, cfg = reference("gpt")
    states = rank_states(tmp_path, model, cfg, scheme="mcore-te", tp=1, pp=1)
    src = write_nemo(tmp_path / "bad.nemo", nemo1_config(cfg, **change), {"model_weights.ckpt": states[(0, 0)]})
    with pytest.raises(CheckpointError, match=message):
        import_nemo(src, tmp_path / "mf", vocab_size=VOCAB)
    assert not (tmp_path / "mf").exists()


def test_nemo_refusals_of_the_cli(tmp_path, capsys):
    model, cfg = reference("gpt")
    states = rank_states(tmp_path, model, cfg, scheme="mcore-te", tp=1, pp=1)
    bad = {k.replace("model.", "frozen_model.", 1): v for k, v in states[(0, 0)].items()}  # e.g. a PEFT archive
    src = write_nemo(tmp_path / "peft.nemo", nemo1_config(cfg), {"model_weights.ckpt": bad})
    assert main(["convert", str(src), str(tmp_path / "mf"), "--to", "megaforge"]) == 2
    assert "holds no 'model.' weights" in capsys.readouterr().err
    assert main(["convert", str(src), str(tmp_path / "x.nemo"), "--to", "nemo"]) == 2
    assert "--to nemo needs a megaforge run" in capsys.readouterr().err
    pickled = {"model_weights.ckpt": states[(0, 0)] | {"model.evil": print}}
    src = write_nemo(tmp_path / "evil.nemo", nemo1_config(cfg), pickled)
    with pytest.raises(CheckpointError, match="refusing to unpickle 'builtins.print'"):
        import_nemo(src, tmp_path / "mf")
