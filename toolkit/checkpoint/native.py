"""Native checkpoints: ``run_dir/checkpoints/step_<N>/`` written with torch.distributed.checkpoint.

Layout of one checkpoint::

    step_<N>/.metadata, __*_*.distcp     DCP shards of {"model": ..., "optim": ...}
    step_<N>/trainer_state.json          step, consumed samples, layout, loss scale, ...
    latest                               the name of the last complete checkpoint

A save goes to ``step_<N>.tmp/``, is fsynced, then renamed; ``latest`` moves (write + rename) only
after that, so a run killed at any moment resumes from its last complete checkpoint. Keys are the
single-device parameter names whatever the parallel layout, so any layout loads into any other.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from toolkit.checkpoint.reshard import apply_padding_fixes, prepare_padding_fixes, saved_tensor_shapes
from toolkit.errors import CheckpointError

TRAINER_STATE = "trainer_state.json"
LATEST = "latest"
BEST = "best"  # the fine-tuning checkpoint with the best validation metric (model weights only)

# DCP warns that it runs without a process group; that is the single-process case, on purpose.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync_tree(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def is_complete(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / TRAINER_STATE).is_file()


def read_trainer_state(path: Path) -> dict:
    try:
        return json.loads((path / TRAINER_STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} has no readable {TRAINER_STATE} ({e}); it is incomplete — "
                              "delete it or point to another checkpoint") from None


class CheckpointManager:
    """Saves and finds checkpoints under ``folder`` (normally ``run_dir/checkpoints``)."""

    def __init__(self, folder: str | Path, *, keep_last: int = 2):
        self.folder = Path(folder)
        self.keep_last = max(1, keep_last)

    # ---- finding -------------------------------------------------------------------------
    def latest(self) -> Path | None:
        """The last complete checkpoint, or None when there is none yet."""
        pointer = self.folder / LATEST
        if not pointer.is_file():
            return None
        path = self.folder / pointer.read_text().strip()
        if not is_complete(path):
            raise CheckpointError(
                f"{pointer} points to {path.name}, which is missing or incomplete; "
                "restore it or delete the pointer to start over"
            )
        return path

    def clean_partial(self) -> None:
        """Remove leftovers of a save that was interrupted (rank 0 only)."""
        if _rank() == 0 and self.folder.is_dir():
            for tmp in self.folder.glob("*.tmp"):
                shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        _barrier()

    # ---- saving --------------------------------------------------------------------------
    def save(self, step: int, model: nn.Module | Sequence[nn.Module],
             optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None,
             trainer_state: dict[str, Any], *, process_group=None) -> Path:
        """Collective over all ranks: write ``step_<step>`` atomically and move ``latest`` to it.

        ``model``/``optimizer``: one module and its optimizer, or this rank's pipeline stage modules
        and one optimizer per stage module (see :func:`app_state`)."""
        final = self._write(f"step_{step}", model, optimizer, trainer_state, process_group=process_group)
        if _rank() == 0:
            _write_atomic(self.folder / LATEST, final.name)
            self._prune(keep=final)
        _barrier()
        return final

    def save_best(self, model: nn.Module | Sequence[nn.Module], trainer_state: dict[str, Any], *,
                  process_group=None) -> Path:
        """Collective: write the model weights (no optimizer state) atomically as ``best`` (replacing
        the previous best); ``latest`` does not move."""
        path = self._write(BEST, model, None, trainer_state, process_group=process_group)
        _barrier()
        return path

    def best_state(self) -> dict | None:
        """The trainer state saved with ``best``, or None when there is no best checkpoint yet."""
        path = self.folder / BEST
        return read_trainer_state(path) if is_complete(path) else None

    def _write(self, name: str, model, optimizer, trainer_state: dict[str, Any], *, process_group=None) -> Path:
        final = self.folder / name
        tmp = self.folder / f"{name}.tmp"
        if _rank() == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        _barrier()
        state = app_state(model, optimizer)
        dcp.save(state, checkpoint_id=str(tmp), process_group=process_group)
        _barrier()
        if _rank() == 0:
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
            _fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.folder)
        return final

    def _prune(self, keep: Path) -> None:
        steps = sorted((p for p in self.folder.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")),
                       key=lambda p: int(p.name.split("_")[1]))
        for old in steps[: max(0, len(steps) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    # ---- loading -------------------------------------------------------------------------
    def load(self, path: Path, model: nn.Module | Sequence[nn.Module],
             optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None,
             *, process_group=None, partial: bool = False, skip: Sequence[str] = ()) -> dict:
        """Load model (and optimizer) state in place from ``path``; returns its trainer state.

        ``partial``: load the model tensors the checkpoint has and leave the others as they are (a
        fine-tuning head on a pretrained encoder), and also those whose names start with a prefix in
        ``skip`` (a fine-tuned head for another task); their names are returned under ``"not_loaded"``.
        """
        trainer_state = read_trainer_state(path)
        state = app_state(model, optimizer)
        not_loaded: list[str] = []
        if partial:
            saved = saved_tensor_shapes(path)
            not_loaded = sorted(k for k in state["model"] if f"model.{k}" not in saved or k.startswith(tuple(skip)))
            for k in not_loaded:
                del state["model"][k]
        # a layout with another tp pads the vocabulary differently: load those tensors re-padded
        fixes = prepare_padding_fixes(state, saved_tensor_shapes(path), vocab_size=_vocab_size(model),
                                      where=str(path))
        try:
            dcp.load(state, checkpoint_id=str(path), process_group=process_group)
        except Exception as e:  # DCP raises CheckpointException with per-rank tracebacks inside
            raise CheckpointError(f"cannot load checkpoint {path}: {_first_line(e)}; was it written by a "
                                  "different model configuration?") from None
        trainer_state["repadded"] = apply_padding_fixes(fixes)
        set_app_state(model, optimizer, state, strict=not partial)
        trainer_state["not_loaded"] = not_loaded
        return trainer_state


def _vocab_size(model) -> int | None:
    """The unpadded vocabulary of ``model`` (or of its first part when given several)."""
    first = model[0] if isinstance(model, (list, tuple)) else model
    return getattr(first, "vocab_size", None)


# Optimizer state is flattened to one key per parameter and field ("state.<name>.exp_avg",
# "param_groups.<name>.lr"), as torchtitan does: pipeline stages hold different parameters, and a
# nested "param_groups" list would be one key with a different value on each stage.
_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _parts(model, optimizer) -> tuple[list[nn.Module], list[torch.optim.Optimizer] | None]:
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if optimizer is None:
        return models, None
    optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    if len(optimizers) != len(models):
        raise ValueError(f"{len(models)} model parts but {len(optimizers)} optimizers; give one optimizer per part")
    return models, optimizers


def app_state(model: nn.Module | Sequence[nn.Module],
              optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}`` with fully qualified single-device names (DTensors kept sharded).

    ``model`` may be a list of parts (the pipeline stages a rank holds) with one optimizer per part:
    their state dicts are merged (parts hold disjoint names).
    """
    models, optimizers = _parts(model, optimizer)
    state: dict[str, Any] = {"model": {}}
    for part in models:
        state["model"].update(get_model_state_dict(part))
    if optimizers is not None:
        state["optim"] = {}
        for part, opt in zip(models, optimizers):
            state["optim"].update(get_optimizer_state_dict(part, opt, options=_OPTIM_OPTIONS))
    return state


