"""The tensor/sequence-parallel plan of the shared :class:`~toolkit.models.common.TransformerLayer`
(Megatron's layout as DTensor styles), used by the GPT and BERT family plans.

* attention ``q``/``k``/``v`` column-parallel (heads split; GQA key/value heads split the same
  way), ``out`` row-parallel; MLP ``fc1`` (and ``gate``) column-, ``fc2`` row-parallel;
* ``attn_norm``/``mlp_norm`` whole on every rank; under sequence parallelism they work on
  ``Shard(1)`` (sequence-sharded) hidden states and the attention/MLP inputs are all-gathered first.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, PrepareModuleInput, RowwiseParallel

from toolkit.parallel.tensor import ReplicatedParams


def transformer_layers_plan(layers: nn.ModuleDict, prefix: str = "layers", *,
                            sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """Styles for every layer of ``layers`` (the module at ``prefix``); empty when it holds none
    (a pipeline stage without layers). Hidden states between layers are ``Shard(1)`` under sequence
    parallelism, else replicated."""
    if not len(layers):
        return {}
    act = Shard(1) if sequence_parallel else Replicate()
    each = f"{prefix}.*"
    plan: dict[str, ParallelStyle] = {f"{each}.attn_norm": ReplicatedParams(input_layout=act),
                                      f"{each}.mlp_norm": ReplicatedParams(input_layout=act)}
    if sequence_parallel:
        for block in ("attn", "mlp"):
            plan[f"{each}.{block}"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                                         use_local_output=True)
    for proj in ("q", "k", "v"):
        plan[f"{each}.attn.{proj}"] = ColwiseParallel()
    plan[f"{each}.attn.out"] = RowwiseParallel(output_layouts=act)
    plan[f"{each}.mlp.fc1"] = ColwiseParallel()
    if next(iter(layers.values())).mlp.gate is not None:
        plan[f"{each}.mlp.gate"] = ColwiseParallel()
    plan[f"{each}.mlp.fc2"] = RowwiseParallel(output_layouts=act)
    return plan
