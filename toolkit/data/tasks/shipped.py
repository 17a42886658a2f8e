"""Task data that ships inside the package, named in recipes as ``NAME:SPLIT`` (e.g.
``ncbi-disease:train``): the NCBI disease corpus (public domain, see its README and LICENSE) and
synthetic clinical tasks made from clinosim's simulated patients (``clinical/README.md``)."""

from __future__ import annotations

from pathlib import Path

from toolkit.errors import DataError

_ROOT = Path(__file__).resolve().parent
#: task name → split → file under this package
SHIPPED = {
    "ncbi-disease": {"train": "ncbi-disease/train.tsv.gz", "valid": "ncbi-disease/devel.tsv.gz",
                     "test": "ncbi-disease/test.tsv.gz"},
    **{f"clinical-{task}": {split: f"clinical/{task}/{split}.jsonl.gz" for split in ("train", "valid", "test")}
       for task in ("ner", "note-type", "nli", "sts", "sft", "summary", "chat")},
}


def resolve_task_file(spec: str) -> Path:
    """``NAME:SPLIT`` of a shipped task → its file; anything else is a path, returned as is."""
    name, sep, split = spec.partition(":")
    if not sep or name not in SHIPPED or Path(spec).exists():
        return Path(spec)
    if split not in SHIPPED[name]:
        raise DataError(f"shipped task {name!r} has splits {', '.join(SHIPPED[name])}, not {split!r}")
    return _ROOT / SHIPPED[name][split]
