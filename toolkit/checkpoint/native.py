"""Native checkpoints: ``run_dir/checkpoints/step_<N>/`` written with torch.distributed.checkpoint.

Layout of one checkpoint::

    step_<N>/.metadata, __*_*.distcp     DCP shards of {"model": ..., "optim": ...}
    step_<N>/trainer_state.json          step, consumed samples, layout, loss scale, ...
    step_<N>/checksums.json              size and SHA-256 of each file above (toolkit.checkpoint.integrity)
    latest                               the name of the last complete checkpoint

A save goes to ``step_<N>.tmp/``, is fsynced, then renamed; ``latest`` moves (write + rename) only
after that, so a run killed at any moment resumes from its last complete checkpoint. A save that
fails (disk full, permissions) removes its ``.tmp`` folder and leaves the earlier checkpoints and
``latest`` as they were. Loading checks the checksums first; a resume passes over a damaged
checkpoint to the newest intact one. Keys are the
single-device parameter names whatever the parallel layout, so any layout loads into any other.
Every read goes through :mod:`toolkit.checkpoint.safe_dcp`: ``.metadata`` is unpickled with an
allow-list and non-tensor entries with ``weights_only=True``, so loading a checkpoint runs no code.
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
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from toolkit.checkpoint.integrity import find_damage, write_checksums
from toolkit.checkpoint.reshard import apply_padding_fixes, prepare_padding_fixes, saved_tensor_shapes
from toolkit.checkpoint.safe_dcp import load as load_dcp
from toolkit.errors import CheckpointError
from toolkit.optim import kernels_kept

TRAINER_STATE = "trainer_state.json"
LATEST = "latest"
BEST = "best"  # the fine-tuning checkpoint with the best validation metric (model weights only)
OLD = ".old"  # suffix of a checkpoint folder being replaced by a new one of the same name

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


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename folder ``src`` to ``dst``, replacing it; a crash at any moment leaves one of the two
    complete under its name or as ``dst.old`` (which :meth:`CheckpointManager.clean_partial` restores)."""
    if dst.exists():
        old = dst.with_name(dst.name + OLD)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


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

    def __init__(self, folder: str | Path, *, keep_last: int = 2, verify_hashes: bool = True):
        self.folder = Path(folder)
        self.keep_last = max(1, keep_last)
        self.verify_hashes = verify_hashes  # compare SHA-256 before loading (sizes are always compared)

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

    def damage(self, path: Path) -> list[str]:
        """Collective: what is wrong with checkpoint ``path`` (see :func:`find_damage`); empty if intact."""
        if not is_complete(path):
            return [f"{path.name} is incomplete (no .metadata or {TRAINER_STATE})"]
        return find_damage(path, hashes=self.verify_hashes)

    def steps(self) -> list[Path]:
        """The ``step_N`` folders, newest first."""
        found = [p for p in self.folder.glob("step_*") if p.is_dir() and _step_of(p) >= 0]
        return sorted(found, key=_step_of, reverse=True)

    def latest_intact(self) -> tuple[Path | None, list[str]]:
        """Collective: the checkpoint to resume from — the one ``latest`` names when it is intact, else
        the newest intact one before it — and one note per damaged checkpoint passed over. (None, [])
        when nothing was saved yet; a :class:`CheckpointError` when every checkpoint is damaged."""
        pointer = self.folder / LATEST
        if not pointer.is_file():
            return None, []
        named = self.folder / pointer.read_text().strip()
        limit = _step_of(named) if _step_of(named) >= 0 else float("inf")
        notes = []
        for path in [named, *(p for p in self.steps() if _step_of(p) < limit)]:
            damage = self.damage(path)
            if not damage:
                return path, notes
            notes.append(f"{path.name}: {_summary(damage)}")
        raise CheckpointError(f"no intact checkpoint in {self.folder} ({'; '.join(notes)}); restore the damaged "
                              f"files, or move {self.folder} away to start the run over")

    def clean_partial(self) -> None:
        """Remove leftovers of a save that was interrupted (rank 0 only); a replaced folder whose
        successor never arrived (``best.old`` without ``best``) is put back."""
        if _rank() == 0 and self.folder.is_dir():
            for tmp in self.folder.glob("*.tmp"):
                shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            for old in self.folder.glob(f"*{OLD}"):
                current = old.with_name(old.name[: -len(OLD)])
                shutil.rmtree(old, ignore_errors=True) if current.exists() else os.replace(old, current)
        _barrier()

    # ---- saving --------------------------------------------------------------------------
    def save(self, step: int, model: nn.Module | Sequence[nn.Module],
             optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None,
             trainer_state: dict[str, Any], *, process_group=None, after_write=None) -> Path:
        """Collective over all ranks: write ``step_<step>`` atomically and move ``latest`` to it.

        ``model``/``optimizer``: one module and its optimizer, or this rank's pipeline stage modules
        and one optimizer per stage module (see :func:`app_state`). ``after_write``: called on each
        rank once its shards are written (a test hook for faults mid-save)."""
        final = self._write(f"step_{step}", model, optimizer, trainer_state, process_group=process_group,
                            after_write=after_write)
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

    def _write(self, name: str, model, optimizer, trainer_state: dict[str, Any], *, process_group=None,
               after_write=None) -> Path:
        final = self.folder / name
        tmp = self.folder / f"{name}.tmp"
        try:
            if _rank() == 0:
                self.folder.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
            _barrier()
            state = app_state(model, optimizer)
            dcp.save(state, checkpoint_id=str(tmp), process_group=process_group)
            if after_write is not None:
                after_write()
            _barrier()
            if _rank() == 0:
                (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
            _barrier()
            write_checksums(tmp)  # collective: each rank hashes a slice, rank 0 writes checksums.json
            if _rank() == 0:
                _fsync_tree(tmp)
                _replace_dir(tmp, final)
                _fsync_dir(self.folder)
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            if _rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            pointer = self.folder / LATEST
            kept = f"{LATEST} still names {pointer.read_text().strip()}" if pointer.is_file() else "none was saved before"
            try:
                free = f" ({shutil.disk_usage(self.folder).free / 2**20:.0f} MiB free there)"
            except OSError:
                free = ""
            raise CheckpointError(f"could not save checkpoint {final}{free}: {_first_line(e)}; the earlier checkpoints are "
                                  f"untouched ({kept}); free disk space or fix the folder's permissions, then run "
                                  "the same command to continue") from None
        return final

    def _prune(self, keep: Path) -> None:
        # newer folders than ``keep`` (a damaged checkpoint a resume passed over) are replaced as the run
        # reaches their step again; the count covers the checkpoints up to ``keep``
        for old in [p for p in self.steps() if _step_of(p) <= _step_of(keep)][self.keep_last:]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    # ---- loading -------------------------------------------------------------------------
    def load(self, path: Path, model: nn.Module | Sequence[nn.Module],
             optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None,
             *, process_group=None, partial: bool = False, skip: Sequence[str] = (), verified: bool = False,
             frozen: bool = False) -> dict:
        """Load model (and optimizer) state in place from ``path``; returns its trainer state.

        The files are checked against the checkpoint's checksums first (unless ``verified``: the
        caller did); a damaged checkpoint is a :class:`CheckpointError` naming the damage and the
        intact checkpoints beside it.

        ``partial``: load the model tensors the checkpoint has and leave the others as they are (a
        fine-tuning head on a pretrained encoder), and also those whose names start with a prefix in
        ``skip`` (a fine-tuned head for another task); their names are returned under ``"not_loaded"``.
        ``frozen``: load frozen parameters too (a LoRA run's base from ``checkpoint.init_from``).
        """
        if not verified and (damage := self.damage(path)):
            intact = [p.name for p in CheckpointManager(path.parent, verify_hashes=self.verify_hashes).steps()
                      if p != path and not self.damage(p)]
            raise CheckpointError(f"checkpoint {path} is damaged: {_summary(damage)}; intact checkpoints beside it: "
                                  f"{', '.join(intact) or 'none'} (pass one of them instead)")
        trainer_state = read_trainer_state(path)
        state = app_state(model, optimizer, frozen=frozen)
        not_loaded: list[str] = []
        if partial:
            saved = saved_tensor_shapes(path)
            not_loaded = sorted(k for k in state["model"] if f"model.{k}" not in saved or k.startswith(tuple(skip)))
            for k in not_loaded:
                del state["model"][k]
        # a layout with another tp pads the vocabulary differently: load those tensors re-padded
        fixes = prepare_padding_fixes(state, saved_tensor_shapes(path), vocab_size=_vocab_size(model),
                                      where=str(path))
        try:  # through safe_dcp: its .metadata and non-tensor entries are not unpickled freely
            load_dcp(state, path, process_group=process_group)
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException (a BaseException) has
            # per-rank tracebacks inside
            raise CheckpointError(f"cannot load checkpoint {path}: {_first_line(e)}; was it written by a "
                                  "different model configuration?") from None
        trainer_state["repadded"] = apply_padding_fixes(fixes)
        set_app_state(model, optimizer, state, strict=not partial)
        trainer_state["not_loaded"] = not_loaded
        return trainer_state


def _step_of(path: Path) -> int:
    """N of a ``step_N`` folder; -1 for any other name."""
    head, _, number = path.name.partition("_")
    return int(number) if head == "step" and number.isdigit() else -1


def _summary(damage: list[str]) -> str:
    return damage[0] + (f" (and {len(damage) - 1} more)" if len(damage) > 1 else "")


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


def has_frozen(model: nn.Module | Sequence[nn.Module]) -> bool:
    """Whether some parameter is frozen (a LoRA run's base): checkpoints then hold only the trainable ones."""
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    return any(not p.requires_grad for part in models for p in part.parameters())


def app_state(model: nn.Module | Sequence[nn.Module],
              optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None, *,
              frozen: bool = False) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}`` with fully qualified single-device names (DTensors kept sharded).

    ``model`` may be a list of parts (the pipeline stages a rank holds) with one optimizer per part:
    their state dicts are merged (parts hold disjoint names). Frozen parameters (a LoRA run's base,
    rebuilt from ``checkpoint.init_from`` or the seed) are left out unless ``frozen``.
    """
    models, optimizers = _parts(model, optimizer)
    state: dict[str, Any] = {"model": {}}
    options = StateDictOptions(ignore_frozen_params=not frozen)
    for part in models:
        state["model"].update(get_model_state_dict(part, options=options))
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
        # a frozen base is not in the state (see app_state): strictness then covers the trainable keys
        if strict and has_frozen(part):
            trainable = get_model_state_dict(part, options=StateDictOptions(ignore_frozen_params=True)).keys()
            missing = sorted(set(trainable) - set(own))
            if missing:
                raise CheckpointError(f"the checkpoint has no {missing[0]} (and {len(missing) - 1} more trainable "
                                      "tensors); was it written by a different model configuration?")
        set_model_state_dict(part, {k: state["model"][k] for k in own},
                             options=StateDictOptions(strict=strict and not has_frozen(part)))
        if optimizers is not None:
            own = (get_optimizer_state_dict(part, optimizers[i], options=_OPTIM_OPTIONS).keys()
                   if len(models) > 1 else state["optim"].keys())
            with kernels_kept(optimizers[i]):
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
