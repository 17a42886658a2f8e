"""Checkpoint integrity in process: checksums written with each save, damage found before a load
(truncated, zero-filled, bit-flipped shards), resume passing over a damaged checkpoint, and a save
that fails leaving everything saved before intact."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from toolkit.checkpoint import CheckpointManager
from toolkit.checkpoint.integrity import CHECKSUMS
from toolkit.errors import CheckpointError


def _model(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    return model, opt


@pytest.fixture
def saved(tmp_path: Path) -> CheckpointManager:
    """step_1, step_2 and step_3 saved (keep_last=3), latest → step_3."""
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=3)
    for step in (1, 2, 3):
        model, opt = _model(step)
        manager.save(step, model, opt, {"step": step, "consumed_samples": 8 * step})
    return manager


def _shard(path: Path) -> Path:
    return next(path.glob("*.distcp"))


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _zero_fill(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[100:4196] = bytes(4096)
    f.write_bytes(bytes(data))


def _flip_bit(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


def test_checksums_cover_every_file(saved: CheckpointManager):
    step = saved.folder / "step_3"
    record = json.loads((step / CHECKSUMS).read_text())
    on_disk = sorted(str(f.relative_to(step)) for f in step.rglob("*") if f.is_file() and f.name != CHECKSUMS)
    assert sorted(record["files"]) == on_disk and ".metadata" in on_disk and "trainer_state.json" in on_disk
    for name, entry in record["files"].items():
        assert entry["size"] == (step / name).stat().st_size and len(entry["sha256"]) == 64
    assert saved.damage(step) == []


@pytest.mark.parametrize("damage, phrase", [(_truncate, "truncated"), (_zero_fill, "SHA-256"),
                                             (_flip_bit, "SHA-256")])
def test_damaged_latest_is_found_and_passed_over(saved: CheckpointManager, damage, phrase):
    shard = _shard(saved.folder / "step_3")
    damage(shard)
    found = saved.damage(saved.folder / "step_3")
    assert len(found) == 1 and shard.name in found[0] and phrase in found[0]
    path, notes = saved.latest_intact()
    assert path == saved.folder / "step_2"
    assert len(notes) == 1 and notes[0].startswith("step_3: ") and shard.name in notes[0]
    # a direct load names the damaged file and the intact checkpoints beside it
    model, opt = _model(0)
    with pytest.raises(CheckpointError, match=rf"step_3 is damaged: {shard.name}.*intact checkpoints beside it: "
                                              r"step_2, step_1"):
        saved.load(saved.folder / "step_3", model, opt)
    # the intact one loads, and its weights are the ones saved
    state = saved.load(path, model, opt)
    assert state["step"] == 2
    reference, _ = _model(2)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_missing_metadata_and_missing_target_fall_back(saved: CheckpointManager):
    (saved.folder / "step_3" / ".metadata").unlink()
    path, notes = saved.latest_intact()
    assert path.name == "step_2" and "incomplete" in notes[0]
    import shutil

    shutil.rmtree(saved.folder / "step_2")
    path, notes = saved.latest_intact()
    assert path.name == "step_1" and len(notes) == 1  # step_2 no longer exists: only step_3 was passed over


def test_every_checkpoint_damaged_is_one_error(saved: CheckpointManager):
    for step in (1, 2, 3):
        _truncate(_shard(saved.folder / f"step_{step}"))
    with pytest.raises(CheckpointError, match="no intact checkpoint in .*step_3: .*step_2: .*step_1: "):
        saved.latest_intact()


def test_sizes_only_without_hashes(saved: CheckpointManager):
    fast = CheckpointManager(saved.folder, verify_hashes=False)
    _flip_bit(_shard(saved.folder / "step_3"))
    assert fast.damage(saved.folder / "step_3") == []  # a flipped bit needs the hash
    _truncate(_shard(saved.folder / "step_2"))
    assert "truncated" in fast.damage(saved.folder / "step_2")[0]


def test_failed_save_leaves_earlier_checkpoints(saved: CheckpointManager, monkeypatch):
    import toolkit.checkpoint.native as native

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(native.dcp, "save", disk_full)
    model, opt = _model(4)
    with pytest.raises(CheckpointError, match="could not save checkpoint .*step_4 .*: .*No space left on device; the "
                                              "earlier checkpoints are untouched \\(latest still names step_3\\)"):
        saved.save(4, model, opt, {"step": 4})
    assert (saved.folder / "latest").read_text().strip() == "step_3"
    assert sorted(p.name for p in saved.folder.iterdir()) == ["latest", "step_1", "step_2", "step_3"]
    assert saved.damage(saved.folder / "step_3") == []


def test_replacing_best_survives_a_crash_between_renames(tmp_path: Path):
    """``best`` is replaced via ``best.old``: a crash after the first rename is repaired on restart."""
    manager = CheckpointManager(tmp_path / "checkpoints")
    model, _ = _model(1)
    manager.save_best(model, {"step": 1, "best_metric": 0.5})
    (manager.folder / "best").rename(manager.folder / "best.old")  # the state a crash there leaves
    manager.clean_partial()
    assert manager.best_state()["step"] == 1 and not (manager.folder / "best.old").exists()
    model, _ = _model(2)
    manager.save_best(model, {"step": 2, "best_metric": 0.7})
    assert manager.best_state()["step"] == 2 and not (manager.folder / "best.old").exists()