def set_app_state(model: nn.Module | Sequence[nn.Module],
                  optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None,
                  state: dict[str, Any], *, strict: bool = True) -> None:
    """Load a loaded :func:`app_state` dict back into the parts (each strictly takes its own keys;
    with ``strict=False`` a part may be given only some of them)."""
    models, optimizers = _parts(model, optimizer)
    for i, part in enumerate(models):
        own = get_model_state_dict(part).keys() if len(models) > 1 else state["model"].keys()
        own = [k for k in own if k in state["model"]]
        set_model_state_dict(part, {k: state["model"][k] for k in own}, options=StateDictOptions(strict=strict))
        if optimizers is not None:
            own = (get_optimizer_state_dict(part, optimizers[i], options=_OPTIM_OPTIONS).keys()
                   if len(models) > 1 else state["optim"].keys())
            set_optimizer_state_dict(part, optimizers[i], {k: state["optim"][k] for k in own},
                                     options=_OPTIM_OPTIONS)


def load_model_weights(path: str | Path, model: nn.Module, *, process_group=None) -> dict:
    """Load only the model weights of a checkpoint (for generation, evaluation, export)."""
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete megaforge checkpoint (no .metadata or {TRAINER_STATE})")
    return CheckpointManager(path.parent).load(path, model, None, process_group=process_group)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        line = line.strip()
        if "Error" in line and ":" in line:
            return line
    return text.splitlines()[0] if text else type(e).__name__
