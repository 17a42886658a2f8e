"""Checksums of a checkpoint's files: written with the checkpoint, checked before it is loaded.

``checksums.json`` in a checkpoint folder maps each file (relative name) to its size and SHA-256::

    {"format": 1, "algorithm": "sha256", "files": {".metadata": {"size": 1234, "sha256": "…"}, …}}

It is written last, inside ``step_N.tmp/`` before the rename, so a complete checkpoint always has
it. Sizes are always checked (cheap: a truncated or missing shard); hashes by default (a flipped
byte, a zero-filled block), skipped with ``checkpoint.verify_hashes=false`` for very large runs.
Under ``torchrun`` the files are hashed in slices, one per rank, and the findings are shared, so
every rank reaches the same verdict and no rank reads the whole checkpoint.

Checkpoints written before checksums existed have no ``checksums.json``; they load unverified.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch.distributed as dist

CHECKSUMS = "checksums.json"
_CHUNK = 8 << 20  # bytes read at a time while hashing


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(local: dict) -> dict:
    """Merge every rank's dict (a collective under torchrun; the identity in one process)."""
    rank, world = _world()
    if world == 1:
        return local
    parts: list = [None] * world
    dist.all_gather_object(parts, local)
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _payload_files(folder: Path) -> list[str]:
    return sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file() and f.name != CHECKSUMS)


def write_checksums(folder: Path) -> None:
    """Collective: hash every file of ``folder`` (each rank a slice) and, on rank 0, write
    ``checksums.json`` (flushed; the caller fsyncs and renames the folder)."""
    rank, world = _world()
    names = _payload_files(folder)
    mine = {n: {"size": (folder / n).stat().st_size, "sha256": sha256_file(folder / n)} for n in names[rank::world]}
    files = _gather(mine)
    if rank == 0:
        record = {"format": 1, "algorithm": "sha256", "files": dict(sorted(files.items()))}
        (folder / CHECKSUMS).write_text(json.dumps(record, indent=1) + "\n")


def find_damage(folder: Path, *, hashes: bool = True) -> list[str]:
    """Collective: what is wrong with the files of a checkpoint folder, one phrase each ("__0_0.distcp
    is 11 bytes, 4096 expected (truncated)"); empty when intact or when it has no ``checksums.json``."""
    path = folder / CHECKSUMS
    if not path.exists():
        return []
    try:
        files = json.loads(path.read_text())["files"]
        expected = {str(k): (int(v["size"]), str(v["sha256"])) for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return [f"{CHECKSUMS} is unreadable ({type(e).__name__})"]
    problems: dict[str, str] = {}
    for name, (size, _) in expected.items():
        f = folder / name
        if not f.is_file():
            problems[name] = f"{name} is missing"
        elif (actual := f.stat().st_size) != size:
            problems[name] = f"{name} is {actual} bytes, {size} expected ({'truncated' if actual < size else 'grown'})"
    if hashes:
        rank, world = _world()
        todo = [n for n in sorted(expected) if n not in problems]
        mine = {n: f"{n} does not match its SHA-256 (corrupted)" for n in todo[rank::world]
                if sha256_file(folder / n) != expected[n][1]}
        problems.update(_gather(mine))
    return [problems[n] for n in sorted(problems)]
