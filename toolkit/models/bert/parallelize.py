"""The BERT family's tensor/sequence-parallel plan (BERT post-LN and Megatron-BERT/GatorTron pre-LN).

Megatron's layout, expressed as DTensor styles:

* word embedding: vocab-parallel (``RowwiseParallel`` on ``nn.Embedding`` → weight ``Shard(0)``);
  position and token-type tables whole on every rank;
* encoder layers exactly as GPT: ``q``/``k``/``v`` column-parallel (each rank keeps its heads; the
  ``[b, 1, 1, s]`` padding mask broadcasts over whichever heads a rank holds), ``out`` row-parallel,
  ``fc1`` column-, ``fc2`` row-parallel; norms whole on every rank;
* sequence parallel: hidden states between blocks are ``Shard(1)`` (sequence-sharded); the
  embedding LayerNorm (post-LN) already runs on the rank's sequence shard, pre-LN hands its
  embedding output over sharded; attention/MLP inputs are all-gathered, their outputs
  reduce-scattered; the final norm (pre-LN) and the MLM head's ``dense``/``norm`` run on the shard;
* MLM head: ``lm_head.dense`` and ``lm_head.norm`` whole on every rank, the norm's output gathered
  to a replicated DTensor; the projection is tied to the vocab-parallel word embedding and
  ``lm_head.bias`` [padded_vocab] is sharded the same way (``Shard(0)``), so the logits come out
  ``Shard(-1)`` over the vocabulary for ``loss_parallel`` (never gathered), padded columns at -inf;
* pooler and sentence-pair head: whole on every rank, on the first token of the (under sequence
  parallelism first gathered) hidden states.

Under sequence parallelism the ``"hidden"`` output of :class:`~toolkit.models.bert.BertModel` is the
rank's sequence shard.

Pipeline split (:func:`pipeline_split_bert`): contiguous layers per stage, the embedding on the
first, the final norm (pre-LN), pooler, sentence-pair head and MLM head on the last, with a synced
copy of the word embedding the MLM projection is tied to (as GPT's tied output layer). The plan
above covers any such stage: it names only the modules the stage holds.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ParallelStyle, PrepareModuleOutput, RowwiseParallel

from toolkit.models.common.parallelize import transformer_layers_plan
from toolkit.parallel.pipeline import module_tree_copy
from toolkit.parallel.tensor import ReplicatedParams, ShardedParams, apply_plan


def bert_tp_plan(model: nn.Module, *, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """Module-name patterns → styles for the modules this (possibly pipeline-split) model holds."""
    act = Shard(1) if sequence_parallel else Replicate()  # layout of hidden states between blocks
    plan: dict[str, ParallelStyle] = {}
    embed = model.embed
    if embed is not None:  # (on a last pipeline stage that is not first: only the tied word embedding)
        plan["embed.tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if embed is not None and embed.positions is not None:
        plan["embed.positions"] = ReplicatedParams()
        if embed.tokentypes is not None:
            plan["embed.tokentypes"] = ReplicatedParams()
        if embed.norm is not None:  # post-LN: the sum arrives replicated; normalize this rank's shard only
            plan["embed.norm"] = ReplicatedParams(input_layout=Replicate(), desired_input_layout=act)
        elif sequence_parallel:
            plan["embed"] = PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1),
                                                use_local_output=True)
    plan.update(transformer_layers_plan(model.layers, sequence_parallel=sequence_parallel))
    if model.final_norm is not None:  # pre-LN
        plan["final_norm"] = ReplicatedParams(input_layout=act)
    if model.lm_head is not None:
        plan["lm_head.dense"] = ReplicatedParams(input_layout=act)
        # replicated DTensor out: the tied projection with the vocab-parallel weight gives Shard(-1)
        plan["lm_head.norm"] = ReplicatedParams(input_layout=act, desired_output_layout=Replicate(),
                                                use_local_output=False)
        plan["lm_head"] = ShardedParams({"bias": Shard(0)})  # after its children: only its own bias
    if model.pooler is not None:
        plan["pooler"] = ReplicatedParams(input_layout=act, desired_input_layout=Replicate())
    if getattr(model, "classifier", None) is not None:  # a task head (BertForTask): whole on every rank, on
        # all positions (token classification: gathered under sequence parallelism) or on the pooler output
        plan["classifier"] = ReplicatedParams(input_layout=act if model.pooler is None else Replicate(),
                                              desired_input_layout=Replicate())
    if model.binary_head is not None:
        plan["binary_head"] = ReplicatedParams()
    return plan


def parallelize_bert(model: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool) -> nn.Module:
    """Shard ``model`` (built with ``tensor_parallel_size = tp``) over ``tp_mesh`` in place."""
    if model.lm_head is not None and model.embed is None:
        raise ValueError("the MLM head is tied to the word embedding: both must be on the same pipeline stage")
    return apply_plan(model, tp_mesh, bert_tp_plan(model, sequence_parallel=sequence_parallel))


def pipeline_split_bert(model: nn.Module, layer_ids: Sequence[str], *, first: bool, last: bool) -> nn.Module:
    """One pipeline stage of a BERT (on ``meta`` or materialized): the layers ``layer_ids`` (global indices), the
    embedding when ``first``; the final norm (pre-LN), pooler, sentence-pair head and MLM head when
    ``last``. The stage's forward returns tensors (``BertModel.pipeline_stage``); every stage gets the
    padding mask as a keyword argument (``toolkit.models.bert.objective.BERT_PIPELINE``).

    Tensors are shared with ``model``, not copied — except the word embedding on a last stage that is
    not also first: the MLM projection is tied to it, so that stage gets its own copy, still named
    ``embed.tokens.weight`` (position and token-type tables and the embedding norm stay on the first
    stage), which the pipeline keeps in sync with the first stage's by summing their gradients.
    """
    stage = module_tree_copy(model, keep_layers=layer_ids)
    stage.pipeline_stage = True
    stage.layers = nn.ModuleDict({i: stage.layers[i] for i in layer_ids})
    if not first:
        if last:
            stage.embed.positions = stage.embed.tokentypes = stage.embed.norm = None
            stage.embed.tokens.weight = nn.Parameter(model.embed.tokens.weight.detach().clone())
        else:
            stage.embed = None
    if not last:
        stage.final_norm = stage.pooler = stage.lm_head = stage.binary_head = None
    return stage
