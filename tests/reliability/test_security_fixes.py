"""The fixes of docs/security.md's findings, each checked in process on tiny fixtures.

* DCP checkpoints are read through ``toolkit.checkpoint.safe_dcp``: a ``.metadata`` is unpickled with an
  allow-list that covers what real checkpoints hold (plain, bf16, FSDP2-sharded), a crafted one is a
  one-line ``CheckpointError`` from every reader and runs nothing; non-tensor entries load with
  ``weights_only=True``; every ``FileSystemReader``/``dcp.load`` in ``toolkit/`` goes through it.
* A safetensors index cannot name files outside its folder; ``megaforge.json`` holds no local paths;
  ``publish`` validates the repository id first and refuses links out of the folder; a tokenizer spec
  name is a plain name; an import never overwrites a run; ``transformers`` is called with
  ``trust_remote_code=False`` (and ``use_safetensors=True`` where verification loads safetensors).
"""

from __future__ import annotations

import ast
import io
import json
import os
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import REPO
from toolkit.checkpoint import CheckpointManager, load_model_weights, safe_dcp
from toolkit.checkpoint.reshard import has_optimizer_state, saved_tensor_shapes
from toolkit.errors import CheckpointError, ConfigError, MegaforgeError

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0, dtype=torch.float32) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3 * (seed + 1))
    model(torch.randn(2, 8, dtype=dtype)).sum().backward()
    opt.step()
    return model, opt


class _Recorder(pickle.Unpickler):
    """Records the globals a pickle names (and loads it: only for files this test wrote)."""

    def __init__(self, fh):
        super().__init__(fh)
        self.seen: set[tuple[str, str]] = set()

    def find_class(self, module, name):
        self.seen.add((module, name))
        return super().find_class(module, name)


def _globals_of(metadata: Path) -> set[tuple[str, str]]:
    with open(metadata, "rb") as fh:
        rec = _Recorder(fh)
        rec.load()
    return rec.seen


class _RunsCode:
    """Unpickling it runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def saved(tmp_path) -> Path:
    """step_1 of a tiny model + AdamW, saved by CheckpointManager (single process)."""
    model, opt = _model()
    return CheckpointManager(tmp_path / "checkpoints").save(1, model, opt, {"step": 1})


# ---------------------------------------------------------------------------- 1. DCP metadata and byte entries


def test_allow_list_covers_real_checkpoints_and_loads_them(tmp_path, saved):
    seen = _globals_of(saved / ".metadata")
    bf16 = CheckpointManager(tmp_path / "bf16").save(1, _model(dtype=torch.bfloat16)[0], None, {"step": 1})
    seen |= _globals_of(bf16 / ".metadata")
    assert ("torch", "bfloat16") in seen and ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata") in seen
    refused = sorted(g for g in seen if not safe_dcp._allowed(*g))
    assert refused == []
    # the guarded path loads what the unguarded one did: weights, AdamW state and group values
    model, opt = _model(seed=5)
    state = CheckpointManager(saved.parent).load(saved, model, opt)
    ref_model, ref_opt = _model()
    assert state["step"] == 1 and opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
    assert opt.param_groups[0]["betas"] == ref_opt.param_groups[0]["betas"]
    for a, b in zip(model.state_dict().values(), ref_model.state_dict().values()):
        assert torch.equal(a, b)
    first = next(iter(ref_opt.state.values()))["exp_avg"]
    assert torch.equal(next(iter(opt.state.values()))["exp_avg"], first)
    assert has_optimizer_state(saved) and "model.0.weight" in saved_tensor_shapes(saved)


def test_allow_list_covers_a_sharded_dtensor_checkpoint(tmp_path):
    """FSDP2 over a one-rank gloo group: DTensor state, chunked storage metadata."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model, _ = _model()
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.randn(2, 8)).sum().backward()
        opt.step()
        manager = CheckpointManager(tmp_path / "fsdp")
        path = manager.save(1, model, opt, {"step": 1})
        assert [g for g in _globals_of(path / ".metadata") if not safe_dcp._allowed(*g)] == []
        manager.load(path, model, opt)
    finally:
        dist.destroy_process_group()


