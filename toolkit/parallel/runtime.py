"""The per-process parallel runtime handed to the Trainer: mesh, ranks and the collective helpers.

Built once by :func:`setup` (after validation), it owns nothing global: the mesh and groups it
holds are passed to whoever needs them. A single process is a world of size 1 through the same
runtime: no process group, no mesh, and every helper is what one process does (the trainer has no
single-process branch).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Collection

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from toolkit.config import RunConfig
from toolkit.parallel.clip import clip_grad_norm_
from toolkit.parallel.data_parallel import apply_data_parallel, set_grad_sync
from toolkit.parallel.mesh import DistEnv, ParallelDims, build_mesh, destroy, dist_env, init_process_group
from toolkit.parallel.pipeline import Pipeline, build_pipeline
from toolkit.parallel.recompute import apply_recompute, transformer_blocks
from toolkit.parallel.tensor import local_value, loss_context

logger = logging.getLogger(__name__)

# Test hook, "RANK:STEP[:ACTION[:PHASE]]": at step STEP (0-based: before that many steps are done), rank
# RANK acts — ACTION exit (the default: os._exit(1), as kill -9 would end it), hang (stops answering
# collectives; the others must end on the collective timeout), raise (an exception), or a signal name
# (SIGTERM: sent to itself) — at PHASE step (the start of the step, the default), forward (inside its
# forward pass, within the pipeline schedule under pp) or save (inside the save of checkpoint step_STEP,
# once its own shards are written).
FAULT_ENV = "MEGAFORGE_FAULT_INJECT"


@dataclass
class ParallelRuntime:
    dims: ParallelDims
    mesh: DeviceMesh | None  # (pp, dp, tp) mesh; None in a world of size 1 (no process group)
    rank: int
    device: torch.device
    sequence_parallel: bool = False
    data_parallel_sharding: str = "optimizer_and_grads"
    pipeline_schedule: str = "1f1b"  # parallel.pipeline_schedule (see toolkit.parallel.pipeline)

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank() if self.mesh is not None else 0

    @property
    def tp_rank(self) -> int:
        return self.mesh["tp"].get_local_rank() if self.mesh is not None else 0

    @property
    def pp_rank(self) -> int:
        return self.mesh["pp"].get_local_rank() if self.mesh is not None else 0

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0

    @property
    def layout(self) -> dict[str, int]:
        return self.dims.layout

    # ---- model -----------------------------------------------------------------------------
    def parallelize(self, model: nn.Module, tp_plan=None, recompute: str = "none",
                    materialize: Callable[[nn.Module], Any] | None = None) -> nn.Module:
        """TP/SP plan, then activation recompute, then data parallel (in that order), in place.

        ``tp_plan``: the family's ``(model, tp_mesh, *, sequence_parallel) -> model`` (see
        ``ModelSpec.tensor_parallel``); required when tp > 1. ``materialize``: called last with the
        parallelized module — for a model still on ``meta``, allocating and initializing only this
        rank's shards (``toolkit.models.build.materialize``).
        """
        if self.dims.tp > 1:
            if tp_plan is None:
                raise ValueError("tensor_model_parallel_size > 1 needs the model family's tensor-parallel plan")
            tp_plan(model, self.mesh["tp"], sequence_parallel=self.sequence_parallel)
        blocks = transformer_blocks(model)
        apply_recompute(blocks, recompute)
        if self.dims.dp > 1:
            # a family may name modules it calls outside their parent layer's forward (T5's
            # relative position bias): they need FSDP units of their own, wrapped first
            extra = getattr(model, "data_parallel_units", None)
            units = [*(extra() if extra is not None else []), *blocks]
            apply_data_parallel(model, self.mesh["dp"], self.data_parallel_sharding, units)
        if materialize is not None:
            materialize(model)
        return model

    def build_pipeline(self, model: nn.Module, split, objective, tp_plan=None, recompute: str = "none",
                       materialize: Callable[[nn.Module], Any] | None = None) -> Pipeline:
        """Split ``model`` into this rank's pipeline stages and parallelize each (TP → recompute → dp),
        then ``materialize`` each (see :meth:`parallelize`; ``model`` may be on ``meta``).

        ``split``: the family's ``(model, layer_ids, *, first, last) -> stage`` (see
        ``ModelSpec.pipeline_split``) and ``objective`` its ``ModelSpec.pipeline_objective``. Returns a
        :class:`toolkit.parallel.pipeline.Pipeline`; its ``parts`` are the stage modules this rank trains.
        """
        return build_pipeline(model, split, mesh=self.mesh, vpp=self.dims.vpp, schedule=self.pipeline_schedule,
                              device=self.device, objective=objective,
                              parallelize=lambda part: self.parallelize(part, tp_plan, recompute, materialize))

    # ---- training-step helpers -----------------------------------------------------------
    def loss_context(self) -> contextlib.AbstractContextManager:
        return loss_context(self.dims.tp > 1)

    def set_grad_sync(self, model: nn.Module, enabled: bool) -> None:
        if self.dims.dp > 1:
            set_grad_sync(model, enabled)

    def clip_grad_norm_(self, params: list[nn.Parameter], max_norm: float,
                        exclude_from_norm: Collection[int] = ()) -> torch.Tensor:
        """Clip to the global norm over every rank's gradient shards; returns the norm."""
        if self.mesh is None:
            return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return clip_grad_norm_(params, max_norm, stage_size=self.dims.world_size // self.dims.pp,
                               exclude_from_norm=exclude_from_norm)

    def sync_found_inf(self, scaler: torch.amp.GradScaler, optimizer) -> None:
        """fp16: after ``scaler.unscale_``, skip the step on every rank if any rank saw inf/NaN
        (each rank only checks the gradient shards it holds: its stage, its tp/dp shard)."""
        if self.mesh is None:
            return
        found = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        for flag in found.values():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)

    def mean_over_dp(self, value: torch.Tensor) -> torch.Tensor:
        """Average a per-dp-rank scalar (a loss) over the data-parallel ranks."""
        value = local_value(value).detach().clone()
        if self.dims.dp > 1:
            dist.all_reduce(value, group=self.mesh["dp"].get_group())
            value = value / self.dims.dp
        return value

    def read_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, bad: torch.Tensor,
                  signal: bool) -> tuple[float, float, bool, bool]:
        """The step's one host read: (loss, gradient norm, skip, stop). ``bad`` (a 0-d bool tensor: the
        step is not finite) and ``signal`` (this rank received a stop signal) are OR-ed over every rank
        in one small all-reduce on the device, and read back with the loss and norm in one transfer,
        so all ranks take the same decision and the step waits for the device once."""
        flags = torch.stack([bad.float(), torch.full((), float(signal), device=bad.device)])  # [2]
        if self.mesh is not None:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        values = torch.cat([flags, local_value(loss).detach().float().reshape(1),
                            local_value(grad_norm).detach().float().reshape(1)])  # [4]
        skip, stop, loss_value, norm = values.tolist()
        return loss_value, norm, bool(skip), bool(stop)

    def any_rank(self, *flags: bool) -> list[bool]:
        """Each flag OR-ed over every rank (one small all-reduce), so all ranks take the same decision
        (skip a non-finite step, stop on a signal one rank received)."""
        if self.mesh is None:
            return [bool(f) for f in flags]
        t = torch.tensor([float(f) for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def barrier(self) -> None:
        if self.mesh is not None:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group (nothing to do in a world of size 1)."""
        if self.mesh is not None:
            destroy()

    def fault_hook(self, step: int, phase: str = "step", parts: list[nn.Module] = ()) -> None:
        """The test hook of ``MEGAFORGE_FAULT_INJECT`` (see :data:`FAULT_ENV`): called by the trainer at
        each phase of a step — ``step`` (its start), ``save`` (inside a checkpoint save, after this
        rank's shards are written) — and acting when rank, step and phase match. Phase ``forward``
        arms a one-shot hook that acts inside this rank's next forward (within the pipeline schedule
        when pp > 1); it is armed at the step's start, so give ``parts``."""
        spec = os.environ.get(FAULT_ENV)
        if not spec:
            return
        rank, at, *rest = spec.split(":")
        action, where = (rest[0] if rest else "exit"), (rest[1] if len(rest) > 1 else "step")
        if int(rank) != self.rank or step != int(at):
            return
        if where == "forward" and phase == "step":
            handles = []

            def pre_hook(_module, _args):
                for h in handles:
                    h.remove()
                self._inject(spec, action, step)

            handles.extend(part.register_forward_pre_hook(pre_hook) for part in parts)
        elif where == phase:
            self._inject(spec, action, step)

    def _inject(self, spec: str, action: str, step: int) -> None:
        logger.warning(f"megaforge: rank {self.rank}: {FAULT_ENV}={spec} at step {step}")
        if action == "hang":  # blocked in a receive no rank answers, as a rank stuck in a collective is
            if dist.is_initialized():
                dist.recv(torch.zeros(1, device=self.device), src=(self.rank + 1) % dist.get_world_size())
            time.sleep(3600)
        if action == "raise":
            raise RuntimeError(f"{FAULT_ENV}: injected failure on rank {self.rank} at step {step}")
        if action.startswith("SIG"):
            os.kill(os.getpid(), getattr(signal, action))
            return
        os._exit(1)


def setup(cfg: RunConfig, device: torch.device, *, env: DistEnv | None = None) -> ParallelRuntime:
    """Join the process group (timeout from ``parallel.timeout_seconds``) and build the mesh; in a
    world of size 1, the runtime of one process (no process group).

    ``env``: this process's rank and world size; None → from ``torchrun``'s environment. A caller
    that passes it has joined a process group of that size itself (the dry run's fake group,
    ``toolkit.training.dry_run``), which is then used as it is.
    """
    env = env or dist_env()
    p = cfg.parallel
    dims = ParallelDims(world_size=env.world_size, tp=p.tensor_model_parallel_size,
                        pp=p.pipeline_model_parallel_size, vpp=p.virtual_pipeline_model_parallel_size or 1)
    mesh = None
    if env.world_size > 1:
        init_process_group(device, p.timeout_seconds)
        mesh = build_mesh(dims, device)
    return ParallelRuntime(dims=dims, mesh=mesh, rank=env.rank, device=device,
                           sequence_parallel=p.sequence_parallel, data_parallel_sharding=p.data_parallel_sharding,
                           pipeline_schedule=p.pipeline_schedule)
