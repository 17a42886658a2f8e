"""Keyed, layout-independent initialization shared by every family.

A family states *how* each parameter starts as rules, ``{single-device parameter name: ParamInit}``
(:func:`megatron_init_rules` for the Megatron scheme; T5 writes its own), computed once on the
``meta`` model. :func:`init_parameters` then fills whatever a rank holds — the whole model, a
tensor-parallel or FSDP2 shard (a DTensor), or a pipeline stage — one parameter at a time: a random
parameter is drawn in full from a generator seeded by ``(seed, name)`` and this rank keeps its
slice. The values therefore depend only on the seed, the name and the full shape, never on the
layout, the other parameters or the order they are visited in; every layout starts bitwise equal to
one process (on the same device type). The extra memory is one full parameter at a time (the
largest one bounds it; the local part is copied out of it as a view, or with one shard-sized
gather for FSDP2's strided shards on top of TP); constant rules (zeros, ones) fill the local shard
directly.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

# Output projections of residual branches: their std is scaled by 1/sqrt(2 × num_layers).
RESIDUAL_OUTPUTS = ("attn.out", "mlp.fc2", "cross_attn.out")


@dataclass(frozen=True)
class ParamInit:
    """How one parameter starts: ``normal`` (N(0, std²)), ``zeros`` or ``ones``."""

    kind: str
    std: float = 0.0

    @property
    def random(self) -> bool:
        return self.kind == "normal"

    def fill_(self, t: torch.Tensor, generator: torch.Generator | None = None) -> None:
        if self.kind == "normal":
            t.normal_(0.0, self.std, generator=generator)
        elif self.kind == "zeros":
            t.zero_()
        elif self.kind == "ones":
            t.fill_(1.0)
        else:
            raise ValueError(f"unknown parameter init {self.kind!r}")


def normal(std: float) -> ParamInit:
    return ParamInit("normal", float(std))


ZEROS = ParamInit("zeros")
ONES = ParamInit("ones")

InitRules = Mapping[str, ParamInit]


def megatron_init_rules(model: nn.Module, *, std: float, num_layers: int) -> dict[str, ParamInit]:
    """Megatron's scheme: N(0, std) for linears and embeddings, std/sqrt(2 × num_layers) for residual
    output projections, zero biases, unit norms. Parameters of other modules get no rule (the family
    adds them: BERT's MLM bias)."""
    scaled = std / math.sqrt(2.0 * num_layers)
    rules: dict[str, ParamInit] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            rules[f"{prefix}weight"] = normal(scaled if name.endswith(RESIDUAL_OUTPUTS) else std)
            if getattr(module, "bias", None) is not None:
                rules[f"{prefix}bias"] = ZEROS
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            if module.weight is not None:
                rules[f"{prefix}weight"] = ONES
            if getattr(module, "bias", None) is not None:
                rules[f"{prefix}bias"] = ZEROS
    return rules


def init_rules_check(model: nn.Module, rules: InitRules) -> None:
    """Every parameter of ``model`` has a rule and every rule names a parameter (raises ValueError)."""
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    missing, extra = sorted(names - set(rules)), sorted(set(rules) - names)
    if missing or extra:
        raise ValueError(f"{type(model).__name__} init rules: no rule for {missing[:4]}; rules for no "
                         f"parameter {extra[:4]}")


def param_seed(seed: int, name: str) -> int:
    """The generator seed of parameter ``name`` under run seed ``seed`` (stable across processes and
    Python versions: SHA-256, never ``hash()``)."""
    digest = hashlib.sha256(f"megaforge-init/{int(seed)}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def full_init(rule: ParamInit, name: str, seed: int, shape, *, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """The whole of parameter ``name`` as ``rule`` starts it under ``seed`` (what one process holds)."""
    t = torch.empty(tuple(shape), dtype=dtype, device=device)
    gen = torch.Generator(device=t.device).manual_seed(param_seed(seed, name)) if rule.random else None
    rule.fill_(t, gen)
    return t


@torch.no_grad()
def init_parameters(module: nn.Module, rules: InitRules, seed: int) -> None:
    """Fill every parameter ``module`` holds (materialized: after ``to_empty``) from ``rules``.

    ``module`` may be the whole model, a pipeline stage, or either after tensor parallelism and
    FSDP2 (DTensor parameters: each rank keeps its slice of the full draw). Parameter names are the
    single-device names (stages, TP, recompute and FSDP2 keep them). A parameter without a rule is
    an error. Non-persistent buffers are recomputed (``reset_buffers``).
    """
    for name, param in module.named_parameters():
        rule = rules.get(name)
        if rule is None:
            raise KeyError(f"{type(module).__name__}: no init rule for parameter {name!r}")
        local = param.to_local() if isinstance(param, DTensor) else param
        if not rule.random:  # constants need no full tensor
            rule.fill_(local)
            continue
        if not isinstance(param, DTensor) and param.is_contiguous():  # the whole parameter: draw in place
            rule.fill_(param, torch.Generator(device=param.device).manual_seed(param_seed(seed, name)))
            continue
        full = full_init(rule, name, seed, param.shape, dtype=param.dtype, device=local.device)
        local.copy_(local_part(full, param) if isinstance(param, DTensor) else full)
        del full
    reset_buffers(module)


def local_part(full: torch.Tensor, param: DTensor) -> torch.Tensor:
    """This rank's part of ``full`` laid out as ``param`` (any placements: TP ``Shard``, FSDP2's
    ``Shard(0)`` and ``_StridedShard`` on top of TP, ``Replicate``), without a copy where it is a
    slice. Each tensor dim's indices are found by laying out a 1-D ``arange`` the same way (tiny;
    local, no communication), so DTensor's own chunking rules decide, not a re-implementation."""
    out = full
    for d in range(full.ndim):
        placements = [_along(p, d, full.ndim) for p in param.placements]
        if all(isinstance(p, Replicate) for p in placements):
            continue
        ids = torch.arange(full.shape[d], device=full.device)
        ids = distribute_tensor(ids, param.device_mesh, placements, src_data_rank=None).to_local()
        start = int(ids[0]) if ids.numel() else 0
        if torch.equal(ids, torch.arange(start, start + ids.numel(), device=ids.device)):
            out = out.narrow(d, start, ids.numel())  # a contiguous range: a view
        else:
            out = out.index_select(d, ids)
    return out


def _along(p: Placement, d: int, ndim: int) -> Placement:
    """``p`` as it acts on tensor dim ``d`` alone, moved to dim 0 of a 1-D tensor (else Replicate)."""
    if isinstance(p, _StridedShard) and p.dim % ndim == d:
        return _StridedShard(0, split_factor=p.split_factor)
    if isinstance(p, Shard) and p.dim % ndim == d:
        return Shard(0)
    return Replicate()


def reset_buffers(module: nn.Module) -> None:
    """Recompute every non-persistent buffer (RoPE tables) after materialization."""
    for sub in module.modules():
        if hasattr(sub, "reset_buffers") and sub is not module:
            sub.reset_buffers()