def _readers(path: Path):
    """Every way megaforge reads a checkpoint's metadata or data."""
    from toolkit.convert.streaming import DCPSource

    model, opt = _model()
    return {
        "CheckpointManager.load": lambda: CheckpointManager(path.parent).load(path, model, opt, verified=True),
        "load_model_weights": lambda: load_model_weights(path, model),
        "saved_tensor_shapes": lambda: saved_tensor_shapes(path),
        "has_optimizer_state": lambda: has_optimizer_state(path),
        "DCPSource": lambda: DCPSource(path),
    }


def test_crafted_metadata_is_refused_by_every_reader(tmp_path, saved):
    from toolkit.checkpoint.integrity import write_checksums

    marker = tmp_path / "ran"
    (saved / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    write_checksums(saved)  # checksums.json is written beside the files: a crafted folder has matching ones
    for name, read in _readers(saved).items():
        with pytest.raises(CheckpointError) as e:
            read()
        message = str(e.value)
        assert "\n" not in message and "not allowed in DCP metadata" in message and "system" in message, name
    assert not marker.exists()


def test_crafted_shard_path_in_metadata_is_refused(saved):
    metadata = safe_dcp.read_metadata(saved)
    index = next(iter(metadata.storage_data))
    metadata.storage_data[index].relative_path = "../../elsewhere.distcp"
    (saved / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="elsewhere.distcp"):
        safe_dcp.read_metadata(saved)


def test_damaged_metadata_is_one_line(saved):
    (saved / ".metadata").write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointError, match="cannot read DCP metadata") as e:
        saved_tensor_shapes(saved)
    assert "\n" not in str(e.value)


def test_crafted_byte_entry_is_refused_on_resume(tmp_path):
    """An optimizer group value (a DCP byte entry) that would run code on ``torch.load(weights_only=False)``."""
    import torch.distributed.checkpoint as dcp

    from toolkit.checkpoint.native import app_state

    marker = tmp_path / "ran"
    model, opt = _model()
    state = app_state(model, opt)
    key = next(k for k in state["optim"] if k.startswith("param_groups.") and k.endswith(".lr"))
    state["optim"][key] = _RunsCode(marker)
    path = tmp_path / "checkpoints" / "step_1"
    path.mkdir(parents=True)
    dcp.save(state, checkpoint_id=str(path), no_dist=True)
    (path / "trainer_state.json").write_text(json.dumps({"step": 1}))
    with pytest.raises(CheckpointError) as e:
        CheckpointManager(path.parent).load(path, *_model(), verified=True)
    message = str(e.value)
    assert "\n" not in message and f"optim.{key}" in message and "was not loaded" in message
    assert "posix.system" in message and "weights_only" not in message  # what was refused, not torch's advice
    assert not marker.exists()


def test_every_dcp_read_in_toolkit_goes_through_safe_dcp():
    """No ``FileSystemReader(...)``, ``.read_metadata()`` or ``dcp.load`` outside safe_dcp.py."""
    hits = []
    for path in sorted((REPO / "toolkit").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel == "toolkit/checkpoint/safe_dcp.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and any(a.name == "FileSystemReader" for a in node.names):
                hits.append(f"{rel}:{node.lineno} imports FileSystemReader")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and (
                    node.func.attr in ("read_metadata", "load_state_dict") and isinstance(node.func.value, ast.Call)
                    or node.func.attr == "load" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "dcp"):
                hits.append(f"{rel}:{node.lineno} calls {node.func.attr}")
    assert hits == []


# ---------------------------------------------------------------------------- 2. safetensors index


@pytest.mark.parametrize("shard", ["../outside/model.safetensors", "ABSOLUTE", "sub/model.safetensors", ".."])
def test_safetensors_index_cannot_name_files_outside_the_folder(tmp_path, shard):
    from safetensors.torch import save_file

    from toolkit.convert.streaming import SafetensorsSource

    (tmp_path / "outside").mkdir()
    outside = tmp_path / "outside" / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(outside))
    folder = tmp_path / "hf"
    (folder / "sub").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(folder / "sub" / "model.safetensors"))
    shard = str(outside) if shard == "ABSOLUTE" else shard
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(CheckpointError, match="not a file name in") as e:
        SafetensorsSource(folder)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------- 3. megaforge.json


