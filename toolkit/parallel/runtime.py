"""The per-process parallel runtime handed to the Trainer: mesh, ranks and the collective helpers.

Built once by :func:`setup` (after validation), it owns nothing global: the mesh and groups it
holds are passed to whoever needs them.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from toolkit.config import RunConfig
from toolkit.parallel.clip import clip_grad_norm_
from toolkit.parallel.data_parallel import apply_data_parallel, set_grad_sync
from toolkit.parallel.mesh import ParallelDims, build_mesh, dist_env, init_process_group
from toolkit.parallel.tensor import local_value, loss_context

# Test hook: "RANK:STEP" makes that rank exit abruptly before that step; "RANK:STEP:hang" makes it
# stop answering collectives instead (the others must then end on the collective timeout).
FAULT_ENV = "MEGAFORGE_FAULT_INJECT"


@dataclass
class ParallelRuntime:
    dims: ParallelDims
    mesh: DeviceMesh
    rank: int
    device: torch.device
    sequence_parallel: bool = False
    data_parallel_sharding: str = "optimizer_and_grads"

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank()

    @property
    def tp_rank(self) -> int:
        return self.mesh["tp"].get_local_rank()

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0

    @property
    def layout(self) -> dict[str, int]:
        return self.dims.layout

    # ---- model -----------------------------------------------------------------------------
    def parallelize(self, model: nn.Module, tp_plan=None, recompute: str = "none") -> nn.Module:
        """TP/SP plan, then activation recompute, then data parallel (in that order), in place.

        ``tp_plan``: the family's ``(model, tp_mesh, *, sequence_parallel) -> model`` (see
        ``toolkit.registry.tensor_parallel_plan``); required when tp > 1.
        """
        from toolkit.parallel.recompute import apply_recompute

        if self.dims.tp > 1:
            if tp_plan is None:
                raise ValueError("tensor_model_parallel_size > 1 needs the model family's tensor-parallel plan")
            tp_plan(model, self.mesh["tp"], sequence_parallel=self.sequence_parallel)
        blocks = list(_blocks(model))
        apply_recompute(blocks, recompute)
        if self.dims.dp > 1:
            apply_data_parallel(model, self.mesh["dp"], self.data_parallel_sharding, blocks)
        return model

    # ---- training-step helpers -----------------------------------------------------------
    def loss_context(self) -> contextlib.AbstractContextManager:
        return loss_context(self.dims.tp > 1)

    def set_grad_sync(self, model: nn.Module, enabled: bool) -> None:
        if self.dims.dp > 1:
            set_grad_sync(model, enabled)

    def clip_grad_norm_(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        return clip_grad_norm_(params, max_norm, stage_size=self.dims.world_size // self.dims.pp)

    def mean_over_dp(self, value: torch.Tensor) -> torch.Tensor:
        """Average a per-dp-rank scalar (a loss) over the data-parallel ranks."""
        value = local_value(value).detach().clone()
        if self.dims.dp > 1:
            dist.all_reduce(value, group=self.mesh["dp"].get_group())
            value = value / self.dims.dp
        return value

    def fault_hook(self, step: int) -> None:
        spec = os.environ.get(FAULT_ENV)
        if spec:
            rank, at, *mode = spec.split(":")
            if int(rank) == self.rank and step == int(at):
                print(f"megaforge: rank {self.rank}: {FAULT_ENV}={spec} at step {step}", flush=True)
                if mode == ["hang"]:
                    import time

                    time.sleep(3600)
                os._exit(1)


def _blocks(model: nn.Module):
    layers = getattr(model, "layers", None)
    if isinstance(layers, nn.ModuleDict):
        yield from layers.values()


def setup(cfg: RunConfig, device: torch.device) -> ParallelRuntime:
    """Join the process group (timeout from ``parallel.timeout_seconds``) and build the mesh."""
    env = dist_env()
    p = cfg.parallel
    dims = ParallelDims(world_size=env.world_size, tp=p.tensor_model_parallel_size,
                        pp=p.pipeline_model_parallel_size, vpp=p.virtual_pipeline_model_parallel_size or 1)
    init_process_group(device, p.timeout_seconds)
    mesh = build_mesh(dims, device)
    return ParallelRuntime(dims=dims, mesh=mesh, rank=env.rank, device=device,
                           sequence_parallel=p.sequence_parallel, data_parallel_sharding=p.data_parallel_sharding)
