"""``megaforge.json``: where a Hugging Face export came from, for its model card.

:func:`~toolkit.convert.hf.export_hf` writes it next to ``config.json``; ``megaforge publish``
(:mod:`toolkit.hub`) reads it to describe the training recipe, data, parallel layout and final
metrics. Everything in it is copied from the run directory the export was made from:

* ``config`` — the run's resolved ``config.yaml`` (as a mapping),
* ``checkpoint`` — step, consumed samples, parallel layout and seed from ``trainer_state.json``,
* ``last_metrics`` / ``last_eval`` — the last ``metrics.jsonl`` record up to that step, and the
  last one holding a validation loss.

``publish`` uploads this file, so local paths are recorded by their last part only, as the model
card shows them (:func:`public_config`): ``/home/me/runs/gpt`` becomes ``gpt``. A Hub id in
``checkpoint.init_from`` and a shipped name (``english-bpe``, ``ncbi:train``) stay as they are.
"""

from __future__ import annotations

import json
import os
import re
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
    """``{split: metrics}`` from the run's ``eval_<split>.json`` files (``megaforge evaluate``), their
    ``data`` and ``checkpoint`` paths cut to the last part."""
    out = {}
    for path in sorted(Path(run_dir).glob("eval_*.json")):
        try:
            record = json.loads(path.read_text())
        except ValueError:
            continue
        if isinstance(record, dict):  # the data file and checkpoint evaluated, by name only
            record.update({k: name_only(record[k]) for k in ("data", "checkpoint") if k in record})
        out[path.stem.removeprefix("eval_")] = record
    return out


#: config keys (section, key) that hold a local path: recorded as the path's last part
_PATH_KEYS = (("trainer", "run_dir"), ("tokenizer", "path"), ("data", "index_cache_dir"),
              ("logging.tensorboard", "dir"), ("task", "train_file"), ("task", "valid_file"), ("task", "test_file"))


def name_only(value):
    """The last part of a path given as ``value`` (``/data/notes.jsonl`` → ``notes.jsonl``); any other
    value as it is (``None``, a number, a name without a separator)."""
    if isinstance(value, str) and ("/" in value or os.sep in value):
        return Path(value.rstrip("/" + os.sep)).name or value.strip("/" + os.sep) or "/"
    return value


def _is_hub_id(value: str) -> bool:
    return (not value.startswith((".", "/", "~")) and not Path(value).expanduser().exists()
            and re.fullmatch(r"[\w.-]+/[\w.-]+", value) is not None)


def public_config(config: dict) -> dict:
    """``config`` (a resolved RunConfig as a mapping, changed in place) with its local paths cut to
    their last part: what ``megaforge.json`` may show to whoever downloads the export."""
    for dotted, key in _PATH_KEYS:
        section = config
        for part in dotted.split("."):
            section = section.get(part) if isinstance(section, dict) else None
        if isinstance(section, dict) and key in section:
            section[key] = name_only(section[key])
    data = config.get("data")
    prefixes = data.get("data_prefix") if isinstance(data, dict) else None
    if isinstance(prefixes, list):  # weights (numbers) stay as they are
        data["data_prefix"] = [name_only(p) for p in prefixes]
    elif isinstance(prefixes, str):  # "0.7 /data/a 0.3 /data/b"
        data["data_prefix"] = " ".join(name_only(p) for p in prefixes.split())
    checkpoint = config.get("checkpoint")
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("init_from"), str) \
            and not _is_hub_id(checkpoint["init_from"]):
        checkpoint["init_from"] = name_only(checkpoint["init_from"])
    peft = config.get("peft")
    if isinstance(peft, dict) and isinstance(peft.get("base_model_name_or_path"), str) \
            and not _is_hub_id(peft["base_model_name_or_path"]):  # a LoRA run's local HF base
        peft["base_model_name_or_path"] = name_only(peft["base_model_name_or_path"])
    task = config.get("task")
    template = task.get("chat_template") if isinstance(task, dict) else None
    if isinstance(template, str) and "{" not in template and "\n" not in template:  # a file name, not a template
        task["chat_template"] = name_only(template)
    return config


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
        "config": public_config(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)),
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
        config["tokenizer"]["path"] = name_only(tokenizer)
    path.write_text(json.dumps(record, indent=2) + "\n")
