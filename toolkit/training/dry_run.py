"""Dry run at full scale: the real parallel plans applied on ``meta`` for a simulated world.

``megaforge train RECIPE --dry-run`` (``trainer.dry_run=true``) never allocates a weight. For each
shown rank ``r`` of a world of ``N = tp × pp × dp`` processes it joins PyTorch's fake process group
(``backend="fake"``: collectives return at once and move no data) as rank ``r`` of ``N``, builds the
runtime and mesh as :func:`toolkit.training.run.train` does (:func:`toolkit.parallel.runtime.setup`),
calls the real :func:`~toolkit.training.run.build_model_parts` without materializing (TP/SP plan,
pipeline split, FSDP2 on ``meta``), reports what that rank holds — its pipeline stages and their
layers, its parameter count (the local shards of DTensors), their bytes, and a few parameters with
their global and local shapes — and leaves the group before the next rank. Every rank is simulated
in this one process, so a layout of thousands of GPUs is checked on a laptop in seconds.

The total: each pipeline rank holds the parameters of its stages — summed from its ranks' shards
(``Σ local numel / replicas``: a parameter replicated over ``k`` ranks counts ``1/k`` on each) when
all of them are shown, else from the global shapes one of them holds. The pipeline ranks between
the first and the last are alike, so the model is ``first + (pp−2)·middle + last`` less the extra
copies of parameters several stages hold (a tied word embedding); the report checks it against the
single-process model's count.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from toolkit.config import RunConfig
from toolkit.errors import ConfigError
from toolkit.models.build import build_meta_model
from toolkit.parallel import validate_parallel
from toolkit.parallel.mesh import DistEnv
from toolkit.parallel.runtime import setup
from toolkit.training.run import build_model_parts, setup_tokenizer

logger = logging.getLogger(__name__)

# bytes per parameter held in training: fp32 weights (autocast keeps them fp32), fp32 gradients and
# AdamW's two fp32 moments
TRAINING_BYTES_PER_PARAM = 16
GIB = 1024 ** 3


@dataclass
class ParamShard:
    """One parameter as a rank holds it."""

    name: str  # single-device name
    global_shape: tuple[int, ...]
    local_shape: tuple[int, ...]  # this rank's shard (``DTensor.to_local()``); the global shape if plain
    placements: str  # DTensor placements over its mesh dims, e.g. "(S(0),)"; "plain" for a plain tensor
    replicas: int  # ranks of the stage holding an identical copy of this shard


@dataclass
class RankReport:
    """What one simulated rank holds after the parallel plans."""

    rank: int
    pp_rank: int
    dp_rank: int
    tp_rank: int
    stages: list[int]  # global pipeline stage of each model part (model chunk)
    layers: list[tuple[int, int] | None]  # first and last global layer index of each part
    local_params: int  # elements of the local shards this rank holds
    unique_params: float  # Σ local / replicas: this rank's share of the model
    bytes: int  # local parameters at their dtype
    params: list[ParamShard]  # every parameter (the log shows a few)
    shared: dict[str, tuple[int, int]] = field(default_factory=dict)  # name → (numel, pipeline ranks holding it)


@dataclass
class DryRunReport:
    world_size: int
    layout: dict[str, int]  # tp, pp, dp (and vpp)
    model_params: int  # the single-process model (its vocabulary padded for tp)
    ranks: list[RankReport]
    total_params: int | None  # reconstructed from the ranks by symmetry; None when a needed rank was not shown

    @property
    def ok(self) -> bool:
        """False when the total reconstructed from the ranks differs from the single-process model's."""
        return self.total_params is None or self.total_params == self.model_params


