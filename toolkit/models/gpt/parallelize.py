"""The GPT family's tensor/sequence-parallel plan (Megatron's layout, expressed as DTensor styles).

* word embedding: vocab-parallel (``RowwiseParallel`` on ``nn.Embedding`` → weight ``Shard(0)``);
* attention ``q``/``k``/``v``: column-parallel (heads split; GQA key/value heads split the same way),
  ``out``: row-parallel; MLP ``fc1``/``gate`` column-, ``fc2`` row-parallel (the layers' part of the
  plan is shared with BERT: ``toolkit.models.common.parallelize``);
* norms and learned positions: whole on every rank; under sequence parallelism they work on
  ``Shard(1)`` (sequence-sharded) activations, and attention/MLP inputs are all-gathered first;
* output layer (``head``, or the tied word embedding): column-parallel over the vocabulary, logits
  stay ``Shard(-1)`` DTensors for ``loss_parallel`` (vocab-parallel cross-entropy, no gather).

Pipeline split (:func:`pipeline_split_gpt`): contiguous layers per stage, embedding on the first,
final norm + output layer on the last (with a synced copy of a tied word embedding).
"""

from __future__ import annotations

from typing import Sequence

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, PrepareModuleOutput, RowwiseParallel

from toolkit.models.common.parallelize import transformer_layers_plan
from toolkit.parallel.pipeline import module_tree_copy
from toolkit.parallel.tensor import ReplicatedParams, apply_plan


def gpt_tp_plan(model: nn.Module, *, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """Module-name patterns → styles for the modules this (possibly pipeline-split) model holds."""
    act = Shard(1) if sequence_parallel else Replicate()  # layout of hidden states between blocks
    plan: dict[str, ParallelStyle] = {}
    if model.embed is not None:
        plan["embed.tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
        if model.embed.positions is not None:
            plan["embed.positions"] = ReplicatedParams()
        if sequence_parallel:
            plan["embed"] = PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1),
                                                use_local_output=True)
    plan.update(transformer_layers_plan(model.layers, sequence_parallel=sequence_parallel))
    if model.final_norm is not None:
        # replicated DTensor out: the (tied or not) output layer then yields Shard(-1) logits
        plan["final_norm"] = ReplicatedParams(input_layout=act, desired_output_layout=Replicate(),
                                              use_local_output=False)
        if model.head is not None:
            plan["head"] = ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1),
                                           use_local_output=False)
    return plan


def parallelize_gpt(model: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool) -> nn.Module:
    """Shard ``model`` (built with ``tensor_parallel_size = tp``) over ``tp_mesh`` in place."""
    if model.tied and model.embed is None and model.final_norm is not None:
        raise ValueError("tied output weights need the embedding on the same pipeline stage")
    model.sequence_shards = tp_mesh.size() if sequence_parallel else 1
    return apply_plan(model, tp_mesh, gpt_tp_plan(model, sequence_parallel=sequence_parallel))


def pipeline_split_gpt(model: nn.Module, layer_ids: Sequence[str], *, first: bool, last: bool) -> nn.Module:
    """One pipeline stage of a GPT (on ``meta`` or materialized): the layers ``layer_ids`` (global indices), the
    embedding when ``first``, the final norm and output layer when ``last``.

    Tensors are shared with ``model``, not copied — except a tied word embedding on a last stage that
    is not also first: that stage gets its own copy, still named ``embed.tokens.weight`` (its
    position table stays on the first stage), which the pipeline keeps in sync with the first
    stage's by summing their gradients (Megatron's tied embeddings across stages).
    """
    stage = module_tree_copy(model, keep_layers=layer_ids)
    stage.layers = nn.ModuleDict({i: stage.layers[i] for i in layer_ids})
    if not first:
        if last and stage.tied:
            stage.embed.positions = None
            stage.embed.tokens.weight = nn.Parameter(model.embed.tokens.weight.detach().clone())
        else:
            stage.embed = None
    if not last:
        stage.final_norm = None
        stage.head = None
    return stage
