"""T5 ↔ Hugging Face T5ForConditionalGeneration (v1.0: ReLU, tied + output scaling; v1.1: gated-GELU,
untied lm_head): import, export, round trips, the untied head under transformers 5, tokenizer, generation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conversion.conftest import (
    T5_V10_STYLE,
    T5_V11_STYLE,
    assert_same_safetensors,
    make_run,
    read_safetensors,
    save_hf_model,
    seq2seq_logit_diff,
    transformers,
)
from toolkit.checkpoint import load_megaforge_model
from toolkit.cli import main
from toolkit.convert import export_hf, import_hf
from toolkit.errors import CheckpointError
from toolkit.models.t5 import generate_seq2seq

TOL = 1e-4
# native checkpoints load through DCP without a process group, on purpose
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
#: case → (kind for save_hf_model, config overrides, expected activation, tied)
HF_CASES = {
    "t5-v1_0": ("t5", {}, "relu", True),
    "t5-v1_1": ("t5-v1_1", {}, "geglu", False),
    "t5-gated-silu-dkv": ("t5-v1_1", {"feed_forward_proj": "gated-silu", "d_kv": 6}, "swiglu", False),
}


@pytest.fixture(scope="module", params=sorted(HF_CASES))
def imported(request, tmp_path_factory):
    kind, kw, _, _ = HF_CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    hf_model = save_hf_model(kind, root / "hf", **kw)
    out = import_hf(root / "hf", root / "mf")
    return request.param, root, hf_model, out


def test_import_matches_transformers(imported):
    case, root, hf_model, out = imported
    _, _, activation, tied = HF_CASES[case]
    ours, cfg, _ = load_megaforge_model(out)
    m = cfg.model
    assert (m.family, m.activation, m.share_embeddings_and_output_weights) == ("t5", activation, tied)
    assert (m.num_layers, m.num_decoder_layers, m.vocab_size, ours.padded_vocab_size) == (2, 3, 1000, 1024)
    if not tied:  # the v1.1 head really is separate from the embedding on both sides
        assert not torch.equal(hf_model.lm_head.weight, hf_model.shared.weight)
        assert torch.equal(ours.head.weight[:1000], hf_model.lm_head.weight)
    assert seq2seq_logit_diff(ours, hf_model, 1000) <= TOL


def test_round_trip_is_bit_identical(imported):
    _, root, _, out = imported
    export_hf(out, root / "back")
    assert_same_safetensors(root / "hf", root / "back")


def test_round_trip_with_vocabulary_padded_for_tp2(tmp_path):
    # 1100 ids: padded to 1152 for tp=1 but 1280 for tp=2; shared and the untied lm_head come back exact
    hf_model = save_hf_model("t5-v1_1", tmp_path / "hf", vocab_size=1100)
    out = import_hf(tmp_path / "hf", tmp_path / "mf", tensor_parallel_size=2)
    ours, cfg, _ = load_megaforge_model(out)
    assert ours.embed.weight.shape[0] == 1280 and ours.head.weight.shape[0] == 1280
    assert seq2seq_logit_diff(ours, hf_model, 1100) <= TOL
    export_hf(out, tmp_path / "back")
    assert "lm_head.weight" in assert_same_safetensors(tmp_path / "hf", tmp_path / "back")


@pytest.mark.parametrize("style", [T5_V10_STYLE, T5_V11_STYLE], ids=["v1_0", "v1_1"])
def test_export_loads_in_transformers(tmp_path, style):
    run, model = make_run(tmp_path / "run", dict(style, make_vocab_size_divisible_by=96), tokenizer="english-t5-spm")
    vocab = model.vocab_size
    assert model.padded_vocab_size > vocab  # 8000 → 8064: the export cuts it
    out = export_hf(run, tmp_path / "hf", verify=True)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "spiece.model", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json"} <= files
    tied = style["share_embeddings_and_output_weights"]
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied and config["scale_decoder_outputs"] is tied
    assert config["decoder_start_token_id"] == 0 and config["d_kv"] == (6 if tied else 8)
    assert ("lm_head.weight" in read_safetensors(out)) is not tied
    hf_model = transformers.AutoModelForSeq2SeqLM.from_pretrained(out, dtype=torch.float32).eval()
    assert isinstance(hf_model, transformers.T5ForConditionalGeneration)
    assert hf_model.shared.weight.shape[0] == vocab
    # transformers 5 always marks T5 configs tied; the exported untied head must survive loading
    assert (hf_model.lm_head.weight.data_ptr() == hf_model.shared.weight.data_ptr()) is tied
    assert seq2seq_logit_diff(model, hf_model, vocab) <= TOL

    # the tokenizer gives our ids, appends </s> like T5's, and greedy decoding agrees token for token
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours_tok = load_megaforge_model(run)[2]
    text = "It was the best of times, it was the worst of times."
    enc = tok(text, return_tensors="pt")
    assert enc["input_ids"][0].tolist() == ours_tok.encode(text) + [ours_tok.eos_id]
    ours_new = generate_seq2seq(model, enc["input_ids"], max_new_tokens=6, decoder_start_id=0)[0].tolist()
    theirs = hf_model.generate(**enc, max_new_tokens=6, do_sample=False, min_new_tokens=6)[0, 1:].tolist()
    assert theirs == ours_new


def test_untied_checkpoint_saved_tied_by_transformers5_imports_with_copied_head(tmp_path):
    # a v1.1-style config (no output scaling) whose file has no lm_head.weight: transformers ties the
    # head to shared, so the import gets an untied head equal to shared
    model = save_hf_model("t5-v1_1", tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True,
                                                             "scale_decoder_outputs": False}))
    hf_model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert torch.equal(hf_model.lm_head.weight, model.shared.weight)
    ours, cfg, _ = load_megaforge_model(import_hf(tmp_path / "hf", tmp_path / "mf"))
    assert cfg.model.share_embeddings_and_output_weights is False
    assert torch.equal(ours.head.weight, ours.embed.weight)
    assert seq2seq_logit_diff(ours, hf_model, 1000) <= TOL


def test_exported_t5_tokenizer_gives_our_ids(tmp_path):
    from toolkit.tokenization import load_tokenizer
    from toolkit.tokenization.export import export_tokenizer

    ours = load_tokenizer("english-t5-spm")
    export_tokenizer(ours, tmp_path, model_max_length=128, tokenizer_class="T5Tokenizer")
    assert (tmp_path / "spiece.model").read_bytes() == ours.model_proto
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert len(theirs) == ours.vocab_size  # no sentinels appended: they are pieces of the model already
    texts = ["Hello, world!", "  Leading spaces,\n\ttabs   and runs ", "naïve café — 東京 🙂", "HbA1c 7.2% ①"]
    for text in texts:
        assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text), text
    assert theirs.convert_tokens_to_ids([f"<extra_id_{i}>" for i in (0, 1, 99)]) == \
        [ours.sentinel_ids[i] for i in (0, 1, 99)]
    assert "token_type_ids" not in theirs("a b")  # T5's forward takes none
    ids = theirs("the cat")["input_ids"]
    assert ids[-1] == ours.eos_id and theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids)


def test_unsupported_or_mismatched_checkpoints_are_one_line_errors(tmp_path):
    hf = tmp_path / "hf"
    save_hf_model("t5", hf)
    weights = load_file(hf / "model.safetensors")
    name = "decoder.block.2.layer.1.EncDecAttention.k.weight"
    save_file(dict(weights, **{name: torch.zeros(32, 5)}), hf / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")) as e:
        import_hf(hf, tmp_path / "out1")
    assert "\n" not in str(e.value)
    save_file(weights, hf / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "feed_forward_proj": "gated-relu"}))
    with pytest.raises(CheckpointError, match="feed_forward_proj='gated-relu' is not supported"):
        import_hf(hf, tmp_path / "out2")


def test_cli_round_trip_with_verify(tmp_path, capsys):
    run, _ = make_run(tmp_path / "run", T5_V11_STYLE, tokenizer="english-t5-spm")
    assert main(["convert", str(run), str(tmp_path / "hf"), "--to", "hf", "--verify"]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "mf"), "--to", "megaforge", "--verify"]) == 0
    out = capsys.readouterr().out
    assert out.count("verification passed") == 2 and "tokenizer ids match" in out


def test_table_expands_encoder_and_decoder_stacks_separately():
    from toolkit.mapping.tables import MappingContext
    from toolkit.models.t5.hf import T5_TABLE

    ctx = MappingContext(num_layers=2, hidden_size=8, num_heads=2, num_kv_heads=2, head_dim=4, vocab_size=10,
                         padded_vocab_size=16, flags={"decoder_layers": 3, "gated": True, "tied": False})
    forward, reverse = T5_TABLE.name_map("to_hf", ctx), T5_TABLE.name_map("from_hf", ctx)
    assert "decoder.layers.2.cross_attn.k.weight" in forward and "encoder.layers.2.attn.q.weight" not in forward
    assert forward["encoder.layers.1.mlp.gate.weight"] == ("encoder.block.1.layer.1.DenseReluDense.wi_0.weight",)
    assert forward["decoder.layers.2.mlp.fc1.weight"] == ("decoder.block.2.layer.2.DenseReluDense.wi_1.weight",)
    for ours, hf_names in forward.items():  # the reverse direction comes from the same table
        assert all(ours in reverse[h] for h in hf_names)
