"""Tensor and sequence parallelism helpers, generic over model families.

A family describes its plan as ``{module name (fnmatch pattern): ParallelStyle}`` (see
``toolkit/models/gpt/parallelize.py``); :func:`apply_plan` applies it with DTensor's
``parallelize_module``. Styles used across families:

* ``ColwiseParallel`` / ``RowwiseParallel`` for attention q/k/v/out (self or cross) and MLP linears;
* :class:`ReplicatedParams` for modules whose weights stay whole on every tp rank (norms, learned
  position tables): inputs/outputs are sharded along the sequence (sequence parallel) or replicated;
* ``PrepareModuleInput`` to all-gather a sequence-sharded hidden state before attention/MLP.

Every parameter becomes a DTensor on the tp mesh, so optimizers, FSDP2 on top, grad-norm clipping
and DCP checkpoints see one uniform kind of tensor. Plans are applied to the ``meta`` model (sharded
initialization, ``toolkit.models.build``): no weight is sent, each rank slices locally.
"""

from __future__ import annotations

import contextlib
import fnmatch
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle, loss_parallel, parallelize_module


class ReplicatedParams(ParallelStyle):
    """Keep a module's parameters whole (``Replicate``) on every tp rank.

    ``input_layout``/``output_layout``: how the module's first input/its output lie across the tp
    ranks (``Shard(1)`` along the sequence under sequence parallelism, ``Replicate()`` otherwise).
    With ``desired_input_layout`` the input is redistributed before the module runs (e.g. a
    replicated hidden state → sequence-sharded, or sequence-sharded → replicated before a pooler
    that reads the first token); ``output_layout`` then defaults to it. With
    ``desired_output_layout`` the output is redistributed (e.g. sequence-sharded → replicated
    before the output layer). Outputs are plain local tensors unless ``use_local_output=False``.
    """

    def __init__(self, *, input_layout: Placement = Replicate(), output_layout: Placement | None = None,
                 desired_output_layout: Placement | None = None, use_local_output: bool = True,
                 desired_input_layout: Placement | None = None):
        super().__init__()
        self.input_layout = input_layout
        self.desired_input_layout = desired_input_layout or input_layout
        self.output_layout = output_layout or self.desired_input_layout
        self.desired_output_layout = desired_output_layout or self.output_layout
        self.use_local_output = use_local_output

    def _partition(self, name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        for pname, param in list(module.named_parameters(recurse=False)):
            if not isinstance(param, DTensor):
                dt = distribute_tensor(param.data, mesh, [Replicate()], src_data_rank=None)
                module.register_parameter(pname, nn.Parameter(dt, requires_grad=param.requires_grad))

    def _input(self, module: nn.Module, inputs: Any, mesh: DeviceMesh) -> Any:
        first, *rest = inputs
        if not isinstance(first, DTensor):
            first = DTensor.from_local(first, mesh, [self.input_layout], run_check=False)
        if first.placements != (self.desired_input_layout,):
            first = first.redistribute(placements=[self.desired_input_layout])
        return (first, *rest)

    def _output(self, module: nn.Module, output: Any, mesh: DeviceMesh) -> Any:
        if not isinstance(output, DTensor):
            output = DTensor.from_local(output, mesh, [self.output_layout], run_check=False)
        if output.placements != (self.desired_output_layout,):
            output = output.redistribute(placements=[self.desired_output_layout])
        return output.to_local() if self.use_local_output else output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, self._partition, self._input, self._output)


class ShardedParams(ParallelStyle):
    """Place a module's own parameters by name (``{"bias": Shard(0)}``), the rest ``Replicate``; no hooks.

    For parameters a module uses directly rather than through a child ``nn.Linear``/``nn.Embedding``:
    the vocab-parallel bias of a tied output layer (sharded like the word embedding it is added to),
    or a per-head table sharded over the heads. Inputs and outputs are left as they are.
    """

    def __init__(self, placements: dict[str, Placement]):
        super().__init__()
        self.placements = dict(placements)

    def _partition(self, name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        if name:  # children: give them their own plan entries, listed before this one
            return
        missing = set(self.placements) - {n for n, _ in module.named_parameters(recurse=False)}
        if missing:
            raise ValueError(f"{type(module).__name__} has no parameter {sorted(missing)[0]!r} to shard")
        for pname, param in list(module.named_parameters(recurse=False)):
            if not isinstance(param, DTensor):
                dt = distribute_tensor(param.data, mesh, [self.placements.get(pname, Replicate())],
                                       src_data_rank=None)
                module.register_parameter(pname, nn.Parameter(dt, requires_grad=param.requires_grad))

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, self._partition)


def apply_plan(model: nn.Module, tp_mesh: DeviceMesh, plan: dict[str, ParallelStyle]) -> nn.Module:
    """Apply ``plan`` (fnmatch patterns over module names → style) to ``model`` in place.

    Patterns that match nothing are an error (a renamed module must not silently stay unsharded).
    Every rank slices its shard locally (``src_data_rank=None``): the model is either still on
    ``meta`` (initialized after the plan, keyed by parameter name) or initialized identically on
    every rank, so no weight needs to be sent.
    """
    names = [n for n, _ in model.named_modules() if n]
    resolved: dict[str, ParallelStyle] = {}
    for pattern, style in plan.items():
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"tensor-parallel plan entry {pattern!r} matches no module of {type(model).__name__}")
        style.src_data_rank = None
        for n in hits:
            resolved.setdefault(n, style)
    for n, style in list(resolved.items()):  # a module may adapt its style (LoRA linears split their adapters)
        adapt = getattr(model.get_submodule(n), "tensor_parallel_style", None)
        if adapt is not None:
            resolved[n] = adapt(style)
    parallelize_module(model, tp_mesh, resolved)
    replicate_remaining(model, tp_mesh)
    return model


def replicate_remaining(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Fail loudly if a parameter was left as a plain tensor (every one must be covered by the plan)."""
    plain = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    if plain:
        raise ValueError(f"tensor-parallel plan leaves parameters unsharded and unreplicated: {plain[:4]}")


def mask_vocab_columns(logits: DTensor, vocab_size: int) -> DTensor:
    """Set logits of padded vocabulary ids to -inf on a DTensor sharded (or not) on its last dim."""
    mesh = logits.device_mesh
    local = logits.to_local()
    start = 0
    placement = logits.placements[0]
    if isinstance(placement, Shard) and placement.dim in (-1, logits.ndim - 1):
        start = mesh.get_local_rank(0) * local.shape[-1]  # padded vocab divides evenly by tp
    pad = torch.arange(start, start + local.shape[-1], device=local.device) >= vocab_size
    masked = local.masked_fill(pad, float("-inf"))
    return DTensor.from_local(masked, mesh, logits.placements, run_check=False, shape=logits.shape,
                              stride=logits.stride())


def loss_context(enabled: bool) -> contextlib.AbstractContextManager:
    """``loss_parallel()`` (vocab-parallel cross-entropy on Shard(-1) logits) when tp > 1."""
    return loss_parallel() if enabled else contextlib.nullcontext()


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (replicated) DTensor scalar such as a vocab-parallel loss."""
    return t.full_tensor() if isinstance(t, DTensor) else t
