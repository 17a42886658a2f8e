"""Every layout of a job on N GPUs that ``megaforge train`` accepts, and the search over them.

A candidate is checked with the trainer's own rules (:func:`toolkit.parallel.validate.validate_parallel`:
heads and query groups divisible by tp, layers by pp × vpp, global batch by micro × dp, SP only
with tp > 1, the pipeline schedule's micro-batch rules), so a row the planner prints is one that
``megaforge train … KEY=VALUE`` runs. Tensor parallelism stays inside a node.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

from toolkit.config import RunConfig
from toolkit.errors import ConfigError, ParallelConfigError
from toolkit.parallel.validate import validate_parallel
from toolkit.planning.gpus import GPU
from toolkit.planning.layout import Layout
from toolkit.planning.memory import GiB, Memory, memory
from toolkit.planning.timing import DEFAULT_EFFICIENCY, Timing, step_time

MICRO_BATCHES = (1, 2, 4, 8, 16, 32)
RECOMPUTE = ("none", "selective", "full")
SHARDING = ("none", "optimizer_and_grads", "full")
DEFAULT_HEADROOM = 0.1  # fraction of device memory left for the CUDA context, allocator and kernels


@dataclass
class Estimate:
    """One layout with its memory and time."""

    layout: Layout
    memory: Memory
    timing: Timing
    fits: bool  # peak ≤ (1 - headroom) × device memory


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layout_config(cfg: RunConfig, layout: Layout) -> RunConfig:
    """``cfg`` with ``layout`` applied, as the overrides of :meth:`Layout.overrides` would give it."""
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, recompute_granularity=layout.recompute),
        parallel=dataclasses.replace(cfg.parallel, tensor_model_parallel_size=layout.tp,
                                     pipeline_model_parallel_size=layout.pp,
                                     virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
                                     sequence_parallel=layout.sp, data_parallel_sharding=layout.sharding,
                                     pipeline_schedule="1f1b"),
        trainer=dataclasses.replace(cfg.trainer, micro_batch_size=layout.micro_batch, compile=False))


def candidate_layouts(cfg: RunConfig, gpus: int, gpu: GPU) -> Iterator[Layout]:
    """Every valid layout of ``cfg`` on ``gpus`` GPUs (tp ≤ GPUs per node)."""
    m = cfg.model
    G = cfg.trainer.global_batch_size
    for tp in _divisors(gpus):
        if tp > gpu.gpus_per_node:
            break
        for pp in _divisors(gpus // tp):
            dp = gpus // (tp * pp)
            if m.num_layers % pp:
                continue
            vpps = [1] + ([v for v in range(2, m.num_layers // pp + 1) if (m.num_layers // pp) % v == 0][:4]
                          if pp > 1 else [])
            for vpp in vpps:
                for mb in MICRO_BATCHES:
                    if G % (mb * dp):
                        continue
                    for sp in ((False, True) if tp > 1 else (False,)):
                        for sharding in (SHARDING if dp > 1 else ("none",)):
                            for rc in RECOMPUTE:
                                layout = Layout(tp=tp, pp=pp, vpp=vpp, dp=dp, sharding=sharding, sp=sp,
                                                recompute=rc, micro_batch=mb, num_microbatches=G // (mb * dp))
                                try:
                                    validate_parallel(layout_config(cfg, layout), gpus)
                                except ParallelConfigError:
                                    continue
                                yield layout


def estimate(cfg: RunConfig, layout: Layout, gpu: GPU, *, efficiency: float = DEFAULT_EFFICIENCY,
             headroom: float = DEFAULT_HEADROOM) -> Estimate:
    mem = memory(layout_config(cfg, layout), layout)
    return Estimate(layout=layout, memory=mem, timing=step_time(cfg, layout, gpu, efficiency=efficiency),
                    fits=mem.peak <= (1 - headroom) * gpu.memory_gib * GiB)


def plan(cfg: RunConfig, gpus: int, gpu: GPU, *, efficiency: float = DEFAULT_EFFICIENCY,
         headroom: float = DEFAULT_HEADROOM) -> list[Estimate]:
    """Every valid layout's estimate, those that fit first, fastest first (then least memory)."""
    if gpus < 1:
        raise ConfigError(f"--gpus {gpus}: give at least one GPU")
    if not 0 < efficiency <= 1:
        raise ConfigError(f"--efficiency {efficiency}: give a fraction of peak in (0, 1]")
    if gpu.peak_flops(cfg.trainer.precision) <= 0:
        raise ConfigError(f"{gpu.name} has no {cfg.trainer.precision} tensor cores; plan with "
                          f"trainer.precision=fp16 (or fp32), or give --gpu-flops")
    if gpus > gpu.gpus_per_node and gpus % gpu.gpus_per_node:
        raise ConfigError(f"--gpus {gpus} is not a multiple of {gpu.gpus_per_node} GPUs per node ({gpu.name}); "
                          f"use whole nodes or set --gpus-per-node")
    estimates = [estimate(cfg, layout, gpu, efficiency=efficiency, headroom=headroom)
                 for layout in candidate_layouts(cfg, gpus, gpu)]
    if not estimates:
        raise ConfigError(f"no parallel layout of {cfg.name} runs on {gpus} GPUs (global batch "
                          f"{cfg.trainer.global_batch_size}, {cfg.model.num_layers} layers, "
                          f"{cfg.model.num_attention_heads} heads); change --gpus or trainer.global_batch_size")
    return sorted(estimates, key=lambda e: (not e.fits, e.timing.step, e.memory.peak))
