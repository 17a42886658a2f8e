"""``megaforge publish`` end to end against a local Hub stand-in (tests/conversion/hub_server.py).

A tiny GPT run is exported with ``export_hf``, published (one commit: regular files as base64 in
the commit, ``model.safetensors`` through the LFS batch API), downloaded back with
``snapshot_download`` and compared byte for byte. Also: the dry run sends nothing, training data
and unloadable folders are refused with one line and exit 2, ``--private``/``--revision`` reach the
server, and the token never shows up in the output, the card or the files.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, constants, snapshot_download
from safetensors.torch import load_file, save_file

from tests.conftest import run_cli
from tests.conversion.conftest import GPT2_STYLE, make_run
from tests.conversion.hub_server import HubServer
from toolkit.cli import main
from toolkit.convert.hf import export_hf
from toolkit.hub import CardOptions, PublishError, publish

pytestmark = [pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
              # huggingface_hub's LFS PUT passes a file object as data=; httpx notes it prefers content=
              pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")]
TOKEN = "hf_megaforgeTestToken1234567890"  # what the stand-in Hub accepts; must never be printed
LAYOUT = {"tp": 2, "pp": 1, "dp": 2}
METRICS = [{"step": 1, "loss": 6.5, "lr": 1e-3}, {"step": 2, "loss": 5.25, "val_loss": 5.5, "val_ppl": 244.69},
           {"step": 3, "loss": 4.875, "lr": 1e-3}, {"step": 4, "loss": 1.0}]  # step 4 is after the checkpoint


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A tiny GPT-2-style run (checkpoint at step 3, trained on tp2 × dp2) exported for transformers."""
    root = tmp_path_factory.mktemp("publish")
    run, _ = make_run(root / "tiny-gpt", GPT2_STYLE)
    state = run / "checkpoints" / "step_1" / "trainer_state.json"
    state.write_text(json.dumps({"step": 3, "consumed_samples": 48, "layout": LAYOUT, "seed": 7}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in METRICS))
    return export_hf(run, root / "hf")


@pytest.fixture
def folder(export, tmp_path) -> Path:
    return Path(shutil.copytree(export, tmp_path / "hf"))


@pytest.fixture
def hub(monkeypatch):
    """The stand-in Hub, with this process's huggingface_hub pointed at it (endpoint and token from
    the environment at call time; LFS instead of Xet uploads; online)."""
    with HubServer(TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        yield server


def download(hub: HubServer, repo_id: str, dest: Path, **kw) -> Path:
    return Path(snapshot_download(repo_id, endpoint=hub.url, token=TOKEN, cache_dir=dest, **kw))


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_publish_uploads_one_commit_and_downloads_back_identical(folder, tmp_path):
    with HubServer(TOKEN) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
               "HF_HOME": str(tmp_path / "hf-home")}
        out = run_cli("publish", str(folder), "tester/tiny-gpt", "--license", "apache-2.0", "--tag", "demo", env=env)
        assert out.returncode == 0, out.stderr
        repo = hub.repos["tester/tiny-gpt"]
        commits = [r for r in hub.requests if r.method == "POST" and r.path.endswith("/commit/main")]
        assert len(commits) == 1 and len(repo.commits) == 2  # the Hub's initial commit + ours
        assert "model.safetensors" in repo.resolve("main").lfs  # large-file path: LFS batch + PUT
        assert any(r.method == "PUT" and r.path.startswith("/_lfs/upload/") for r in hub.requests)
        writes = [r for r in hub.requests if r.method == "POST" and "/_lfs/" not in r.path]
        assert writes and all(r.authorized for r in writes)  # the token from HF_TOKEN was sent
        local = files_of(folder)
        assert {"README.md", "megaforge.json", "config.json", "model.safetensors", "tokenizer.json"} <= set(local)
        back = download(hub, "tester/tiny-gpt", tmp_path / "cache")
    remote = files_of(back)
    assert set(remote) == set(local) | {".gitattributes"}
    for name, data in local.items():
        assert remote[name] == data, name
    assert "published:" in out.stdout and "model.safetensors" in out.stdout
    for text in [out.stdout, out.stderr] + [d.decode(errors="replace") for d in local.values()]:
        assert TOKEN not in text


def test_card_holds_recipe_layout_and_final_metrics(folder, hub, capsys):
    plan = publish(folder, "tester/tiny-gpt", dry_run=True,
                   card_options=CardOptions(license="mit", tags=("demo",), datasets=("tester/notes",),
                                            base_model="openai-community/gpt2"))
    card = ModelCard(plan.card)
    meta = card.data.to_dict()
    assert meta["license"] == "mit" and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation" and meta["language"] == ["en"]
    assert {"megaforge", "gpt2", "demo"} <= set(meta["tags"])
    assert meta["datasets"] == ["tester/notes"] and meta["base_model"] == "openai-community/gpt2"
    body = card.text
    assert "`tiny-gpt` recipe" in body and "checkpoint step 3" in body
    assert "tensor parallel 2 × pipeline parallel 1 × data parallel 2" in body
    assert "| training loss | 4.8750 |" in body  # the last record up to the checkpoint, not step 4's
    assert "| validation loss (step 2) | 5.5000 |" in body
    assert 'AutoModelForCausalLM.from_pretrained("tester/tiny-gpt")' in body
    assert not (folder / "README.md").exists() and hub.requests == []


