"""Indexed datasets built on first use from the sample corpora shipped in the package.

``corpus_prefix("english", tok, "gpt2-bpe")`` tokenizes ``toolkit/data/corpora/english.jsonl.gz``
once into ``<cache>/corpora/english-gpt2-bpe/english.{bin,idx}`` and returns that prefix; later
calls (and other processes) reuse it. The build happens in a temporary folder renamed into place
only when complete, under a lock file created with ``O_CREAT | O_EXCL``: when several processes
(e.g. all ranks of a job) ask at once, one builds and the others wait. A ``meta.json`` beside the
files records the corpus checksum and tokenizer vocabulary size; a mismatch (new package version,
retrained tokenizer) triggers a rebuild.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path

from toolkit.assets import corpora_dir, default_cache_dir
from toolkit.data.megatron_indexed import open_indexed
from toolkit.errors import DataError
from toolkit.tokenization.base import Tokenizer

log = logging.getLogger(__name__)

CORPUS_SUFFIX = ".jsonl.gz"
STALE_LOCK_SECONDS = 1800.0  # a lock older than this (or held by a dead local process) is broken


def available_corpora() -> list[str]:
    """Names of the shipped corpora."""
    folder = corpora_dir()
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(CORPUS_SUFFIX)] for p in folder.glob(f"*{CORPUS_SUFFIX}"))


def corpus_file(corpus_name: str) -> Path:
    """The shipped ``<corpus_name>.jsonl.gz``; DataError listing the available ones if missing.

    Only a shipped corpus's plain name is accepted: the name also names the files of its build
    (``<cache>/corpora/<name>-<tokenizer>/<name>.bin``), so a name with a path in it would read and
    write outside those folders."""
    path = corpora_dir() / f"{corpus_name}{CORPUS_SUFFIX}"
    if corpus_name not in available_corpora() or not path.is_file():
        names = ", ".join(available_corpora()) or "none installed"
        raise DataError(f"no shipped corpus named '{corpus_name}' ({path} not found); available: {names}")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "tokenizer"


def _ready(folder: Path, corpus_name: str, meta: dict) -> bool:
    """Whether ``folder`` holds a complete, valid build matching ``meta``."""
    try:
        found = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    if found != meta:
        return False
    try:
        open_indexed(folder / corpus_name)
    except DataError as e:
        log.warning("cached corpus %s is unusable (%s); rebuilding", folder, e)
        return False
    return True


def _lock_is_stale(lock: Path) -> bool:
    try:
        age = time.time() - lock.stat().st_mtime
        host, pid = lock.read_text().split()[:2]
    except (OSError, ValueError):
        return False  # vanished or being written: not ours to judge yet
    if age > STALE_LOCK_SECONDS:
        return True
    if host == socket.gethostname():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            return False
    return False


def _build(src: Path, folder: Path, corpus_name: str, tokenizer: Tokenizer, meta: dict) -> None:
    from toolkit.data.preprocess import preprocess

    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True)
        log.info("building indexed dataset for corpus '%s' in %s (first use)", corpus_name, folder)
        stats = preprocess([src], tmp / corpus_name, tokenizer, workers=1, progress=False)
        (tmp / "meta.json").write_text(json.dumps({**meta}, indent=1, sort_keys=True))
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True))
        old = None
        if folder.exists():  # stale build: move it aside, then swap the new one in
            old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def corpus_prefix(corpus_name: str, tokenizer: Tokenizer, tokenizer_key: str,
                  cache_dir: str | Path | None = None, *, timeout: float = 3600.0) -> str:
    """Prefix of the indexed dataset of shipped corpus ``corpus_name`` tokenized by ``tokenizer``.

    Built on first use under ``cache_dir`` (default ``default_cache_dir()/"corpora"``) in
    ``<corpus_name>-<tokenizer_key>/``; ``tokenizer_key`` names the tokenizer (e.g. its recipe name)
    so different tokenizers never share a build. Safe when several processes call it at once.
    """
    src = corpus_file(corpus_name)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "corpora"
    folder = root / f"{_safe(corpus_name)}-{_safe(tokenizer_key)}"
    meta = {"corpus": corpus_name, "corpus_sha256": _sha256(src), "tokenizer_key": tokenizer_key,
            "vocab_size": int(tokenizer.vocab_size), "eod_id": tokenizer.eod_id}
    prefix = str(folder / corpus_name)
    if _ready(folder, corpus_name, meta):
        return prefix
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{root}: cannot create the corpus cache folder ({e}); set MEGAFORGE_CACHE to a writable folder") from None
    lock = root / f".{folder.name}.lock"
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _ready(folder, corpus_name, meta):
                return prefix
            if _lock_is_stale(lock):
                log.warning("removing stale lock %s", lock)
                lock.unlink(missing_ok=True)
                continue
            if time.monotonic() > deadline:
                raise DataError(f"{lock}: timed out waiting for another process to build corpus '{corpus_name}'; "
                                "delete the lock file if no build is running") from None
            time.sleep(0.2)
            continue
        try:
            os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
            os.close(fd)
            if not _ready(folder, corpus_name, meta):  # another process may have finished meanwhile
                _build(src, folder, corpus_name, tokenizer, meta)
        finally:
            lock.unlink(missing_ok=True)
        return prefix
