"""Security properties of docs/security.md, checked.

* The Hub token never reaches a file, a log line, the metrics, the wandb files, the model card or
  anything uploaded: a tiny GPT is trained through the CLI with wandb on (offline) and a fake token in
  ``HF_TOKEN``/``HUGGING_FACE_HUB_TOKEN``, exported, published as a dry run and for real to the local
  Hub stand-in (tests/conversion/hub_server.py), and no byte sequence of the token is found anywhere.
* What deserializes data, read from the code itself (AST): ``torch.load`` only in
  ``convert/safe_load.py`` with ``weights_only=True``; no ``pickle.load``, ``eval``/``exec``,
  unsafe ``yaml`` loaders or unsandboxed Jinja2; ``np.load`` only with ``allow_pickle=False``;
  no ``trust_remote_code``.
* Chat templates render in Jinja2's sandbox; BRAT output cannot be split by a line break inside an
  entity; a corpus name cannot be a path.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli
from toolkit.errors import ConfigError, DataError

TOKEN = "hf_FAKEtoken1234567890abcdef"  # a fake Hub token that must never be written or printed
TOOLKIT = REPO / "toolkit"
SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.seq_length=64",
         "trainer.micro_batch_size=4", "trainer.global_batch_size=8", "trainer.eval_interval=0",
         "logging.progress_bar=false", "logging.plot=false", "trainer.num_threads=1", "trainer.sample_prompt=null",
         "model.hidden_dropout=0.1", "trainer.max_steps=2", "checkpoint.save_interval=2"]
WORDS = ("the patient was admitted with chest pain and shortness of breath after a long walk in the cold "
         "morning air while the nurse recorded blood pressure heart rate and oxygen levels").split()


def _sources() -> list[tuple[Path, ast.AST]]:
    return [(p, ast.parse(p.read_text(encoding="utf-8"), str(p))) for p in sorted(TOOLKIT.rglob("*.py"))]


def _dotted(node: ast.AST) -> str:
    """``torch.serialization.load`` for an attribute chain, ``eval`` for a name, '' otherwise."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


# ---------------------------------------------------------------------------- deserialization, from the code


def test_every_deserializer_in_toolkit_is_guarded():
    """The list in docs/security.md is complete: any new unpickling call fails here first."""
    found: dict[str, list[str]] = {}
    for path, tree in _sources():
        rel = path.relative_to(REPO).as_posix()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names]
                module = node.module if isinstance(node, ast.ImportFrom) else None
                for name in ([module] if module else names):
                    if name.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"):
                        found.setdefault("import " + name, []).append(rel)
                if module and module.split(".")[0] == "jinja2":
                    assert module == "jinja2.sandbox" or set(names) <= {"TemplateError"}, (
                        f"{rel}: jinja2 used outside its sandbox ({module}: {names})")
                continue
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            where = f"{rel}:{node.lineno}"
            if name in ("eval", "exec", "__import__", "compile"):
                pytest.fail(f"{where}: calls {name}()")
            if name.endswith(("pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load", "yaml.full_load",
                              "yaml.load_all")) or name in ("load_from_disk", "read_pickle"):
                pytest.fail(f"{where}: calls {name}()")
            if name == "torch.load":
                assert _keyword(node, "weights_only") is True, f"{where}: torch.load without weights_only=True"
                found.setdefault("torch.load", []).append(rel)
            if name in ("np.load", "numpy.load"):
                assert _keyword(node, "allow_pickle") is False, f"{where}: np.load without allow_pickle=False"
                found.setdefault("np.load", []).append(rel)
            method = node.func.attr if isinstance(node.func, ast.Attribute) else ""
            if (method == "read_metadata" and name != "safe_dcp.read_metadata") or name == "dcp.load":
                found.setdefault("dcp.load" if name == "dcp.load" else method, []).append(rel)  # torch's: plain pickle
    assert set(found["torch.load"]) == {"toolkit/convert/safe_load.py", "toolkit/checkpoint/safe_dcp.py"}
    assert set(found["np.load"]) == {"toolkit/data/gpt_dataset.py", "toolkit/data/bert_dataset.py"}
    # DCP checkpoints are read only through safe_dcp (allow-listed .metadata, weights_only non-tensor entries;
    # tests/reliability/test_security_fixes.py checks every FileSystemReader and dcp.load call)
    assert set(found["read_metadata"]) == {"toolkit/checkpoint/safe_dcp.py"}
    assert set(found["dcp.load"]) == {"toolkit/checkpoint/safe_dcp.py"}
    # preprocess only pickles (pickle.dumps: can the tokenizer go to worker processes as it is?); safe_dcp
    # subclasses pickle.Unpickler with an allow-list (find_class)
    assert sorted(found.get("import pickle", [])) == ["toolkit/checkpoint/safe_dcp.py", "toolkit/data/preprocess.py"]
    assert "pickle.load" not in (TOOLKIT / "data" / "preprocess.py").read_text()