def test_dry_run_sends_and_writes_nothing(folder, hub, capsys, monkeypatch):
    before = files_of(folder)
    attempts = []  # any connection at all (to the stand-in Hub or anywhere else), even one caught inside

    def no_network(sock, address):
        attempts.append(address)
        raise OSError("network used during a dry run")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert main(["publish", str(folder), "tester/tiny-gpt", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert hub.requests == [] and attempts == []
    assert files_of(folder) == before
    for name, _data in before.items():
        assert name in out
    size = (folder / "model.safetensors").stat().st_size
    assert f"{size / 2**20:.1f} MiB" in out or f"{size / 2**10:.1f} KiB" in out
    assert "total:" in out and "library_name: transformers" in out and TOKEN not in out


def test_existing_card_is_kept_unless_overwrite(folder, hub):
    (folder / "README.md").write_text("---\nlicense: mit\n---\n\n# my own card\n")
    assert publish(folder, "tester/a", dry_run=True).card.endswith("# my own card\n")
    assert "## Training recipe" in publish(folder, "tester/a", dry_run=True, overwrite_card=True).card


@pytest.mark.parametrize("name", ["train.jsonl", "notes.txt", "corpus.bin", "corpus.idx", "__0_0.distcp",
                                  "notes.parquet", "pytorch_model.bin", "huge.json"])
def test_training_data_is_refused(folder, hub, capsys, name):
    path = folder / name
    path.write_bytes(b"{}")
    if name == "huge.json":  # a sparse file: large, nothing written
        with open(path, "r+b") as fh:
            fh.truncate(65 * 2**20)
    assert main(["publish", str(folder), "tester/tiny-gpt", "--include", "*"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and name in err and "refusing" in err
    assert hub.requests == []


def test_unlisted_file_needs_include(folder, hub, capsys):
    (folder / "loss.png").write_bytes(b"\x89PNG")
    assert main(["publish", str(folder), "tester/tiny-gpt", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "loss.png" in err and "--include" in err
    assert main(["publish", str(folder), "tester/tiny-gpt", "--dry-run", "--include", "loss.png"]) == 0
    assert "loss.png" in capsys.readouterr().out and hub.requests == []


def _drop_a_tensor(folder: Path) -> None:
    weights = load_file(folder / "model.safetensors")
    weights.pop(next(k for k in weights if k.endswith("mlp.c_fc.weight")))
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def _unknown_model_type(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "no-such-model"}))


def _no_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        (folder / name).unlink(missing_ok=True)


@pytest.mark.parametrize("damage, words", [(_drop_a_tensor, "missing keys"), (_unknown_model_type, "config.json"),
                                           (_no_tokenizer, "tokenizer")])
def test_folder_that_does_not_load_is_refused(folder, hub, capsys, damage, words):
    damage(folder)
    assert main(["publish", str(folder), "tester/tiny-gpt"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err
    assert hub.requests == []


def test_run_directory_is_refused(export, hub, capsys):
    assert main(["publish", str(export.parent / "tiny-gpt"), "tester/tiny-gpt"]) == 2
    assert "convert" in capsys.readouterr().err and hub.requests == []


def test_private_and_revision_reach_the_server(folder, hub, tmp_path, capsys):
    publish(folder, "tester/private-gpt", private=True, revision="v1")
    repo = hub.repos["tester/private-gpt"]
    assert hub.created[-1]["visibility"] == "private" and repo.private
    assert any(r.path == "/api/models/tester/private-gpt/branch/v1" for r in hub.requests)
    assert set(repo.resolve("main").files) == {".gitattributes"}  # main untouched: the commit went to v1
    assert {"config.json", "model.safetensors", "README.md"} <= set(repo.resolve("v1").files)
    with pytest.raises(Exception):  # noqa: B017 - private: no download without the token, whatever the error class
        snapshot_download("tester/private-gpt", endpoint=hub.url, token=False, revision="v1", cache_dir=tmp_path / "c")
    back = download(hub, "tester/private-gpt", tmp_path / "cache", revision="v1")
    assert (back / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert TOKEN not in capsys.readouterr().out


def test_private_into_existing_public_repo_is_refused(folder, hub):
    publish(folder, "tester/public-gpt")
    commits = len(hub.repos["tester/public-gpt"].commits)
    with pytest.raises(PublishError, match="already exists and is public"):
        publish(folder, "tester/public-gpt", private=True)
    assert len(hub.repos["tester/public-gpt"].commits) == commits


def test_bad_token_is_one_line(folder, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    assert main(["publish", str(folder), "tester/tiny-gpt"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "401" in err and "hf auth login" in err
    assert "hf_wrong" not in err and "tester/tiny-gpt" not in hub.repos
    assert not (folder / "README.md").exists()  # the card is written only once published


def test_repo_id_needs_a_namespace(folder, hub, capsys):
    assert main(["publish", str(folder), "tiny-gpt", "--dry-run"]) == 2
    assert "NAMESPACE/NAME" in capsys.readouterr().err and hub.requests == []