def test_provenance_holds_no_local_paths(tmp_path):
    from toolkit.config import RunConfig
    from toolkit.convert.provenance import write_provenance

    home = tmp_path / "home" / "alice"
    run_dir, step_dir = home / "runs" / "my-run", home / "runs" / "my-run" / "checkpoints" / "step_4"
    step_dir.mkdir(parents=True)
    (step_dir / "trainer_state.json").write_text(json.dumps({"step": 4, "consumed_samples": 32, "seed": 1}))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 4, "loss": 2.5, "val_loss": 2.75}) + "\n")
    (run_dir / "eval_test.json").write_text(json.dumps({"split": "test", "data": f"{home}/data/test.conll",
                                                        "checkpoint": f"{step_dir}", "f1_strict": 0.5}))
    cfg = RunConfig()
    cfg.trainer.run_dir = str(run_dir)
    cfg.tokenizer.path = f"{home}/tok/clinical-wordpiece"
    cfg.logging.tensorboard.dir = f"{home}/tb"
    cfg.data.data_prefix = [0.7, f"{home}/data/notes_text_document", 0.3, "relative/other_text_document"]
    cfg.data.index_cache_dir = f"{home}/cache"
    cfg.task.train_file = f"{home}/data/train.conll"
    cfg.checkpoint.init_from = "openai-community/gpt2"
    out = tmp_path / "export"
    out.mkdir()
    text = write_provenance(out, run_dir, step_dir, cfg).read_text()
    assert str(tmp_path) not in text and "alice" not in text and "relative/" not in text
    record = json.loads(text)
    config = record["config"]
    assert config["trainer"]["run_dir"] == "my-run" and config["tokenizer"]["path"] == "clinical-wordpiece"
    assert config["logging"]["tensorboard"]["dir"] == "tb" and config["data"]["index_cache_dir"] == "cache"
    assert config["data"]["data_prefix"] == [0.7, "notes_text_document", 0.3, "other_text_document"]
    assert config["task"]["train_file"] == "train.conll"
    assert config["checkpoint"]["init_from"] == "openai-community/gpt2"  # a Hub id: the card's base_model
    assert record["evaluations"]["test"]["data"] == "test.conll" and record["evaluations"]["test"]["f1_strict"] == 0.5
    assert record["checkpoint"]["step"] == 4 and record["last_eval"]["val_loss"] == 2.75


# ---------------------------------------------------------------------------- 4, 5. publish


@pytest.mark.parametrize("repo_id", ["../..", "a/b--c", "a/.x", "a/x.", "alice/" + "n" * 97, "gpt2", "a/b/c"])
def test_publish_validates_the_repo_id_first(tmp_path, capsys, repo_id):
    from toolkit.cli import main

    missing = tmp_path / "no-such-folder"  # checked after the id: the id's error comes first
    assert main(["publish", str(missing), repo_id, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a Hub repository id" in err and "NAMESPACE/NAME" in err


def test_publish_accepts_a_valid_repo_id():
    from toolkit.hub import check_repo_id

    check_repo_id("alice/gpt-tiny.v2_1")


def _hf_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (folder / name).write_text("{}")
    return folder


def test_publish_refuses_links_out_of_the_folder(tmp_path):
    from toolkit.hub import PublishError, select_files

    folder = _hf_folder(tmp_path / "hf")
    (folder / "tokenizer_config.json").symlink_to(folder / "tokenizer.json")  # inside: allowed
    assert "tokenizer_config.json" in dict(select_files(folder)[0])
    secret = tmp_path / "secret.json"
    secret.write_text('{"token": "x"}')
    (folder / "special_tokens_map.json").symlink_to(secret)
    with pytest.raises(PublishError, match="special_tokens_map.json is a symbolic link to .*outside") as e:
        select_files(folder)
    assert "\n" not in str(e.value)
    (folder / "special_tokens_map.json").unlink()
    (folder / "weights").symlink_to(tmp_path, target_is_directory=True)  # a linked folder, outside
    with pytest.raises(PublishError, match="weights is a symbolic link"):
        select_files(folder)


# ---------------------------------------------------------------------------- 6. tokenizer spec names


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "-x", "a b", "a/b", "a\\b", "ünï"])
def test_tokenizer_spec_name_is_a_plain_name(tmp_path, name):
    from toolkit.tokenization.training import load_spec

    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({"name": name, "library": "huggingface", "model": "byte_level_bpe", "vocab_size": 100,
                                "corpus": "english"}))
    with pytest.raises(ConfigError, match="key 'name' must be a plain name") as e:
        load_spec(spec)
    assert "\n" not in str(e.value)
    spec.write_text(json.dumps({"name": "my-bpe_2.0", "library": "huggingface", "model": "byte_level_bpe", "vocab_size": 100,
                                "corpus": "english"}))
    assert load_spec(spec)[0].name == "my-bpe_2.0"


