"""BERT ↔ Hugging Face (BertForPreTraining/MaskedLM post-LN, MegatronBertForPreTraining/MaskedLM pre-LN):
import, export, round trips (also with the vocabulary padded for tp=2), tokenizer, fill-mask, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conversion.conftest import (
    BERT_STYLE,
    MEGATRON_BERT_STYLE,
    assert_same_safetensors,
    make_run,
    mlm_logit_diff,
    read_safetensors,
    save_hf_model,
    transformers,
)
from toolkit.checkpoint import load_megaforge_model
from toolkit.cli import main
from toolkit.config import ModelConfig
from toolkit.convert import export_hf, import_hf
from toolkit.errors import CheckpointError
from toolkit.models.bert.hf import select_target

TOL = 1e-4
# native checkpoints load through DCP without a process group, on purpose
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
#: case → (kind for save_hf_model, config overrides, expected layernorm_position, binary head)
HF_CASES = {
    "bert-pretraining": ("bert", {}, "post", True),
    "bert-mlm-relu-3types": ("bert-mlm", {"hidden_act": "relu", "type_vocab_size": 3}, "post", False),
    "megatron-bert-pretraining": ("megatron-bert", {"hidden_act": "gelu_new"}, "pre", True),
    "megatron-bert-mlm": ("megatron-bert-mlm", {}, "pre", False),
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
    _, _, position, binary = HF_CASES[case]
    ours, cfg, _ = load_megaforge_model(out)
    m = cfg.model
    assert (m.family, m.layernorm_position, m.bert_binary_head) == ("bert", position, binary)
    assert m.vocab_size == 1000 and ours.padded_vocab_size == 1024
    assert m.num_tokentypes == hf_model.config.type_vocab_size
    assert mlm_logit_diff(ours, hf_model, 1000) <= TOL


def test_round_trip_is_bit_identical(imported):
    _, root, _, out = imported
    export_hf(out, root / "back")
    assert_same_safetensors(root / "hf", root / "back")
    # the exported class is the one imported: *ForMaskedLM stays without pooler and NSP head
    assert (json.loads((root / "back" / "config.json").read_text())["architectures"]
            == json.loads((root / "hf" / "config.json").read_text())["architectures"])


def test_round_trip_with_vocabulary_padded_for_tp2(tmp_path):
    # 1100 ids: padded to 1152 for tp=1 but 1280 for tp=2 (128 × 2); the padding never leaks out
    hf_model = save_hf_model("megatron-bert", tmp_path / "hf", vocab_size=1100)
    out = import_hf(tmp_path / "hf", tmp_path / "mf", tensor_parallel_size=2)
    ours, cfg, _ = load_megaforge_model(out)
    assert cfg.parallel.tensor_model_parallel_size == 2 and ours.embed.tokens.weight.shape[0] == 1280
    assert ours.lm_head.bias.shape[0] == 1280 and not ours.lm_head.bias[1100:].any()
    assert mlm_logit_diff(ours, hf_model, 1100) <= TOL
    export_hf(out, tmp_path / "back")
    assert_same_safetensors(tmp_path / "hf", tmp_path / "back")


@pytest.mark.parametrize("style,tokenizer,cls", [(BERT_STYLE, "english-wordpiece", "BertForPreTraining"),
                                                 (MEGATRON_BERT_STYLE, "clinical-wordpiece",
                                                  "MegatronBertForPreTraining")])
def test_export_loads_in_transformers(tmp_path, style, tokenizer, cls):
    # make_vocab_size_divisible_by=96 pads the vocabulary (8192 → 8256, 2970 → 3072): exports cut it
    run, model = make_run(tmp_path / "run", dict(style, make_vocab_size_divisible_by=96), tokenizer=tokenizer)
    vocab = model.vocab_size
    assert model.padded_vocab_size > vocab
    out = export_hf(run, tmp_path / "hf", verify=True)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json"} <= files
    assert "generation_config.json" not in files  # an encoder generates nothing
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.vocab_size == vocab and config.architectures == [cls]
    hf_model = getattr(transformers, cls).from_pretrained(out, dtype=torch.float32).eval()
    assert hf_model.bert.embeddings.word_embeddings.weight.shape[0] == vocab
    assert mlm_logit_diff(model, hf_model, vocab) <= TOL
    # loadable as the masked-LM class too (pooler and NSP head dropped)
    mlm = transformers.AutoModelForMaskedLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(mlm).__name__ == cls.replace("PreTraining", "MaskedLM")
    ids = torch.randint(0, vocab, (1, 9), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(mlm(input_ids=ids).logits, hf_model(input_ids=ids).prediction_logits, atol=1e-5)


def test_model_without_binary_head_or_token_types_exports_to_masked_lm(tmp_path):
    run, model = make_run(tmp_path / "run", dict(BERT_STYLE, bert_binary_head=False, num_tokentypes=0),
                          tokenizer="english-wordpiece")
    out = export_hf(run, tmp_path / "hf", verify=True)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"] and config["type_vocab_size"] == 2
    weights = read_safetensors(out)
    assert not any(n.startswith(("bert.pooler.", "cls.seq_relationship.")) for n in weights)
    assert not weights["bert.embeddings.token_type_embeddings.weight"].any()  # zero rows: add nothing
    hf_model = transformers.AutoModelForMaskedLM.from_pretrained(out, dtype=torch.float32).eval()
    assert isinstance(hf_model, transformers.BertForMaskedLM)
    assert mlm_logit_diff(model, hf_model, model.vocab_size) <= TOL  # HF gets segment ids 0/1, we none


def test_fill_mask_pipeline_runs_offline(tmp_path):
    run, model = make_run(tmp_path / "run", MEGATRON_BERT_STYLE, tokenizer="clinical-wordpiece")
    out = export_hf(run, tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours_tok = load_megaforge_model(run)[2]
    text = "Patient denies chest pain and [MASK] of breath."
    pipe = transformers.pipeline("fill-mask", model=str(out), device="cpu")
    top = pipe(text, top_k=3)
    assert len(top) == 3 and all(0 <= r["token"] < ours_tok.vocab_size for r in top)
    # the pipeline's best token is our model's argmax at the mask (same ids, [CLS] … [SEP] included)
    enc = tok(text, return_tensors="pt")
    assert enc["input_ids"][0].tolist() == [ours_tok.cls_id, *ours_tok.encode(text), ours_tok.sep_id]
    with torch.no_grad():
        logits = model(enc["input_ids"], token_types=enc["token_type_ids"])["mlm_logits"]
    where = enc["input_ids"][0].tolist().index(ours_tok.mask_id)
    assert top[0]["token"] == int(logits[0, where, : model.vocab_size].argmax())


@pytest.mark.parametrize("name", ["english-wordpiece", "clinical-wordpiece"])
def test_exported_wordpiece_tokenizer_gives_our_ids(tmp_path, name):
    from toolkit.tokenization import load_tokenizer
    from toolkit.tokenization.export import export_tokenizer

    ours = load_tokenizer(name)
    export_tokenizer(ours, tmp_path, model_max_length=64, tokenizer_class="BertTokenizer")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert type(theirs).__name__.startswith("BertTokenizer") and theirs.mask_token == "[MASK]"
    texts = ["Hello, world!", "  Leading spaces,\n\ttabs   and runs ", "naïve café — 東京 🙂",
             "Pt c/o SOB x3d; HbA1c 7.2% (ﬁne ①)", "ÀÉÎõü Straße [MASK] done"]
    for text in texts:
        assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text), text
    pair = theirs("first part", "second part")
    a, b = ours.encode("first part"), ours.encode("second part")
    assert pair["input_ids"] == [ours.cls_id, *a, ours.sep_id, *b, ours.sep_id]
    assert pair["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)


def test_import_of_masked_lm_checkpoint_without_pooler_verifies(tmp_path):
    # a BertForMaskedLM folder has no pooler / NSP weights: the import has no binary head and
    # verification loads it as BertForMaskedLM
    save_hf_model("bert-mlm", tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "mf"), "--to", "megaforge", "--verify"]) == 0
    _, cfg, _ = load_megaforge_model(tmp_path / "mf")
    assert cfg.model.bert_binary_head is False


def test_headless_or_unsupported_checkpoints_are_one_line_errors(tmp_path):
    hf = tmp_path / "hf"
    save_hf_model("bert", hf)
    weights = load_file(hf / "model.safetensors")
    # a tensor of the wrong shape: the error names it
    bad = dict(weights, **{"bert.encoder.layer.1.intermediate.dense.weight": torch.zeros(48, 7)})
    save_file(bad, hf / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="bert.encoder.layer.1.intermediate.dense.weight") as e:
        import_hf(hf, tmp_path / "out1")
    assert "\n" not in str(e.value)
    # a BertModel checkpoint (no masked-LM head)
    headless = {k: v for k, v in weights.items() if not k.startswith("cls.")}
    save_file(headless, hf / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="no masked-LM head"):
        import_hf(hf, tmp_path / "out2")
    # an unsupported setting in config.json
    save_file(weights, hf / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "position_embedding_type": "relative_key"}))
    assert main(["convert", str(hf), str(tmp_path / "out3"), "--to", "megaforge"]) == 2


def test_unexportable_bert_is_one_line_error():
    with pytest.raises(CheckpointError, match="LayerNorm") as e:
        select_target(ModelConfig(family="bert", normalization="RMSNorm"))
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="grouped-query"):
        select_target(ModelConfig(family="bert", num_query_groups=2))
    assert select_target(ModelConfig(family="bert", layernorm_position="pre",
                                     bert_binary_head=False)).architecture == "MegatronBertForMaskedLM"


def test_cli_export_verify_exit_codes(tmp_path, capsys):
    run, _ = make_run(tmp_path / "run", BERT_STYLE, tokenizer="english-wordpiece")
    assert main(["convert", str(run), str(tmp_path / "hf"), "--to", "hf", "--verify"]) == 0
    assert "verification passed" in capsys.readouterr().out
    assert main(["convert", str(run), str(tmp_path / "hf2"), "--to", "hf", "--verify", "--tolerance", "-1"]) == 1
    err = capsys.readouterr().err
    assert "max |logit difference|" in err and len(err.strip().splitlines()) == 1


def test_zero_token_types_transform_is_exact_inverse():
    from toolkit.mapping.tables import TRANSFORMS, MappingContext

    ctx = MappingContext(num_layers=1, hidden_size=3, num_heads=1, num_kv_heads=1, head_dim=3, vocab_size=10,
                         padded_vocab_size=16, flags={})
    words = torch.randn(16, 3)
    words[10:] = 0  # padding rows are zero in our tables
    t = TRANSFORMS["bert.words_zero_types"]
    hf_words, types = t.to_hf([words], ctx)
    assert hf_words.shape == (10, 3) and types.shape == (2, 3) and not types.any()
    assert torch.equal(t.from_hf([hf_words, types], ctx)[0], words)


@pytest.mark.parametrize("kind", ["bert-headless", "megatron-bert-headless"])
def test_headless_encoder_imports_with_a_fresh_mlm_head(kind, tmp_path, capsys):
    """BertModel / MegatronBertModel folders (how most encoders, UFNLP/gatortron-base among them, are
    published): the encoder's hidden states match transformers; the MLM head starts fresh (one line)."""
    theirs = save_hf_model(kind, tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "mf"), "--to", "megaforge", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "verification passed" in out and "lm_head.* initialized fresh" in out
    ours, cfg, _ = load_megaforge_model(tmp_path / "mf")
    assert cfg.model.layernorm_position == ("pre" if kind.startswith("megatron") else "post")
    assert cfg.model.bert_binary_head is False
    ids = torch.randint(0, 1000, (2, 10))
    with torch.no_grad():
        diff = (ours.encode(ids) - theirs(input_ids=ids).last_hidden_state).abs().max().item()
    assert diff < 1e-4
    assert torch.equal(ours.lm_head.bias, torch.zeros_like(ours.lm_head.bias))
    assert torch.equal(ours.lm_head.norm.weight, torch.ones_like(ours.lm_head.norm.weight))


