"""``checkpoint.init_from``: start training (pretraining or fine-tuning) from existing weights.

The source is a megaforge run directory or ``step_N`` folder, a Hugging Face folder or Hub id, or a
legacy Megatron-LM checkpoint. Non-megaforge sources are imported once (``megaforge convert --to
megaforge``) into the cache (``$MEGAFORGE_CACHE/init_from/<key>``; a file lock makes the ranks of a
``torchrun`` job share one import). The run then takes from the source:

* the model architecture — every ``model.*`` key except the training choices in :data:`KEEP`
  (sequence length, dropout, recompute, vocabulary padding multiple), which stay as configured;
* its tokenizer, when it has one (a model only makes sense with its own vocabulary), checked to give
  the source tokenizer's ids once the run has saved and loaded it (:mod:`toolkit.tokenization.fidelity`;
  a cached import of a local Hugging Face folder is checked against that folder's ``AutoTokenizer``
  each time it is used);
* its weights, loaded before the first step through the same resharding load as a resume, so any
  parallel layout works. Optimizer state, step and data position start fresh.

A fine-tune from a model fine-tuned for the same task type (a megaforge fine-tuning run, or an
imported ``*ForTokenClassification`` / ``*ForSequenceClassification``) continues it: the labels are
taken over (unless ``task.labels`` is set) and the task head loads with the encoder. A head for
another task type, or other labels, starts fresh (:func:`adopt_source_task`).

A run directory that already has a checkpoint resumes from it instead (``init_from`` only seeds a
new run).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path

from filelock import FileLock

from toolkit.assets import default_cache_dir
from toolkit.checkpoint.run_dir import resolve_checkpoint
from toolkit.config import ModelConfig, RunConfig, load_config
from toolkit.convert.dispatch import convert, detect_source
from toolkit.tokenization import load_tokenizer
from toolkit.tokenization.fidelity import check_import, check_same

logger = logging.getLogger(__name__)

#: ``model.*`` keys that describe how to train, not what the weights are: kept from the run's config
KEEP = ("seq_length", "hidden_dropout", "attention_dropout", "recompute_granularity",
        "make_vocab_size_divisible_by")


def _source_key(spec: str) -> str:
    """Cache key of a source: its path or id, plus names, sizes and times of its files when local."""
    h = hashlib.sha256(spec.encode())
    path = Path(spec).expanduser()
    if path.is_dir():
        h.update(str(path.resolve()).encode())
        for f in sorted(path.rglob("*")):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def resolve_init_from(spec: str) -> tuple[Path, Path]:
    """(megaforge folder with config.yaml, its checkpoint folder) for ``checkpoint.init_from``."""
    if detect_source(spec) == "megaforge":
        return resolve_checkpoint(spec)
    root = default_cache_dir() / "init_from"
    root.mkdir(parents=True, exist_ok=True)
    folder = root / _source_key(spec)
    with FileLock(str(folder) + ".lock"):
        if not (folder / "config.yaml").is_file():
            tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            convert(spec, tmp, to="megaforge")
            os.replace(tmp, folder)
        else:
            logger.info(f"init_from: using the import of {spec} cached in {folder}")
            _check_cached_import(spec, folder)
    return resolve_checkpoint(folder)


def _check_cached_import(spec: str, folder: Path) -> None:
    """A cached import (perhaps made by an older megaforge) still tokenizes as its source does: the
    source folder's ``AutoTokenizer`` vs the cached tokenizer (a Hub id is not re-read)."""
    source = Path(spec).expanduser()
    if source.is_dir() and (folder / "tokenizer").is_dir() and detect_source(spec) == "hf":
        report = check_import(source, load_tokenizer(str(folder / "tokenizer")),
                              result_name=f"the cached import's tokenizer ({folder / 'tokenizer'})")
        if report is not None:
            report.raise_if_failed()


def source_config(source_dir: Path) -> RunConfig:
    """The source run's ``config.yaml`` (read once by the caller and given to :func:`adopt_source_config`
    and :func:`adopt_source_task`)."""
    return load_config(str(source_dir / "config.yaml"))


def adopt_source_config(cfg: RunConfig, source_dir: Path, src: RunConfig | None = None) -> list[str]:
    """Take the source's architecture (all ``model.*`` keys but :data:`KEEP`) and tokenizer into
    ``cfg`` in place; returns the ``model.*`` keys whose value changed. The tokenizer the run will
    save and load must give the source tokenizer's ids (:func:`check_carried_tokenizer`)."""
    src = src or source_config(source_dir)
    changed = []
    for f in fields(ModelConfig):
        if f.name in KEEP:
            continue
        new = getattr(src.model, f.name)
        if getattr(cfg.model, f.name) != new:
            changed.append(f.name)
            setattr(cfg.model, f.name, copy.deepcopy(new))  # never share a list with the source config
    if (source_dir / "tokenizer").is_dir():
        cfg.tokenizer.path = str((source_dir / "tokenizer").resolve())
        cfg.tokenizer.type = src.tokenizer.type
        check_carried_tokenizer(source_dir / "tokenizer", cfg.tokenizer.type)
    return changed


def check_carried_tokenizer(folder: Path, type: str = "auto") -> None:  # noqa: A002 - the config key's name
    """The source's tokenizer (``folder``) vs the copy a run makes of it (loaded as ``tokenizer.type``
    says, saved into the run directory, loaded from there) on the fidelity probe battery."""
    source = load_tokenizer(str(folder))
    carried = load_tokenizer(str(folder), type)
    with tempfile.TemporaryDirectory() as tmp:
        carried.save(tmp)
        reloaded = load_tokenizer(tmp, type)
        check_same(source, reloaded, source_name=f"the source tokenizer ({folder})",
                   result_name="the run's copy of it").raise_if_failed()


def adopt_source_task(cfg: RunConfig, source_dir: Path, src: RunConfig | None = None) -> bool:
    """For a fine-tune (``task.type`` set) whose source was fine-tuned too: take over its labels when
    ``task.labels`` is unset. Returns whether the source's task head must be left out of the load
    (another task type, or other labels); the encoder loads either way."""
    if cfg.task.type == "none":
        return False
    src = (src or source_config(source_dir)).task
    if src.type == "none":  # a pretrained or headless encoder: there is no head to take
        return False
    if src.type != cfg.task.type:
        logger.info(f"init_from: the source was fine-tuned for {src.type}; the {cfg.task.type} head starts fresh")
        return True
    if src.type == "regression":
        return False
    if not cfg.task.labels:
        cfg.task.labels = list(src.labels)
        logger.info(f"init_from: continuing the source's {src.type} head with its labels: {', '.join(src.labels)}")
        return False
    if list(cfg.task.labels) == list(src.labels):
        return False
    logger.info(f"init_from: task.labels ({', '.join(cfg.task.labels)}) differ from the source's "
                f"({', '.join(src.labels)}); the task head starts fresh")
    return True