def test_no_trust_remote_code():
    """transformers is never asked to run a repository's code (``trust_remote_code`` is left at False)."""
    pattern = re.compile(r"trust_remote_code['\"]?\s*[:=]\s*(?!False\b)")
    hits = [f"{p.relative_to(REPO)}:{n}" for p in sorted(TOOLKIT.rglob("*.py"))
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert hits == []


# ---------------------------------------------------------------------------- the Hub token


def _tiny_corpus(folder: Path) -> str:
    """A small indexed dataset (the shipped corpus would be built on first use, which takes longer)."""
    from toolkit.data.preprocess import preprocess

    lines = []
    for i in range(400):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12 + i % 9)]
        lines.append('{"text": "' + " ".join(words) + '."}\n')
    (folder / "notes.jsonl").write_text("".join(lines))
    preprocess([folder / "notes.jsonl"], folder / "notes", "english-bpe", progress=False)
    return str(folder / "notes")


def _files_holding(token: bytes, root: Path) -> list[str]:
    return [str(p) for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink() and token in p.read_bytes()]


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # huggingface_hub's LFS PUT
def test_hub_token_reaches_no_file_log_or_upload(tmp_path, monkeypatch, capfd):
    from huggingface_hub import constants

    from tests.conversion.hub_server import HubServer
    from toolkit.cli import main

    hf_home = tmp_path / "hf-home"
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.setenv(name, TOKEN)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("WANDB_MODE", "offline")
    prefix = _tiny_corpus(tmp_path)
    run, hf = tmp_path / "run", tmp_path / "hf"

    out = run_cli("train", "gpt-tiny", *SMALL, "logging.wandb.enabled=true", f"data.data_prefix=[{prefix}]",
                  f"trainer.run_dir={run}", "-v")
    assert out.returncode == 0, out.stderr[-3000:]
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb")), "wandb wrote no offline run"
    printed = [out.stdout, out.stderr]

    assert main(["convert", str(run), str(hf), "--to", "hf"]) == 0
    assert main(["publish", str(hf), "tester/tiny-gpt", "--dry-run", "--license", "mit"]) == 0
    with HubServer(TOKEN) as hub:  # the real upload: the token is sent, as it must be, and nowhere else
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        assert main(["publish", str(hf), "tester/tiny-gpt", "--license", "mit", "-v"]) == 0
        writes = [r for r in hub.requests if r.method == "POST" and "/_lfs/" not in r.path]
        assert writes and all(r.authorized for r in writes)  # huggingface_hub found the token in HF_TOKEN
        uploaded = hub.repos["tester/tiny-gpt"].resolve("main").files
    captured = capfd.readouterr()
    printed += [captured.out, captured.err]

    assert (hf / "README.md").is_file() and "dry run: nothing is written or sent" in captured.out
    assert {"README.md", "megaforge.json", "model.safetensors", "config.json"} <= set(uploaded)
    for token in (TOKEN.encode(), TOKEN.encode("utf-16-le")):
        assert _files_holding(token, tmp_path) == []  # the run, the export, HF_HOME, the data
        assert [name for name, data in uploaded.items() if token in data] == []
    assert all(TOKEN not in text for text in printed)


# ---------------------------------------------------------------------------- templates, output names


def test_chat_templates_render_in_the_sandbox():
    from toolkit.data.tasks.sft import render_chat

    messages = [{"role": "user", "content": "hi"}]
    for template in ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "{{ messages.append(1) }}",
                     "{{ messages.pop() }}"):
        with pytest.raises(ConfigError, match="the chat template does not render: access to attribute"):
            render_chat(template, messages)
    # attributes the sandbox hides render as nothing, never as the object
    assert render_chat("{{ raise_exception.__globals__ }}{{ messages|attr('__class__') }}", messages) == ""
    # the sandbox's range limit (and other errors raised while rendering) are one-line config errors too
    with pytest.raises(ConfigError, match="OverflowError: Range too big"):
        render_chat("{% for i in range(10**7) %}{% endfor %}", messages)
    with pytest.raises(ConfigError, match="ZeroDivisionError"):
        render_chat("{{ 1 // 0 }}", messages)


def test_brat_entity_across_a_line_break_stays_on_its_line(tmp_path):
    from toolkit.data.tasks.formats import read_brat
    from toolkit.training.predict import brat_lines

    text = "Pain in the chest\nTumor noted.\r\nBP ok"
    ents = [{"start": 12, "end": 23, "label": "Finding"},  # "chest\nTumor": crosses a line break
            {"start": 0, "end": 4, "label": "Finding"}, {"start": 32, "end": 34, "label": "Test"}]
    lines = brat_lines(text, ents)
    assert lines == ["T1\tFinding 12 17;18 23\tchest Tumor", "T2\tFinding 0 4\tPain", "T3\tTest 32 34\tBP"]
    assert all("\n" not in line and "\r" not in line for line in lines)
    (tmp_path / "note.txt").write_bytes(text.encode())
    (tmp_path / "note.ann").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    example = read_brat(tmp_path)[0]  # the reader takes a fragmented span from its first start to its last end
    tagged = [w for w, t in zip(example.words, example.tags) if t != "O"]
    assert tagged == ["Pain", "chest", "Tumor", "BP"]


@pytest.mark.parametrize("name", ["../english", "english/../english", "/etc/passwd", ""])
def test_corpus_names_are_not_paths(name):
    from toolkit.data.corpus import corpus_file

    assert corpus_file("english").name == "english.jsonl.gz"
    with pytest.raises(DataError, match="no shipped corpus named"):
        corpus_file(name)

