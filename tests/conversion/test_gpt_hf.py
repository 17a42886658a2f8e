"""GPT ↔ Hugging Face (GPT2LMHeadModel, LlamaForCausalLM): import, export, round trip, shards, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from tests.conftest import run_cli
from tests.conversion.conftest import (
    GPT2_STYLE,
    LLAMA_STYLE,
    assert_same_safetensors,
    make_run,
    max_logit_diff,
    save_hf_model,
    transformers,
)
from toolkit.checkpoint import load_megaforge_model
from toolkit.cli import main
from toolkit.convert import export_hf, import_hf
from toolkit.errors import CheckpointError
from toolkit.generation import generate
from toolkit.mapping.tables import TRANSFORMS, MappingContext
from toolkit.models.gpt.hf import GPT2_TABLE, LLAMA_TABLE, select_target

TOL = 1e-4
# native checkpoints load through DCP without a process group, on purpose
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
HF_CASES = {
    "gpt2": ("gpt2", {}),
    "gpt2-untied-relu": ("gpt2", {"tie_word_embeddings": False, "activation_function": "relu", "n_inner": 48}),
    "llama-gqa": ("llama", {}),
    "llama-tied-bias": ("llama", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True,
                                  "num_key_value_heads": 1}),
}


@pytest.fixture(scope="module", params=sorted(HF_CASES))
def imported(request, tmp_path_factory):
    kind, kw = HF_CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    hf_model = save_hf_model(kind, root / "hf", **kw)
    out = import_hf(root / "hf", root / "mf")
    return root, hf_model, out


def test_import_matches_transformers(imported):
    root, hf_model, out = imported
    ours, cfg, _ = load_megaforge_model(out)
    assert cfg.model.vocab_size == 1000 and ours.padded_vocab_size == 1024
    assert max_logit_diff(ours, hf_model, 1000) <= TOL
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0"


def test_round_trip_is_bit_identical(imported):
    root, _, out = imported
    export_hf(out, root / "back")
    assert_same_safetensors(root / "hf", root / "back")


def test_export_gpt2_style_run_loads_in_transformers(tmp_path):
    # make_vocab_size_divisible_by=96 pads english-bpe's 8192 ids to 8256: the export must cut the padding
    run, model = make_run(tmp_path / "run", dict(GPT2_STYLE, make_vocab_size_divisible_by=96))
    assert model.padded_vocab_size > model.vocab_size
    out = export_hf(run, tmp_path / "hf", verify=True)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json"} <= files
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.model_type == "gpt2" and config.vocab_size == 8192
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert isinstance(hf_model, transformers.GPT2LMHeadModel)
    assert hf_model.transformer.wte.weight.shape[0] == 8192
    assert max_logit_diff(model, hf_model, 8192) <= TOL

    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours_tok = load_megaforge_model(run)[2]
    for text in ["Hello, world!", "  It was the best of times,\n\tit was the worst of times.", "café 東京 🙂"]:
        assert tok(text, add_special_tokens=False)["input_ids"] == ours_tok.encode(text)

    # greedy decoding agrees token for token, and the pipeline runs offline
    prompt = torch.tensor([ours_tok.encode("It was the")])
    ours_new = generate(model, prompt, max_new_tokens=6, temperature=0.0)[0].tolist()
    theirs = hf_model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=1)[0, prompt.shape[1]:]
    assert theirs.tolist() == ours_new
    pipe = transformers.pipeline("text-generation", model=str(out), device="cpu")
    text = pipe("It was the", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("It was the")


def test_export_llama_style_run_with_gqa(tmp_path):
    run, model = make_run(tmp_path / "run", LLAMA_STYLE)
    out = export_hf(run, tmp_path / "hf", verify=True)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2
    assert config["tie_word_embeddings"] is False
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert isinstance(hf_model, transformers.LlamaForCausalLM)
    assert hf_model.config.rope_parameters["rope_theta"] == 50000.0
    assert max_logit_diff(model, hf_model, 8192) <= TOL


def test_sharded_export_loads(tmp_path):
    run, model = make_run(tmp_path / "run", LLAMA_STYLE)
    out = export_hf(run, tmp_path / "hf", max_shard_size="200KB")
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert max_logit_diff(model, hf_model, 8192) <= TOL
    # importing the shards back gives our weights exactly (8192 ids need no vocabulary padding)
    back, _, _ = load_megaforge_model(import_hf(out, tmp_path / "mf"))
    back_state = back.state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(back_state[name], t), name


def test_bf16_export_verifies(tmp_path):
    run, _ = make_run(tmp_path / "run", GPT2_STYLE)
    out = export_hf(run, tmp_path / "hf", dtype="bf16", verify=True)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as h:
        assert h.get_tensor("transformer.wte.weight").dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["english-bpe", "english-t5-spm", "english-wordpiece"])
def test_exported_tokenizers_give_our_ids(tmp_path, name):
    from toolkit.tokenization import load_tokenizer, shipped_tokenizers
    from toolkit.tokenization.export import export_tokenizer

    assert name in shipped_tokenizers()
    ours = load_tokenizer(name)
    export_tokenizer(ours, tmp_path, model_max_length=128)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert theirs.model_max_length == 128
    for text in ["Hello, world!", "  Leading spaces,\n\ttabs   and runs ", "naïve café — 東京 🙂", "ﬁne ① HbA1c 7.2%"]:
        assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text), text


def test_transforms_are_exact_inverses():
    ctx = MappingContext(num_layers=1, hidden_size=8, num_heads=4, num_kv_heads=2, head_dim=2, vocab_size=10,
                         padded_vocab_size=16, flags={})
    shapes = {"gpt2.qkv_weight": [(8, 8), (4, 8), (4, 8)], "gpt2.qkv_bias": [(8,), (4,), (4,)],
              "transpose": [(8, 3)], "identity": [(5,)], "megatron.qkv": [(8, 8), (4, 8), (4, 8)],
              "megatron.swiglu": [(6, 8), (6, 8)]}
    for name, shape_list in shapes.items():
        ours = [torch.randn(s) for s in shape_list]
        t = TRANSFORMS[name]
        back = t.from_hf(t.to_hf(ours, ctx), ctx)
        assert all(torch.equal(a, b) for a, b in zip(ours, back)), name
    rows = torch.randn(16, 3)
    rows[10:] = 0
    assert torch.equal(TRANSFORMS["vocab_rows"].from_hf(TRANSFORMS["vocab_rows"].to_hf([rows], ctx), ctx)[0], rows)


def test_reverse_map_is_derived_from_the_same_table():
    ctx = MappingContext(num_layers=3, hidden_size=8, num_heads=2, num_kv_heads=2, head_dim=4, vocab_size=10,
                         padded_vocab_size=16, flags={"tied": False, "bias": True})
    for table in (GPT2_TABLE, LLAMA_TABLE):
        forward, reverse = table.name_map("to_hf", ctx), table.name_map("from_hf", ctx)
        for ours, hf_names in forward.items():
            assert all(ours in reverse[h] for h in hf_names)
        assert "layers.2.attn.q.weight" in forward


def test_unexportable_architecture_is_one_line_error():
    from toolkit.config import ModelConfig

    with pytest.raises(CheckpointError, match="match neither GPT-2") as e:
        select_target(ModelConfig(position_embedding_type="rope", normalization="LayerNorm", activation="gelu"))
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="grouped-query"):
        select_target(ModelConfig(num_query_groups=2))


def test_cli_convert_verify_and_exit_codes(tmp_path, capsys):
    run, _ = make_run(tmp_path / "run", GPT2_STYLE)
    assert main(["convert", str(run), str(tmp_path / "hf"), "--to", "hf", "--verify"]) == 0
    assert "verification passed" in capsys.readouterr().out
    # a tolerance nothing can meet: verification fails with exit 1 and reports the difference
    assert main(["convert", str(run), str(tmp_path / "hf2"), "--to", "hf", "--verify", "--tolerance", "-1"]) == 1
    err = capsys.readouterr().err
    assert "max |logit difference|" in err and len(err.strip().splitlines()) == 1
    # an import whose tensor has the wrong shape: exit 2, one line naming the tensor
    hf = tmp_path / "hf_bad"
    save_hf_model("gpt2", hf)
    from safetensors.torch import load_file, save_file

    weights = load_file(hf / "model.safetensors")
    weights["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(32, 100)
    save_file(weights, hf / "model.safetensors", metadata={"format": "pt"})
    proc = run_cli("convert", str(hf), str(tmp_path / "mf_bad"), "--to", "megaforge", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "transformer.h.1.mlp.c_fc.weight" in lines[0]


def test_cli_import_then_generate(tmp_path):
    hf = tmp_path / "hf"
    save_hf_model("llama", hf, vocab_size=8192)
    assert main(["convert", str(hf), str(tmp_path / "mf"), "--to", "megaforge", "--verify",
                 "--tokenizer", "english-bpe"]) == 0
    assert main(["generate", str(tmp_path / "mf"), "--prompt", "It was", "--max-new-tokens", "3"]) == 0


def test_unsupported_model_type_is_clear(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(CheckpointError, match="model_type 'mamba' is not supported"):
        import_hf(tmp_path / "x", tmp_path / "out")