def default_ranks(*, tp: int, pp: int, dp: int) -> list[int]:
    """First and last TP rank of the first, middle and last pipeline stage (dp rank 0), and the
    world's last rank when dp > 1. Global rank of mesh coordinate (p, d, t): ``(p·dp + d)·tp + t``."""
    ranks = {(p * dp) * tp + t for p in sorted({0, pp // 2, pp - 1}) for t in sorted({0, tp - 1})}
    if dp > 1:
        ranks.add(tp * pp * dp - 1)
    return sorted(ranks)


def dry_run(cfg: RunConfig) -> DryRunReport:
    """Simulate ``cfg``'s layout on ``trainer.dry_run_world_size`` processes (None → tp × pp) and log
    what each of ``trainer.dry_run_ranks`` holds (empty → :func:`default_ranks`)."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("trainer.dry_run simulates every rank in one process; run it without torchrun")
    p, t = cfg.parallel, cfg.trainer
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    world = t.dry_run_world_size or tp * pp
    validate_parallel(cfg, world)  # a bad layout is one line, exit 2
    dp = world // (tp * pp)
    ranks = sorted(set(t.dry_run_ranks)) or default_ranks(tp=tp, pp=pp, dp=dp)
    bad = [r for r in ranks if not 0 <= r < world]
    if bad:
        raise ConfigError(f"trainer.dry_run_ranks has rank {bad[0]}, outside the simulated world of {world} "
                          f"(ranks 0..{world - 1}); set trainer.dry_run_world_size or pick other ranks")
    if cfg.model.vocab_size is None:
        setup_tokenizer(cfg)
    meta_model = build_meta_model(cfg)
    model_params = sum(q.numel() for q in meta_model.parameters())
    layout = {"tp": tp, "pp": pp, "dp": dp, **({"vpp": p.virtual_pipeline_model_parallel_size}
                                               if (p.virtual_pipeline_model_parallel_size or 1) > 1 else {})}
    logger.info(f"dry run: {cfg.name} on a simulated world of {world} ranks "
                f"({' × '.join(f'{k}{v}' for k, v in layout.items())}), fake process group, everything on meta; "
                f"single-process model: {model_params:,} parameters")
    # a pipeline split copies the stages it keeps and leaves the whole model as it is, so one meta
    # model serves every rank; without pipeline stages the plans change the model in place
    reports = [_simulate_rank(cfg, rank, world, meta_model if pp > 1 else None) for rank in ranks]
    for i, report in enumerate(reports):
        like = next((r for r in reports[:i] if r.pp_rank == report.pp_rank and r.params == report.params), None)
        _log_rank(report, cfg.trainer.precision, like)
    total = _total_by_symmetry(reports, tp=tp, pp=pp, dp=dp)
    result = DryRunReport(world_size=world, layout=layout, model_params=model_params, ranks=reports,
                          total_params=total)
    if total is None:
        logger.info("total: not reconstructed (show a rank of the first, a middle and the last pipeline stage)")
    elif result.ok:
        logger.info(f"total over all {world} ranks: {total:,} parameters = the single-process model's {model_params:,}")
    else:
        logger.error(f"total over all {world} ranks: {total:,} parameters, but the single-process model has "
                     f"{model_params:,}: the plan loses or duplicates parameters")
    return result


def _simulate_rank(cfg: RunConfig, rank: int, world: int, meta_model: nn.Module | None) -> RankReport:
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        runtime = setup(cfg, torch.device("cpu"), env=DistEnv(rank=rank, local_rank=0, world_size=world))
        parts, pipeline, _ = build_model_parts(cfg, runtime, materialize_parts=False, meta_model=meta_model)
        stage_ranks = runtime.dims.tp * runtime.dims.dp  # ranks holding one pipeline rank's stages
        params = [_shard(name, q, stage_ranks) for part in parts for name, q in part.named_parameters()]
        shared = {}
        if pipeline is not None:
            shared = {s.name: (s.param.numel(), dist.get_world_size(s.group)) for s in pipeline.shared}
        return RankReport(
            rank=rank, pp_rank=runtime.pp_rank, dp_rank=runtime.dp_rank, tp_rank=runtime.tp_rank,
            stages=pipeline.stage_indices if pipeline is not None else [0],
            layers=[_layer_range(part) for part in parts],
            local_params=sum(_numel(q.local_shape) for q in params),
            unique_params=sum(_numel(q.local_shape) / q.replicas for q in params),
            bytes=sum(_local(q).numel() * q.element_size() for part in parts for q in part.parameters()),
            params=params, shared=shared)
    finally:
        dist.destroy_process_group()


def _local(q: torch.Tensor) -> torch.Tensor:
    return q.to_local() if hasattr(q, "to_local") else q


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _shard(name: str, q: nn.Parameter, stage_ranks: int) -> ParamShard:
    """A parameter's global and local shapes; ``replicas``: the mesh ranks with the same shard (the
    product of the mesh dims it is replicated over; a plain tensor: every rank of the stage)."""
    if not hasattr(q, "placements"):
        return ParamShard(name, tuple(q.shape), tuple(q.shape), "plain", stage_ranks)
    mesh = q.device_mesh
    replicas = 1
    for dim, placement in enumerate(q.placements):
        if placement.is_replicate():
            replicas *= mesh.size(dim)
    placements = "(" + ", ".join(_placement(pl) for pl in q.placements) + ")"
    return ParamShard(name, tuple(q.shape), tuple(q.to_local().shape), placements, replicas)


def _placement(placement: Any) -> str:
    if placement.is_replicate():
        return "R"
    dim = getattr(placement, "dim", None)
    if dim is not None:
        return f"S({dim})"
    return str(placement)


def _layer_range(part: nn.Module) -> tuple[int, int] | None:
    layers = getattr(part, "layers", None)
    if not layers:
        return None
    ids = [int(i) for i in layers.keys()]
    return min(ids), max(ids)


def _log_rank(r: RankReport, precision: str, like: RankReport | None) -> None:
    where = ", ".join(f"stage {s} (layers {lr[0]}–{lr[1]})" if lr else f"stage {s}"
                      for s, lr in zip(r.stages, r.layers))
    autocast = f" (trainer.precision={precision} autocasts; weights stay fp32)" if precision != "fp32" else ""
    logger.info(f"rank {r.rank} (pp {r.pp_rank}, dp {r.dp_rank}, tp {r.tp_rank}): {where}: "
                f"{r.local_params:,} parameters, {r.bytes / GIB:.2f} GiB of fp32 weights{autocast}, "
                f"{r.local_params * TRAINING_BYTES_PER_PARAM / GIB:.2f} GiB with gradients and AdamW state")
    if like is not None:
        logger.info(f"    shapes and placements as rank {like.rank}")
        return
    for q in _examples(r.params):
        logger.info(f"    {q.name:<34} global {str(list(q.global_shape)):<16} local {str(list(q.local_shape)):<16} "
                    f"{q.placements}")


def _examples(params: list[ParamShard], per_layer: int = 6) -> list[ParamShard]:
    """Parameters outside the layers and the weight matrices of each part's first layer."""
    out, first_layer = [], None
    for q in params:
        parts = q.name.split(".")
        if parts[0] != "layers":
            out.append(q)
        elif len(q.global_shape) > 1 and first_layer in (None, parts[1]):
            first_layer = parts[1]
            if sum(x.name.startswith(f"layers.{first_layer}.") for x in out) < per_layer:
                out.append(q)
    return out


def _total_by_symmetry(reports: list[RankReport], *, tp: int, pp: int, dp: int) -> int | None:
    """The model's parameter count from the shown ranks: what each pipeline rank holds — the sum of
    its ranks' shares (``local / replicas``) when all ``tp × dp`` of them are shown, else the global
    shapes of the parameters one of them holds (uneven FSDP shards make ranks differ by a few rows) —,
    pipeline ranks 1..pp−2 alike, and the extra copies of parameters several pipeline ranks hold
    counted once."""
    held: dict[int, float] = {}
    for p in sorted({r.pp_rank for r in reports}):
        mine = [r for r in reports if r.pp_rank == p]
        if len({(r.dp_rank, r.tp_rank) for r in mine}) == tp * dp:
            held[p] = sum({(r.dp_rank, r.tp_rank): r.unique_params for r in mine}.values())
        else:
            held[p] = sum(_numel(q.global_shape) for q in mine[0].params)
    middle = next((held[p] for p in held if 0 < p < pp - 1), None)
    if 0 not in held or pp - 1 not in held or (pp > 2 and middle is None):
        return None
    total = sum(held.get(p, middle) for p in range(pp))
    extra: dict[str, tuple[int, int]] = {}
    for r in reports:
        extra.update(r.shared)
    total -= sum(numel * (holders - 1) for numel, holders in extra.values())
    return round(total)
