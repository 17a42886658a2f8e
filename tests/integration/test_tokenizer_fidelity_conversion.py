"""Tokenizer fidelity through the conversion paths (issue 12, item 1): a BertForPreTraining folder whose
tokenizer.json lower-cases (saved by PreTrainedTokenizerFast, no do_lower_case) survives HF → megaforge
→ HF; a tokenizer that drifts fails import, export, init_from and publish with exit code 1 and one line
naming the first differing text and both id lists."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from toolkit.cli import main
from toolkit.tokenization.fidelity import TokenizerFidelityError

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
              pytest.mark.usefixtures("one_thread")]
TEXT = "Patient denies chest pain"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PIECES = ["pat", "##i", "##ent", "de", "##n", "##ies", "chest", "pain", "the", "and", "with"]


def _lowercasing_wordpiece() -> Tokenizer:
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = {t: i for i, t in enumerate(dict.fromkeys(SPECIALS + PIECES + list(letters) + [f"##{c}" for c in letters]))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The issue's folder: a tiny random BertForPreTraining plus a lower-casing WordPiece tokenizer,
    both saved with save_pretrained (tokenizer_config.json has no do_lower_case)."""
    folder = tmp_path_factory.mktemp("fidelity") / "hf"
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=_lowercasing_wordpiece(), unk_token="[UNK]",
                                               pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                               mask_token="[MASK]")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=64, pad_token_id=0)
    transformers.BertForPreTraining(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    assert "do_lower_case" not in json.loads((folder / "tokenizer_config.json").read_text())
    return folder


@pytest.fixture(scope="module")
def round_trip(source) -> tuple[Path, Path]:
    mf, back = source.parent / "mf", source.parent / "back"
    assert main(["convert", str(source), str(mf), "--to", "megaforge"]) == 0
    assert main(["convert", str(mf), str(back), "--to", "hf"]) == 0
    return mf, back


def _tokens(folder: Path, text: str = TEXT) -> list[str]:
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    return tok.convert_ids_to_tokens(tok(text)["input_ids"])


def _set_config(folder: Path, **fields) -> None:
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_lowercasing_survives_the_round_trip(source, round_trip):
    _, back = round_trip
    assert _tokens(source)[:4] == ["[CLS]", "pat", "##i", "##ent"]
    assert _tokens(back) == _tokens(source)
    config = json.loads((back / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "BertTokenizer" and config["do_lower_case"] is True
    a, b = load_file(source / "model.safetensors"), load_file(back / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_verify_reports_tokenizer_fidelity_beside_the_logits(source, round_trip, tmp_path, capsys):
    mf, _ = round_trip
    assert main(["convert", str(source), str(tmp_path / "mf"), "--to", "megaforge", "--verify"]) == 0
    assert main(["convert", str(mf), str(tmp_path / "hf"), "--to", "hf", "--verify"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "verification passed" in line]
    assert len(lines) == 2
    assert all("max |logit difference|" in line and "tokenizer ids match on" in line for line in lines)
    assert "source tokenizer" in lines[0]


def test_import_of_a_contradicting_config_exits_1(source, tmp_path, capsys):
    # what the old export wrote: BertTokenizer with do_lower_case false beside a lower-casing tokenizer.json
    bad = tmp_path / "bad"
    shutil.copytree(source, bad)
    _set_config(bad, tokenizer_class="BertTokenizer", do_lower_case=False)
    ours = transformers.AutoTokenizer.from_pretrained(str(source))(TEXT, add_special_tokens=False)["input_ids"]
    theirs = transformers.AutoTokenizer.from_pretrained(str(bad))(TEXT, add_special_tokens=False)["input_ids"]
    assert main(["convert", str(bad), str(tmp_path / "mf"), "--to", "megaforge"]) == 1
    err = _one_error_line(capsys)
    assert repr(TEXT) in err and str(ours) in err and str(theirs) in err
    assert not (tmp_path / "mf").exists()  # refused before anything was written
    assert main(["convert", str(bad), str(tmp_path / "mf2"), "--to", "megaforge", "--verify"]) == 1
    err = _one_error_line(capsys)
    assert "max |logit difference|" in err and repr(TEXT) in err and str(theirs) in err


def test_export_that_drifts_exits_1(round_trip, tmp_path, capsys, monkeypatch):
    import toolkit.convert.hf as hf

    mf, _ = round_trip
    real = hf.export_tokenizer

    def drifting(tokenizer, folder, **kw):  # an exporter that writes the old, wrong do_lower_case
        written = real(tokenizer, folder, **kw)
        _set_config(Path(folder), do_lower_case=False)
        return written

    monkeypatch.setattr(hf, "export_tokenizer", drifting)
    assert main(["convert", str(mf), str(tmp_path / "hf"), "--to", "hf"]) == 1
    err = _one_error_line(capsys)
    assert "tokenizer fidelity check failed" in err and repr(TEXT) in err


def test_publish_refuses_a_config_that_contradicts_tokenizer_json(round_trip, tmp_path, capsys):
    _, back = round_trip
    folder = tmp_path / "pub"
    shutil.copytree(back, folder)
    assert main(["publish", str(folder), "alice/bert-tiny", "--dry-run"]) == 0
    capsys.readouterr()
    _set_config(folder, do_lower_case=False)
    assert main(["publish", str(folder), "alice/bert-tiny", "--dry-run"]) == 1
    assert repr(TEXT) in _one_error_line(capsys)


def test_init_from_rechecks_a_cached_import(source, tmp_path):
    from toolkit.convert.init_from import resolve_init_from

    src = tmp_path / "src"
    shutil.copytree(source, src)
    folder, _ = resolve_init_from(str(src))  # imports into the cache, checked
    assert resolve_init_from(str(src))[0] == folder  # the cached import, checked again
    # a cached import whose tokenizer no longer lower-cases (made by an older megaforge, or edited)
    path = folder / "tokenizer" / "tokenizer.json"
    data = json.loads(path.read_text())
    data["normalizer"]["lowercase"] = False
    path.write_text(json.dumps(data))
    with pytest.raises(TokenizerFidelityError, match="Patient denies chest pain"):
        resolve_init_from(str(src))


def test_a_tokenizer_that_drifts_when_saved_fails_import_and_init_from(source, round_trip, tmp_path, monkeypatch,
                                                                        capsys):
    from toolkit.config import RunConfig
    from toolkit.convert.init_from import adopt_source_config
    from toolkit.tokenization.hf_tokenizers import HFTokenizer

    mf, _ = round_trip
    cfg = RunConfig()
    adopt_source_config(cfg, mf)  # the run's copy of the source tokenizer gives its ids
    assert cfg.tokenizer.path == str((mf / "tokenizer").resolve())
    real = HFTokenizer.save

    def drifting(self, folder):  # a save that loses the lower-casing
        written = real(self, folder)
        path = Path(folder) / "tokenizer.json"
        data = json.loads(path.read_text())
        data["normalizer"]["lowercase"] = False
        path.write_text(json.dumps(data))
        return written

    monkeypatch.setattr(HFTokenizer, "save", drifting)
    with pytest.raises(TokenizerFidelityError, match="the run's copy"):
        adopt_source_config(RunConfig(), mf)
    assert main(["convert", str(source), str(tmp_path / "mf"), "--to", "megaforge"]) == 1
    err = _one_error_line(capsys)
    assert "its copy saved in" in err and repr(TEXT) in err
