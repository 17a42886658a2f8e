"""The package installs as a wheel that carries its recipes and tokenizers, and never shadows HF's."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_main


def test_import_tokenizers_is_hugging_face():
    import tokenizers

    path = Path(tokenizers.__file__).resolve()
    assert REPO not in path.parents or ".venv" in path.parts, path
    assert hasattr(tokenizers, "Tokenizer") and hasattr(tokenizers, "models")


def test_tokenizers_folder_is_not_a_package():
    assert not list((REPO / "tokenizers").rglob("*.py"))


def test_cli_help_documents_every_command():
    out = subprocess.run([sys.executable, "-m", "toolkit", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0
    for command in ("recipes", "train", "generate", "preprocess", "tokenizer"):
        assert command in out.stdout


def test_recipes_command_lists_every_recipe():
    out = cli_main("recipes")
    assert out.returncode == 0, out.stderr
    for name in ("gpt-tiny", "gpt2-124m", "gpt-1.3b", "llama-tiny", "tinyllama-1.1b"):
        assert name in out.stdout
    assert "124.5M" in out.stdout and "1.10B" in out.stdout


@pytest.mark.timeout(300)
def test_wheel_ships_assets_and_works_from_elsewhere(tmp_path: Path):
    """A non-editable install, run from another directory, finds recipes and the shipped tokenizer."""
    wheel_dir = tmp_path / "wheel"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheel_dir), str(REPO)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheel_dir.glob("megaforge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "toolkit/_assets/recipes/gpt/gpt-tiny.yaml" in names
    assert "toolkit/_assets/tokenizers/english-bpe/tokenizer.json" in names
    assert "toolkit/data/corpora/english.jsonl.gz" in names
    assert "toolkit/data/tasks/ncbi-disease/train.tsv.gz" in names
    assert "toolkit/_assets/recipes/finetune/bert-tiny-ncbi-disease.yaml" in names
    assert not any(n.startswith("tokenizers/") for n in names)
    target = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                           str(wheel)], capture_output=True, text=True)
    assert inst.returncode == 0, inst.stderr[-2000:]
    code = ("import toolkit, toolkit.assets as a, toolkit.config as c, toolkit.tokenization as t;"
            "print(toolkit.__file__); print(a.recipes_dir()); print(len(c.list_recipes()));"
            "print(t.load_tokenizer('english-bpe').vocab_size)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith(str(target)) and lines[1].startswith(str(target))
    assert int(lines[2]) >= 6 and lines[3] == "8192"