# ---------------------------------------------------------------------------- 7. imports never overwrite a run


@pytest.mark.parametrize("held", ["config.yaml", "checkpoints"])
def test_import_refuses_an_out_that_holds_a_run(tmp_path, held):
    from toolkit.config import ModelConfig
    from toolkit.convert.dispatch import convert
    from toolkit.convert.megaforge_folder import write_megaforge_folder

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("name: mine\n") if held == "config.yaml" else (out / "checkpoints").mkdir()
    for write in (lambda: convert("someone/some-model", out, to="megaforge"),  # refused before any download
                  lambda: write_megaforge_folder(out, ModelConfig(), [], None, None, tokenizer=None, dtype=None,
                                                 trainer_state={}, where="src")):
        with pytest.raises(CheckpointError, match=f"already holds {held}.*pick an empty") as e:
            write()
        assert "\n" not in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == [held]


# ---------------------------------------------------------------------------- 8, 9. transformers calls


class _Refuses(Exception):
    pass


def _fake_transformers(calls: list) -> types.ModuleType:
    """A stand-in ``transformers`` whose ``from_pretrained`` records its keyword arguments and refuses."""

    def from_pretrained(*args, **kwargs):
        calls.append(kwargs)
        raise _Refuses("refused by the test")

    auto = types.SimpleNamespace(from_pretrained=from_pretrained)
    quiet = types.SimpleNamespace(get_verbosity=lambda: 0, set_verbosity=lambda v: None,
                                  set_verbosity_error=lambda: None, disable_progress_bar=lambda: None)
    fake = types.ModuleType("transformers")
    fake.AutoConfig = fake.AutoTokenizer = fake.GPT2LMHeadModel = auto
    fake.logging = quiet
    fake.utils = types.SimpleNamespace(logging=quiet)
    return fake


def test_transformers_is_never_asked_to_run_folder_code(tmp_path, monkeypatch):
    from toolkit import hub
    from toolkit.convert import verify
    from toolkit.tokenization.fidelity import TokenizerFidelityError, load_auto_tokenizer

    calls: list[dict] = []
    fake = _fake_transformers(calls)
    monkeypatch.setitem(sys.modules, "transformers", fake)
    folder = _hf_folder(tmp_path / "hf")
    with pytest.raises(hub.PublishError):
        hub._check_loads(fake, folder)
    with pytest.raises(TokenizerFidelityError):
        load_auto_tokenizer(folder)
    with pytest.raises(_Refuses):
        verify._load_hf_model(folder, "GPT2LMHeadModel")
    assert len(calls) == 3 and all(kw.get("trust_remote_code") is False for kw in calls)
    assert calls[2].get("use_safetensors") is True  # the folder has model.safetensors
    (folder / "model.safetensors").unlink()
    with pytest.raises(_Refuses):
        verify._load_hf_model(folder, "GPT2LMHeadModel")
    assert "use_safetensors" not in calls[3] and calls[3]["trust_remote_code"] is False


def test_safe_load_planner_reads_plain_values():
    """What ``load_bytes`` accepts: the values torch.save writes for optimizer groups."""
    for value in (1e-3, (0.9, 0.95), True, None, 0, {"a": [1, 2]}):
        buf = io.BytesIO()
        torch.save(value, buf)
        buf.seek(0)
        assert torch.load(buf, weights_only=True) == value
    assert issubclass(CheckpointError, MegaforgeError)
