"""Parallel dimensions and the device mesh, built from the ``torchrun`` environment.

Mesh dims, outermost first: ``pp`` (pipeline stages), ``dp`` (data parallel: replicated or FSDP2
sharded), ``tp`` (tensor parallel, innermost so its ranks are neighbours on a node).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class DistEnv:
    """What ``torchrun`` tells one process about the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or "RANK" in os.environ and "MASTER_ADDR" in os.environ


def dist_env() -> DistEnv:
    return DistEnv(rank=int(os.environ.get("RANK", "0")), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                   world_size=int(os.environ.get("WORLD_SIZE", "1")))


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of every parallel dimension; ``dp`` is derived as world / (tp × pp)."""

    world_size: int
    tp: int = 1
    pp: int = 1
    vpp: int = 1

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    @property
    def layout(self) -> dict[str, int]:
        out = {"tp": self.tp, "pp": self.pp, "dp": self.dp}
        if self.vpp > 1:
            out["vpp"] = self.vpp
        return out

    def mesh_shape(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        return (self.pp, self.dp, self.tp), ("pp", "dp", "tp")


def backend_for(device: torch.device) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(device: torch.device, timeout_seconds: int) -> None:
    """Join the job's default process group (rendezvous from the torchrun env), once per process."""
    if dist.is_initialized():
        return
    env = dist_env()
    kwargs = {}
    if device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group(backend=backend_for(device), timeout=timedelta(seconds=timeout_seconds),
                            rank=env.rank, world_size=env.world_size, **kwargs)


def build_mesh(dims: ParallelDims, device: torch.device) -> DeviceMesh:
    """A 3-D mesh ``(pp, dp, tp)``; sub-meshes are taken by name (``mesh["tp"]``)."""
    shape, names = dims.mesh_shape()
    return init_device_mesh(device.type, shape, mesh_dim_names=names)


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
