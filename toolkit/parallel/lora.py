"""Tensor-parallel styles of LoRA linears (a base ``nn.Linear`` with ``lora_A``/``lora_B`` children).

The adapters are split to match their base layer, as Megatron-core/NeMo's LoRA does, so a LoRA
layer costs no communication beyond its base's:

* column-parallel base (weight ``Shard(0)``, output features split): ``lora_A`` [r, in] is
  replicated, ``lora_B`` [out, r] is ``Shard(0)`` like the base weight — ``B(A x)`` comes out split
  on the features exactly as ``W x`` does;
* row-parallel base (weight ``Shard(1)``, input features split): ``lora_A`` [r, in] is ``Shard(1)``
  and ``lora_B`` [out, r] replicated — ``A x`` is a partial sum over the input shards, reduced with
  the base output by the same all-reduce (or reduce-scatter under sequence parallelism).

The styles are DTensor's ``ColwiseParallel``/``RowwiseParallel`` (their input/output handling is
kept) with their own parameter placement; ``peft``'s LoRA layers wrap the base module instead
(``base_layer``), which DTensor's styles cannot shard, so megaforge's own LoRA linear is used under
tensor parallelism (and everywhere: one code path, checked against ``peft``'s numbers in the tests).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel


def _place(module: nn.Module, mesh, placements: dict[str, Placement], src_data_rank) -> None:
    for pname, param in list(module.named_parameters(recurse=False)):
        dt = distribute_tensor(param, mesh, [placements.get(pname, Replicate())], src_data_rank=src_data_rank)
        module.register_parameter(pname, nn.Parameter(dt, requires_grad=param.requires_grad))


class LoRAColwiseParallel(ColwiseParallel):
    """``ColwiseParallel`` for a LoRA linear: base and ``lora_B`` ``Shard(0)``, ``lora_A`` replicated."""

    def _partition_linear_fn(self, name, module, device_mesh):
        if name == "":
            _place(module, device_mesh, {"weight": Shard(0), "bias": Shard(0)}, self.src_data_rank)
        elif name == "lora_B":
            _place(module, device_mesh, {"weight": Shard(0)}, self.src_data_rank)
        elif name == "lora_A":
            _place(module, device_mesh, {}, self.src_data_rank)


class LoRARowwiseParallel(RowwiseParallel):
    """``RowwiseParallel`` for a LoRA linear: base weight and ``lora_A`` ``Shard(1)``, the rest replicated."""

    def _partition_linear_fn(self, name, module, device_mesh):
        if name == "":
            _place(module, device_mesh, {"weight": Shard(1)}, self.src_data_rank)
        elif name == "lora_A":
            _place(module, device_mesh, {"weight": Shard(1)}, self.src_data_rank)
        elif name == "lora_B":
            _place(module, device_mesh, {}, self.src_data_rank)


def lora_style(style: ParallelStyle) -> ParallelStyle:
    """The LoRA counterpart of the style a plan gives a linear (same input/output layouts)."""
    for base, lora in ((ColwiseParallel, LoRAColwiseParallel), (RowwiseParallel, LoRARowwiseParallel)):
        if type(style) is base:
            new = lora.__new__(lora)
            new.__dict__.update(style.__dict__)
            return new
    raise ValueError(f"a LoRA linear cannot be parallelized with {type(style).__name__}; only Colwise/RowwiseParallel")
