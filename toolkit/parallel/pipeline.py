"""Pipeline parallelism on the ``pp`` mesh dim, with ``torch.distributed.pipelining``.

The model is split by layer into ``pp × vpp`` stages (contiguous groups of the model's ``layers``,
keyed by global index so every stage keeps single-device parameter names). Stage ``s`` runs on
pipeline rank ``s % pp`` — Megatron's interleaved order: with ``vpp`` virtual stages a rank holds
chunks ``r, r + pp, r + 2·pp, …``. The first stage holds the embedding, the last the final norm,
output layer and loss. This module knows no model family: the family hands it a split function
``(model, layer_ids, *, first, last) -> stage module`` (``ModelSpec.pipeline_split``).

Parameters that more than one stage holds — the word embedding tied to the output layer, copied
onto the last stage under the same name (Megatron's way) — are kept in sync: after backward their
gradients are summed over a small process group of the ranks that hold them (built here from the
mesh), so every copy receives the identical update; grad-norm clipping counts them once and DCP
checkpoints keep one copy (identical keys from several ranks are deduplicated).

Schedules (``parallel.pipeline_schedule``): ``1f1b`` (``Schedule1F1B``; with ``vpp > 1`` it is
interleaved 1F1B, as in Megatron), ``interleaved_1f1b`` (``ScheduleInterleaved1F1B``, needs
``vpp > 1``) and ``gpipe`` (``ScheduleGPipe``, one stage per rank). One optimizer step is one
``schedule.step`` over all micro-batches; the schedule reduces data-parallel (FSDP2/replicate)
gradients once, after the last micro-batch, and divides them by the micro-batch count.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

StageSplit = Callable[..., nn.Module]  # (model, layer_ids, *, first, last) -> stage module
LossFn = Callable[[Any, torch.Tensor], torch.Tensor]  # (last stage output, target) -> mean loss


# ---- layout arithmetic (pure; used by validation before any collective) ----------------------
def effective_schedule(schedule: str, vpp: int) -> str:
    """The schedule that runs: ``1f1b`` with ``vpp > 1`` is interleaved 1F1B (Megatron's convention)."""
    return "interleaved_1f1b" if schedule == "1f1b" and vpp > 1 else schedule


def schedule_problem(schedule: str, *, pp: int, vpp: int, num_microbatches: int) -> str | None:
    """Why ``schedule`` cannot run ``num_microbatches`` micro-batches on ``pp × vpp`` stages, or None.

    Mirrors the checks of ``torch.distributed.pipelining`` (2.13): ``Schedule1F1B`` needs at least
    ``pp`` micro-batches; ``ScheduleInterleaved1F1B`` runs ``rounds = max(1, n // pp)`` rounds and
    needs ``n`` divisible by ``rounds``.
    """
    if schedule == "interleaved_1f1b" and vpp < 2:
        return (f"parallel.pipeline_schedule=interleaved_1f1b needs parallel.virtual_pipeline_model_parallel_size "
                f"> 1, got {vpp}; set it (e.g. 2) or use pipeline_schedule=1f1b")
    if schedule == "gpipe" and vpp > 1:
        return (f"parallel.pipeline_schedule=gpipe runs one stage per rank, but "
                f"parallel.virtual_pipeline_model_parallel_size={vpp}; use pipeline_schedule=interleaved_1f1b "
                f"(or 1f1b, which is interleaved when vpp > 1)")
    n = num_microbatches
    if schedule == "1f1b" and n < pp:
        return (f"{n} micro-batches per step (global_batch_size / (micro_batch_size × dp)) is fewer than "
                f"pipeline_model_parallel_size={pp}; the 1F1B schedule needs at least {pp} — raise "
                f"trainer.global_batch_size or use parallel.pipeline_schedule=gpipe")
    if schedule == "interleaved_1f1b":
        rounds = max(1, n // pp)
        if n % rounds:
            return (f"{n} micro-batches per step (global_batch_size / (micro_batch_size × dp)) is not a multiple of "
                    f"max(1, {n} // pipeline_model_parallel_size={pp}) = {rounds}, as interleaved 1F1B needs; "
                    f"use a multiple of {pp} micro-batches")
    return None


def stage_layer_ids(layer_ids: Sequence[str], num_stages: int) -> list[list[str]]:
    """Contiguous, equal groups of layers, one per stage (the count divides evenly: validated)."""
    per = len(layer_ids) // num_stages
    return [list(layer_ids[s * per:(s + 1) * per]) for s in range(num_stages)]


def rank_stage_indices(pp_rank: int, pp: int, vpp: int) -> list[int]:
    """Stages held by pipeline rank ``pp_rank``: ``pp_rank + c·pp`` for chunk ``c`` (Megatron order)."""
    return [pp_rank + chunk * pp for chunk in range(vpp)]


def module_tree_copy(model: nn.Module, *, keep_layers: Sequence[str] | None = None) -> nn.Module:
    """A new module tree that shares every parameter and buffer of ``model`` (no tensor is copied).

    A family's split function prunes this copy to one stage; the full model can then be freed.
    ``keep_layers``: the entries of ``model.layers`` the stage keeps; only those layers are copied,
    the others are referenced until the split drops them (splitting a 105-layer model into 35 stages
    then copies each layer once, not 35 times).
    """
    if keep_layers is None:
        kept: list[nn.Module] = [model]
        memo: dict[int, Any] = {}
    else:
        keep = set(keep_layers)
        memo = {id(layer): layer for i, layer in model.layers.items() if i not in keep}
        kept = [model.layers[i] for i in keep_layers]
        kept += [child for child in model.children() if child is not model.layers]
        memo.update({id(t): t for t in itertools.chain(model.parameters(recurse=False), model.buffers(recurse=False))})
    memo.update({id(t): t for m in kept for t in itertools.chain(m.parameters(), m.buffers())})
    return copy.deepcopy(model, memo)


# ---- the runtime object -------------------------------------------------------------------------
@dataclass
class SharedParam:
    """A parameter held by several pipeline stages (e.g. a tied word embedding)."""

    name: str
    param: nn.Parameter
    group: dist.ProcessGroup  # the ranks holding a copy (same dp/tp coordinate)
    in_norm: bool  # counted by grad-norm clipping here (only on the lowest pipeline rank holding it)


class Pipeline:
    """This rank's stages of the pipeline and the schedules that drive them."""

    def __init__(self, *, parts: list[nn.Module], stage_indices: list[int], num_stages: int, schedule: str,
                 group: dist.ProcessGroup, device: torch.device, shared: list[SharedParam], objective: Any):
        self.parts = parts  # this rank's stage modules (model chunks), in stage order
        self.objective = objective  # the family's PipelineObjective: batch -> stage inputs, last output -> loss
        self.stage_indices = stage_indices  # global stage index of each part
        self.num_stages = num_stages  # pp × vpp
        self.schedule = schedule  # effective schedule name (see effective_schedule)
        self.group = group  # the pipeline (pp) process group of this rank
        self.device = device
        self.shared = shared
        self.pp_size = dist.get_world_size(group)
        self._schedules: dict[tuple[str, int], Any] = {}
        self._loss_fn: LossFn | None = None

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_indices

    @property
    def has_last(self) -> bool:
        return self.num_stages - 1 in self.stage_indices

    def _loss(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        return self._loss_fn(output, target)

    def _get_schedule(self, kind: str, num_microbatches: int):
        """The ``train`` or ``eval`` schedule for ``num_microbatches`` (built once, with its own stages)."""
        key = (kind, num_microbatches)
        if key not in self._schedules:
            from torch.distributed.pipelining import (
                PipelineStage,
                Schedule1F1B,
                ScheduleGPipe,
                ScheduleInterleaved1F1B,
                ScheduleLoopedBFS,
            )

            stages = [PipelineStage(part, index, self.num_stages, self.device, group=self.group)
                      for part, index in zip(self.parts, self.stage_indices)]
            if len(stages) > 1:  # forward-only evaluation has no constraint on the micro-batch count in BFS order
                cls = ScheduleInterleaved1F1B if kind == "train" else ScheduleLoopedBFS
                schedule = cls(stages, num_microbatches, loss_fn=self._loss)
            else:
                cls = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}[self.schedule] if kind == "train" \
                    else ScheduleGPipe
                schedule = cls(stages[0], num_microbatches, loss_fn=self._loss)
            if kind == "eval":
                # forward only — what ``schedule.eval()`` sets for one call; calling ``step`` ourselves
                # with ``return_outputs=False`` avoids keeping every micro-batch's logits
                schedule._has_backward = False
            self._schedules[key] = schedule
        return self._schedules[key]

    def step(self, args: tuple, kwargs: dict, target: torch.Tensor, *, loss_fn: LossFn,
             num_microbatches: int) -> list[torch.Tensor] | None:
        """Forward and backward of a whole local batch (``num_microbatches`` micro-batches along dim 0).

        Gradients end averaged over micro-batches (and reduced over dp). Returns the per-micro-batch
        losses on the rank holding the last stage, None elsewhere.
        """
        self._loss_fn = loss_fn
        losses: list[torch.Tensor] = []
        self._get_schedule("train", num_microbatches).step(
            *(args if self.has_first else ()), target=target if self.has_last else None,
            losses=losses if self.has_last else None, return_outputs=False, **kwargs)
        return losses if self.has_last else None

    @torch.no_grad()
    def evaluate(self, args: tuple, kwargs: dict, target: torch.Tensor, *, loss_fn: LossFn,
                 num_microbatches: int) -> list[torch.Tensor] | None:
        """Forward only; per-micro-batch losses on the last stage's rank, None elsewhere."""
        self._loss_fn = loss_fn
        losses: list[torch.Tensor] = []
        self._get_schedule("eval", num_microbatches).step(
            *(args if self.has_first else ()), target=target if self.has_last else None,
            losses=losses if self.has_last else None, return_outputs=False, **kwargs)
        return losses if self.has_last else None

    @torch.no_grad()
    def sync_shared_grads(self) -> None:
        """Sum the gradients of every shared parameter over the ranks holding a copy.

        A DTensor gradient is first laid out like its parameter (e.g. a vocab-parallel embedding's
        gradient may come back replicated or partial), so every copy's local shard covers the same rows.
        """
        for shared in self.shared:
            p = shared.param
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            if hasattr(grad, "placements") and grad.placements != p.placements:
                grad = grad.redistribute(placements=p.placements)
            p.grad = grad
            dist.all_reduce(grad.to_local() if hasattr(grad, "to_local") else grad, group=shared.group)

    def norm_exclusions(self) -> set[int]:
        """``id`` of the parameters whose gradient another stage already counts in the grad norm."""
        return {id(s.param) for s in self.shared if not s.in_norm}

    def from_last_stage(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` as computed on the last stage's rank, on every rank of the pipeline group."""
        value = value.detach().clone().to(self.device)
        dist.broadcast(value, group=self.group, group_src=self.pp_size - 1)
        return value


def build_pipeline(model: nn.Module, split: StageSplit, *, mesh: DeviceMesh, vpp: int, schedule: str,
                   device: torch.device, objective: Any, parallelize: Callable[[nn.Module], nn.Module]) -> Pipeline:
    """Split ``model`` into this rank's stages, find the parameters several stages share and their
    sync groups, then ``parallelize`` each stage (TP → recompute → data parallel, then materialize).
    ``model`` is on ``meta`` (sharded initialization: only this rank's stages are ever allocated) or
    already materialized and initialized (drop it afterwards to free the layers of other stages). It
    must have a ``layers`` ModuleDict. Collective over all ranks.
    """
    pp_mesh = mesh["pp"]
    pp, pp_rank = pp_mesh.size(), pp_mesh.get_local_rank()
    num_stages = pp * vpp
    groups = stage_layer_ids(list(model.layers.keys()), num_stages)
    indices = rank_stage_indices(pp_rank, pp, vpp)
    parts = [split(model, groups[s], first=s == 0, last=s == num_stages - 1) for s in indices]
    # the parameter names of every pipeline rank, computed here (every rank splits alike) rather than
    # exchanged: no collective, so a simulated world (the dry run's fake process group) gets them right
    names = _stage_param_names(model, split, groups)
    held = [sorted({n for s in rank_stage_indices(r, pp, vpp) for n in names[s]}) for r in range(pp)]
    shared_groups = _shared_param_groups(held, pp_rank, mesh)
    parts = [parallelize(part) for part in parts]
    shared = []
    for name, (holders, group) in shared_groups.items():
        param = next(p for part in parts for n, p in part.named_parameters() if n == name)
        shared.append(SharedParam(name=name, param=param, group=group, in_norm=pp_rank == holders[0]))
    return Pipeline(parts=parts, stage_indices=indices, num_stages=num_stages,
                    schedule=effective_schedule(schedule, vpp), group=pp_mesh.get_group(), device=device,
                    shared=shared, objective=objective)


def _stage_param_names(model: nn.Module, split: StageSplit, groups: list[list[str]]) -> list[list[str]]:
    """The single-device parameter names of every stage: what the split keeps outside the layers
    (split once per kind of stage: first, middle, last) and the stage's layers, ``layers.<id>.…``."""
    outside: dict[tuple[bool, bool], list[str]] = {}
    names = []
    for s, ids in enumerate(groups):
        kind = (s == 0, s == len(groups) - 1)
        if kind not in outside:
            outside[kind] = [n for n, _ in split(model, [], first=kind[0], last=kind[1]).named_parameters()]
        names.append(outside[kind] + [f"layers.{i}.{n}" for i in ids for n, _ in model.layers[i].named_parameters()])
    return names


def _shared_param_groups(everyone: list[list[str]], pp_rank: int,
                         mesh: DeviceMesh) -> dict[str, tuple[tuple[int, ...], Any]]:
    """``{name: (pipeline ranks holding it, process group of those ranks at this dp/tp coordinate)}``
    for every parameter name this rank holds that another pipeline rank holds too; ``everyone``:
    the single-device parameter names of each pipeline rank."""
    pp_mesh = mesh["pp"]
    pp = pp_mesh.size()
    mine = everyone[pp_rank]
    holders: dict[str, list[int]] = {}
    for rank, names in enumerate(everyone):
        for n in names:
            holders.setdefault(n, []).append(rank)
    shared = {n: tuple(r) for n, r in holders.items() if len(r) > 1}
    # one group per distinct set of holders and per (dp, tp) coordinate; every rank creates every
    # group in the same order (new_group is collective over the world)
    ranks = mesh.mesh  # [pp, dp, tp] global ranks
    me = dist.get_rank()
    group_of: dict[tuple[int, ...], Any] = {}
    for subset in sorted(set(shared.values())):
        if len(subset) == pp:
            group_of[subset] = pp_mesh.get_group()
            continue
        for d, t in itertools.product(range(ranks.shape[1]), range(ranks.shape[2])):
            members = [int(ranks[p, d, t]) for p in subset]
            group = dist.new_group(members)
            if me in members:
                group_of[subset] = group
    return {n: (subset, group_of[subset]) for n, subset in shared.items() if n in set(mine)}
