"""The T5 family's tensor/sequence-parallel plan (v1.0 ReLU/tied and v1.1 gated-GELU/untied).

Megatron's layout, expressed as DTensor styles:

* the shared token embedding: vocab-parallel (``RowwiseParallel`` on ``nn.Embedding`` → weight
  ``Shard(0)``), for the encoder's and the decoder's inputs alike;
* self- and cross-attention ``q``/``k``/``v`` column-parallel (heads split), ``out`` row-parallel;
  cross-attention keys/values come from the whole (replicated) encoder output;
* relative position bias tables [buckets, heads] sharded over the heads (``Shard(1)``), so each rank
  builds the bias of exactly the heads it holds;
* MLP ``fc1`` (and ``gate``, v1.1) column-, ``fc2`` row-parallel; RMS norms whole on every rank;
* output layer (the tied embedding after the ``hidden_size ** -0.5`` rescale, v1.0, or ``head``,
  v1.1): column-parallel over the vocabulary, logits stay ``Shard(-1)`` for ``loss_parallel``;
* sequence parallel: each stack's hidden states are sequence-sharded (``Shard(1)``) from its first
  layer's input to its final norm (the embedding, its dropout and the attention masks, which need
  the whole sequence length, stay replicated); the encoder output is gathered for cross-attention
  and the decoder output for the output layer. Needs both ``model.seq_length`` and
  ``model.decoder_seq_length`` divisible by the tensor-parallel size.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, PrepareModuleInput, RowwiseParallel

from toolkit.parallel.tensor import ReplicatedParams, ShardedParams, apply_plan


def _stack_plan(stack: nn.Module, prefix: str, *, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    act = Shard(1) if sequence_parallel else Replicate()  # layout of hidden states between blocks
    plan: dict[str, ParallelStyle] = {}
    if not len(stack.layers):
        return plan
    layers = f"{prefix}.layers.*"
    blocks = ("attn", "cross_attn", "mlp") if stack.decoder else ("attn", "mlp")
    if sequence_parallel:  # whole-sequence embeddings → this rank's sequence shard
        plan[f"{prefix}.layers.0"] = PrepareModuleInput(input_layouts=(Replicate(),),
                                                        desired_input_layouts=(Shard(1),), use_local_output=True)
    for block in blocks:
        plan[f"{layers}.{block}_norm"] = ReplicatedParams(input_layout=act)
        if sequence_parallel:
            plan[f"{layers}.{block}"] = PrepareModuleInput(input_layouts=(Shard(1),),
                                                           desired_input_layouts=(Replicate(),), use_local_output=True)
    for attn in blocks[:-1]:
        for proj in ("q", "k", "v"):
            plan[f"{layers}.{attn}.{proj}"] = ColwiseParallel()
        plan[f"{layers}.{attn}.out"] = RowwiseParallel(output_layouts=act)
    plan[f"{layers}.mlp.fc1"] = ColwiseParallel()
    if next(iter(stack.layers.values())).mlp.gate is not None:
        plan[f"{layers}.mlp.gate"] = ColwiseParallel()
    plan[f"{layers}.mlp.fc2"] = RowwiseParallel(output_layouts=act)
    if stack.layers["0"].relative_bias is not None:
        plan[f"{prefix}.layers.0.relative_bias"] = ShardedParams({"weight": Shard(1)})  # [buckets, heads]
    # the encoder's output is read whole by every cross-attention; the decoder's goes to the output
    # layer as a replicated DTensor so that layer yields Shard(-1) logits
    plan[f"{prefix}.final_norm"] = ReplicatedParams(input_layout=act, desired_output_layout=Replicate(),
                                                    use_local_output=not stack.decoder)
    return plan


def t5_tp_plan(model: nn.Module, *, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """Module-name patterns → styles for every module of ``model``."""
    plan: dict[str, ParallelStyle] = {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        **_stack_plan(model.encoder, "encoder", sequence_parallel=sequence_parallel),
        **_stack_plan(model.decoder, "decoder", sequence_parallel=sequence_parallel),
    }
    if model.head is not None:  # v1.1; v1.0 projects with the (vocab-parallel) shared embedding
        plan["head"] = ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False)
    return plan


def parallelize_t5(model: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool) -> nn.Module:
    """Shard ``model`` (built with ``tensor_parallel_size = tp``) over ``tp_mesh`` in place."""
    return apply_plan(model, tp_mesh, t5_tp_plan(model, sequence_parallel=sequence_parallel))
