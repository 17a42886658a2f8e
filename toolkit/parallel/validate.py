"""Checks of a parallel layout against the world size and the model, run before any collective.

Each failure is one :class:`~toolkit.errors.ParallelConfigError` line naming both numbers.
"""

from __future__ import annotations

from toolkit.config import RunConfig
from toolkit.errors import ParallelConfigError
from toolkit.parallel.pipeline import effective_schedule, schedule_problem
from toolkit.registry import families, get_spec


def validate_parallel(cfg: RunConfig, world_size: int) -> None:
    """Raise :class:`ParallelConfigError` when ``cfg.parallel`` cannot run on ``world_size`` processes."""
    p, m, t = cfg.parallel, cfg.model, cfg.trainer
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    vpp = p.virtual_pipeline_model_parallel_size or 1
    if world_size < 1:
        raise ParallelConfigError(f"world size {world_size} must be >= 1 (the number of processes launched)")
    for key, value in (("parallel.tensor_model_parallel_size", tp), ("parallel.pipeline_model_parallel_size", pp),
                       ("parallel.virtual_pipeline_model_parallel_size", vpp), ("parallel.timeout_seconds",
                                                                                 p.timeout_seconds)):
        if value < 1:
            raise ParallelConfigError(f"{key} must be >= 1, got {value}")
    if world_size % (tp * pp):
        raise ParallelConfigError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size × "
            f"pipeline_model_parallel_size = {tp} × {pp} = {tp * pp}; launch a multiple of {tp * pp} processes "
            f"(torchrun --nproc-per-node) or change the layout")
    dp = world_size // (tp * pp)
    heads = m.num_attention_heads
    if heads % tp:
        raise ParallelConfigError(f"model.num_attention_heads={heads} is not divisible by "
                                  f"parallel.tensor_model_parallel_size={tp}")
    kv = m.num_query_groups or heads
    if kv % tp:
        raise ParallelConfigError(f"model.num_query_groups={kv} (key/value heads) is not divisible by "
                                  f"parallel.tensor_model_parallel_size={tp}")
    spec = get_spec(m.family)
    if pp > 1 and spec.pipeline_split is None:  # before the layer count: changing that would not help
        with_split = sorted(f for f in families() if get_spec(f).pipeline_split is not None)
        raise ParallelConfigError(f"model.family={m.family} has no pipeline split: pipeline parallelism "
                                  f"(parallel.pipeline_model_parallel_size={pp}) supports model.family "
                                  f"{' or '.join(with_split)}; use tensor or data parallelism "
                                  f"(pipeline_model_parallel_size=1)")
    if m.num_layers % (pp * vpp):
        raise ParallelConfigError(
            f"model.num_layers={m.num_layers} is not divisible by pipeline_model_parallel_size × "
            f"virtual_pipeline_model_parallel_size = {pp} × {vpp} = {pp * vpp}")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ParallelConfigError(
            f"trainer.global_batch_size={t.global_batch_size} is not divisible by trainer.micro_batch_size × "
            f"data-parallel size = {t.micro_batch_size} × {dp} = {t.micro_batch_size * dp}")
    if p.sequence_parallel and tp < 2:
        raise ParallelConfigError(f"parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1, "
                                  f"got {tp}")
    if p.sequence_parallel and m.seq_length % tp:
        raise ParallelConfigError(f"model.seq_length={m.seq_length} is not divisible by "
                                  f"parallel.tensor_model_parallel_size={tp} (needed by sequence_parallel)")
    if cfg.task.packing and p.sequence_parallel:
        raise ParallelConfigError("task.packing is not supported with parallel.sequence_parallel yet; turn one off")
    if cfg.task.type != "none" and pp > 1:
        raise ParallelConfigError(f"fine-tuning (task.type={cfg.task.type}) runs with tensor and data parallelism; "
                                  f"set parallel.pipeline_model_parallel_size=1")
    if spec.validate_parallel is not None:
        spec.validate_parallel(cfg)
    if vpp > 1 and pp < 2:
        raise ParallelConfigError(f"parallel.virtual_pipeline_model_parallel_size={vpp} needs "
                                  f"pipeline_model_parallel_size > 1, got {pp}")
    if pp > 1:
        _validate_pipeline(cfg, pp=pp, vpp=vpp, dp=dp)
    if tp > 1 and spec.tensor_parallel is None:
        raise ParallelConfigError(f"model.family={m.family} has no tensor-parallel plan "
                                  f"(parallel.tensor_model_parallel_size={tp}); use data parallelism only")


def _validate_pipeline(cfg: RunConfig, *, pp: int, vpp: int, dp: int) -> None:
    p, t = cfg.parallel, cfg.trainer
    if t.compile:
        raise ParallelConfigError(f"trainer.compile=true is not supported with parallel.pipeline_model_parallel_size="
                                  f"{pp} yet; set trainer.compile=false")
    schedule = effective_schedule(p.pipeline_schedule, vpp)
    problem = schedule_problem(schedule, pp=pp, vpp=vpp,
                               num_microbatches=t.global_batch_size // (t.micro_batch_size * dp))
    if problem:
        raise ParallelConfigError(problem)
