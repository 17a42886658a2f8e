"""``megaforge.json``: where a Hugging Face export came from, for its model card.

:func:`~toolkit.convert.hf.export_hf` writes it next to ``config.json``; ``megaforge publish``
(:mod:`toolkit.hub`) reads it to describe the training recipe, data, parallel layout and final
metrics. Everything in it is copied from the run directory the export was made from:

* ``config`` — the run's resolved ``config.yaml`` (as a mapping),
* ``checkpoint`` — step, consumed samples, parallel layout and seed from ``trainer_state.json``,
* ``last_metrics`` / ``last_eval`` — the last ``metrics.jsonl`` record up to that step, and the
  last one holding a validation loss.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

import toolkit
from toolkit.checkpoint.native import read_trainer_state
from toolkit.config import RunConfig

PROVENANCE_FILE = "megaforge.json"
FORMAT_VERSION = 1
#: trainer_state.json fields worth keeping (RNG states and precision internals are not)
_STATE_KEYS = ("step", "consumed_samples", "layout", "seed", "imported_from", "architecture")


def last_metrics(run_dir: Path, up_to_step: int | None) -> tuple[dict | None, dict | None]:
    """The last ``metrics.jsonl`` record with ``step <= up_to_step``, and the last such record with
    a ``val_loss`` (None where there is none). Reads the file line by line."""
    path = Path(run_dir) / "metrics.jsonl"
    last = last_eval = None
    if not path.is_file():
        return None, None
    with open(path) as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut short by a killed run
            if not isinstance(rec, dict) or (up_to_step is not None and rec.get("step", 0) > up_to_step):
                continue
            last = rec
            if "val_loss" in rec:
                last_eval = rec
    return last, last_eval


def evaluations(run_dir: Path) -> dict:
    """``{split: metrics}`` from the run's ``eval_<split>.json`` files (``megaforge evaluate``)."""
    out = {}
    for path in sorted(Path(run_dir).glob("eval_*.json")):
        try:
            out[path.stem.removeprefix("eval_")] = json.loads(path.read_text())
        except ValueError:
            continue
    return out


def write_provenance(out: Path, run_dir: Path, step_dir: Path, cfg: RunConfig) -> Path:
    """Write ``out/megaforge.json`` describing the run ``run_dir`` at checkpoint ``step_dir``."""
    state = read_trainer_state(step_dir)
    kept = {k: state[k] for k in _STATE_KEYS if k in state}
    metrics, evaluation = last_metrics(run_dir, state.get("step"))
    record = {
        "format": FORMAT_VERSION,
        "megaforge_version": toolkit.__version__,
        "checkpoint": kept,
        "last_metrics": metrics,
        "last_eval": evaluation,
        "evaluations": evaluations(run_dir),
        "config": OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
    }
    path = Path(out) / PROVENANCE_FILE
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def read_provenance(folder: Path) -> dict | None:
    """``folder/megaforge.json`` as a mapping, or None when absent or unreadable."""
    path = Path(folder) / PROVENANCE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def update_provenance(folder: Path, *, tokenizer: str | None) -> None:
    """After a one-step export through a temporary megaforge folder (a Megatron-LM checkpoint ``--to
    hf``): the recorded ``config.tokenizer.path`` names that folder, which is gone; record the
    tokenizer the user gave instead (or none)."""
    path = Path(folder) / PROVENANCE_FILE
    record = read_provenance(folder)
    if record is None:
        return
    config = record.get("config")
    if isinstance(config, dict) and isinstance(config.get("tokenizer"), dict):
        config["tokenizer"]["path"] = tokenizer
    path.write_text(json.dumps(record, indent=2) + "\n")