TASK_IMPORTS = {  # transformers class (conftest kind), config.json labels → our task section
    "bert-token": (dict(id2label={0: "O", 1: "B-Drug", 2: "I-Drug"}), "token_classification", ["O", "B-Drug", "I-Drug"]),
    "megatron-bert-token": (dict(id2label={0: "O", 1: "B-X", 2: "I-X"}), "token_classification", ["O", "B-X", "I-X"]),
    "bert-sequence": (dict(id2label={0: "neg", 1: "pos", 2: "neutral"}), "sequence_classification", ["neg", "pos", "neutral"]),
    "megatron-bert-sequence": (dict(num_labels=1, problem_type="regression"), "regression", []),
}


@pytest.mark.parametrize("kind", list(TASK_IMPORTS))
def test_fine_tuned_task_models_import_with_head_and_labels(kind, tmp_path, capsys):
    """*ForTokenClassification / *ForSequenceClassification (a model someone fine-tuned) import with
    the task head and labels, in id order, and give transformers' logits (``--verify`` and here)."""
    kw, task_type, labels = TASK_IMPORTS[kind]
    theirs = save_hf_model(kind, tmp_path / "hf", **kw)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "mf"), "--to", "megaforge", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "verification passed" in out and f"fine-tuned {task_type} model" in out
    ours, cfg, _ = load_megaforge_model(tmp_path / "mf")
    assert cfg.task.type == task_type and list(cfg.task.labels) == labels
    assert cfg.model.layernorm_position == ("pre" if kind.startswith("megatron") else "post")
    ids = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(ids), theirs(input_ids=ids).logits
    assert a.shape == b.squeeze(-1).shape if task_type == "regression" else a.shape == b.shape
    assert (a - b.reshape(a.shape)).abs().max().item() < TOL
    # and back: the export is the same transformers class with the same labels
    assert main(["convert", str(tmp_path / "mf"), str(tmp_path / "hf2"), "--to", "hf"]) == 0
    config = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert config["architectures"] == [type(theirs).__name__]
    assert config["id2label"] == {str(k): v for k, v in theirs.config.id2label.items()}


def test_task_import_with_bad_id2label_is_one_line_error(tmp_path):
    save_hf_model("bert-token", tmp_path / "hf", id2label={0: "O", 1: "B-X", 2: "I-X"})
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["id2label"] = {"0": "O", "2": "B-X", "3": "I-X"}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="id2label must name labels 0..n-1") as e:
        import_hf(tmp_path / "hf", tmp_path / "mf")
    assert "\n" not in str(e.value)
