"""Locate files that ship with the package: recipes, tokenizer specs and assets, sample corpora.

In a wheel, ``recipes/`` and ``tokenizers/`` are installed as ``toolkit/_assets/``; in a source
checkout (editable install) they sit beside the package.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def _asset_dir(name: str) -> Path:
    packaged = Path(str(resources.files("toolkit"))) / "_assets" / name
    if packaged.is_dir():
        return packaged
    source = Path(__file__).resolve().parent.parent / name
    if source.is_dir():
        return source
    raise FileNotFoundError(f"megaforge asset folder {name!r} not found (looked in {packaged} and {source})")


def recipes_dir() -> Path:
    """Folder holding ``<family>/<name>.yaml`` recipes."""
    return _asset_dir("recipes")


def tokenizers_dir() -> Path:
    """Folder holding tokenizer specs (``*.yaml``) and trained tokenizer assets."""
    return _asset_dir("tokenizers")


def corpora_dir() -> Path:
    """Folder holding the shipped sample corpora (compressed jsonl)."""
    return Path(str(resources.files("toolkit"))) / "data" / "corpora"


def default_cache_dir() -> Path:
    """Where derived files (indexed datasets built from shipped corpora) are cached."""
    import os

    root = os.environ.get("MEGAFORGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "megaforge"
    )
    return Path(root)
