"""Memory per GPU of one layout: parameters per rank, weights, gradients, optimizer state,
activations of the micro-batches in flight, and temporary buffers.

The figures follow what megaforge allocates (measured with PyTorch's ``MemTracker`` in
``tests/planning``), in the spirit of Korthikanti et al. 2022 ("Reducing Activation Recomputation
in Large Transformer Models"), whose Megatron layer keeps ``s·b·h·(34 + 5·a·s/h)`` bytes:

* parameters are fp32 masters (4 bytes), gradients fp32 (4), AdamW's two moments fp32 (8); the
  fused AdamW step (``optim.implementation`` auto or fused) works in place, the foreach one needs
  one more fp32 copy of the parameters it updates (4);
* under bf16/fp16 autocast the residual stream and norm inputs stay fp32, linear inputs and outputs
  are 2-byte, and the 2-byte copies of the weights autocast makes are kept for backward;
* attention runs in a fused kernel (flash / memory-efficient ``scaled_dot_product_attention``), so
  no ``s × s`` score matrix is kept — Korthikanti's ``5·a·s/h`` term is gone, as with selective
  recompute in Megatron;
* sequence parallelism divides the norm/dropout region by ``tp``; ``selective`` recompute keeps the
  layer input and the matmul outputs; ``full`` keeps only the layer input (fp32, ``4·s·b·h``);
* the logits' gradients take 8 bytes per logit (fp32 and compute dtype), 12 under tensor
  parallelism (``loss_parallel``'s backward holds three fp32 buffers); FSDP2 ``full`` gathers
  layers for backward after those are freed (the larger of the two transients counts); a pipeline
  stage keeps each in-flight micro-batch's output hidden states until its backward — all three
  measured on rank 0 of tp2 / dp2 / pp2 layouts under the fake process group (``tests/planning``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from toolkit.config import RunConfig, ffn_size, head_dim, padded_vocab_size
from toolkit.errors import ConfigError
from toolkit.models.common.fused_loss import CHUNK_ELEMENTS
from toolkit.planning.layout import Layout

GiB = 2**30
MASTER_BYTES = 4  # fp32 parameter
GRAD_BYTES = 4  # fp32 gradient
ADAM_BYTES = 8  # exp_avg + exp_avg_sq, fp32
FOREACH_TEMP_BYTES = 4  # foreach AdamW's intermediate (one fp32 tensor per parameter); fused: none
SUPPORTED_FAMILIES = ("gpt", "bert")


@dataclass(frozen=True)
class Shape:
    """The sizes of a model that memory and FLOPs depend on."""

    family: str  # gpt | bert
    layers: int  # transformer layers
    hidden: int  # h
    heads: int  # query heads a
    groups: int  # key/value heads g
    head_dim: int  # d
    ffn: int  # MLP inner width f
    gated: bool  # SwiGLU/GeGLU (fc1 and gate)
    rms: bool  # RMSNorm (weight only) instead of LayerNorm
    bias: bool  # biases in attention and MLP linears
    seq: int  # s
    vocab: int  # true vocabulary
    divisible_by: int  # make_vocab_size_divisible_by
    positions: int  # learned position rows (0 without)
    tied: bool  # output layer tied to the word embedding
    tokentypes: int  # BERT token-type rows
    post_ln: bool  # BERT post-LN (embedding norm, no final norm)
    binary_head: bool  # BERT pooler + sentence-pair head
    hidden_dropout: bool  # dropout masks on the residual branches
    fused_qkv: bool = False  # model.fused_qkv: q, k, v as one matmul

    @classmethod
    def of(cls, cfg: RunConfig) -> "Shape":
        m = cfg.model
        if m.family not in SUPPORTED_FAMILIES:
            raise ConfigError(f"megaforge plan models {' and '.join(SUPPORTED_FAMILIES)} families; model.family="
                              f"{m.family} is not modelled yet")
        if m.vocab_size is None:
            raise ConfigError(f"{cfg.name}: model.vocab_size is unset (it comes from the tokenizer at train time); "
                              "give it as an override, e.g. model.vocab_size=50257")
        learned = m.family == "bert" or m.position_embedding_type == "learned_absolute"
        return cls(family=m.family, layers=m.num_layers, hidden=m.hidden_size, heads=m.num_attention_heads,
                   groups=m.num_query_groups or m.num_attention_heads, head_dim=head_dim(m), ffn=ffn_size(m),
                   gated=m.activation in ("swiglu", "geglu"), rms=m.normalization == "RMSNorm",
                   bias=m.add_bias_linear, seq=m.seq_length, vocab=m.vocab_size,
                   divisible_by=m.make_vocab_size_divisible_by,
                   positions=(m.max_position_embeddings or m.seq_length) if learned else 0,
                   tied=m.family == "bert" or m.share_embeddings_and_output_weights,
                   tokentypes=m.num_tokentypes if m.family == "bert" else 0,
                   post_ln=m.family == "bert" and m.layernorm_position == "post",
                   binary_head=m.family == "bert" and m.bert_binary_head, hidden_dropout=m.hidden_dropout > 0,
                   fused_qkv=m.fused_qkv)

    def padded_vocab(self, tp: int) -> int:
        return padded_vocab_size(self.vocab, self.divisible_by, tp)

    @property
    def norm_params(self) -> int:
        return self.hidden if self.rms else 2 * self.hidden


# ---- parameters -------------------------------------------------------------------------------
def layer_matrix_params(sh: Shape, tp: int) -> int:
    """Weight-matrix elements of one transformer layer on one tensor-parallel rank."""
    q, kv, f = sh.heads * sh.head_dim, sh.groups * sh.head_dim, sh.ffn
    return (sh.hidden * (q + 2 * kv) + q * sh.hidden + (3 if sh.gated else 2) * sh.hidden * f) // tp


def layer_params(sh: Shape, tp: int) -> int:
    """All parameters of one transformer layer on one tensor-parallel rank: sharded matrices and
    column-parallel biases, replicated row-parallel biases and norms."""
    q, kv, f = sh.heads * sh.head_dim, sh.groups * sh.head_dim, sh.ffn
    sharded_bias = (q + 2 * kv + (2 if sh.gated else 1) * f) // tp if sh.bias else 0
    replicated = (2 * sh.hidden if sh.bias else 0) + 2 * sh.norm_params
    return layer_matrix_params(sh, tp) + sharded_bias + replicated


@dataclass(frozen=True)
class StageParams:
    """Parameters held by one pipeline rank on one tensor-parallel rank."""

    layers: int  # transformer layers on the rank (all its virtual chunks)
    layer_params: int  # their parameters
    other: int  # embeddings, final norm, output layer, BERT heads held by the rank
    head_matrix: int  # elements of the output projection used on this rank (a cast copy under autocast)

    @property
    def total(self) -> int:
        return self.layer_params + self.other


def embedding_params(sh: Shape, tp: int) -> int:
    """Word (vocabulary-parallel), position and token-type embeddings, and BERT's post-LN norm."""
    return (sh.padded_vocab(tp) * sh.hidden // tp + sh.positions * sh.hidden + sh.tokentypes * sh.hidden
            + (sh.norm_params if sh.post_ln else 0))


def head_params(sh: Shape, tp: int, *, holds_embedding: bool) -> int:
    """Final norm and output layer (GPT), or the BERT heads; a tied word embedding is counted by the
    embedding unless the last stage is another rank (then it holds its own copy)."""
    h = sh.hidden
    n = 0 if sh.post_ln else sh.norm_params  # final norm (pre-LN)
    if not sh.tied or not holds_embedding:
        n += sh.padded_vocab(tp) * h // tp
    if sh.family == "bert":
        n += h * h + h + sh.norm_params + sh.padded_vocab(tp) // tp  # lm_head dense, norm, bias
        if sh.binary_head:
            n += h * h + h + 2 * h + 2  # pooler, sentence-pair head
    return n


def stage_params(sh: Shape, layout: Layout, *, first: bool, last: bool) -> StageParams:
    """Parameters of the first or last pipeline rank (both when ``pp == 1``)."""
    tp = layout.tp
    n_layers = sh.layers // layout.pp
    other = (embedding_params(sh, tp) if first else 0) + (head_params(sh, tp, holds_embedding=first) if last else 0)
    head = sh.padded_vocab(tp) * sh.hidden // tp if last else 0
    return StageParams(layers=n_layers, layer_params=n_layers * layer_params(sh, tp), other=other, head_matrix=head)


def total_params(sh: Shape) -> int:
    """Parameters of the whole model (one copy, unpadded by tensor parallelism: tp = 1)."""
    return sh.layers * layer_params(sh, 1) + embedding_params(sh, 1) + head_params(sh, 1, holds_embedding=True)


# ---- activations ------------------------------------------------------------------------------
def layer_activation_bytes_per_token(sh: Shape, layout: Layout, precision: str, recompute: str | None = None) -> float:
    """Bytes one transformer layer keeps for backward, per token of a micro-batch, on one rank.

    ``c`` is the compute dtype's size (2 under autocast, 4 in fp32); fp32 tensors are the residual
    stream and norm inputs. With sequence parallelism the norm region is divided by ``tp``; the
    inputs of the column-parallel linears are gathered (full length) and kept as gathered."""
    recompute = recompute or layout.recompute
    t, h, f = layout.tp, sh.hidden, sh.ffn
    c = 4 if precision == "fp32" else 2
    q, kv = sh.heads * sh.head_dim, sh.groups * sh.head_dim
    norm_div = t if layout.sp else 1
    if recompute == "full":
        return 4 * h / norm_div  # the layer input only
    n_mlp_in = 2 if sh.gated else 1
    if recompute == "selective":  # layer input + outputs of every matmul (row-parallel ones before the reduce)
        return 4 * h / norm_div + c * (q + 2 * kv + n_mlp_in * f) / t + 2 * c * h
    # residual-branch dropout keeps a bool mask per element (CUDA and CPU kernels; FakeTensorMode's
    # decomposition keeps it in the input dtype, 2 bytes)
    norm_region = 2 * 4 * h + (2 * 4 * h if sh.rms else 0) + (2 * h if sh.hidden_dropout else 0)
    if c == 2 or layout.sp:  # each linear keeps its own (cast or gathered) copy of its input; fused q, k, v
        # (model.fused_qkv) are one linear
        linear_inputs = ((1 if sh.fused_qkv else 3) + n_mlp_in) * c * h
    else:  # fp32 without SP: the norm output is shared by the linears that read it
        linear_inputs = 2 * 4 * h
    attention = c * (2 * q + 2 * kv) / t + 4 * sh.heads / t  # q, k, v, output; softmax statistics (fp32)
    mlp = (4 if sh.gated else 2) * c * f / t  # gelu: fc1 out, act out; gated: gate, act, fc1, product
    return norm_region / norm_div + linear_inputs + attention + mlp


def in_flight_layers(sh: Shape, layout: Layout, *, rank: int) -> float:
    """Layer-micro-batches whose activations pipeline rank ``rank`` holds at its peak: 1F1B keeps
    ``pp - rank`` micro-batches of its layers; interleaved 1F1B keeps Megatron's warm-up count of
    chunks, ``2·(pp - rank - 1) + (vpp - 1)·pp + 1`` (on the first rank ``pp·(1 + (pp-1)/(pp·vpp))``
    micro-batches, Narayanan et al. 2021); never more than the step's micro-batches."""
    pp, vpp, m = layout.pp, layout.vpp, layout.num_microbatches
    per_chunk = sh.layers / (pp * vpp)
    if pp == 1:
        return sh.layers
    chunks = (2 * (pp - rank - 1) + (vpp - 1) * pp + 1) if vpp > 1 else (pp - rank)
    return per_chunk * min(chunks, m * vpp)


@dataclass
class Memory:
    """Bytes per GPU on the fuller pipeline rank, by category."""

    weights: float  # fp32 parameters held during forward/backward (FSDP-unsharded where they are)
    grads: float  # fp32 gradients (sharded by optimizer_and_grads and full)
    optimizer: float  # AdamW moments (sharded unless sharding=none)
    activations: float  # kept for backward: layers × in-flight micro-batches, plus the loss's logits
    weight_casts: float  # 2-byte copies of the weights autocast keeps for backward (0 with recompute)
    temporary: float  # backward's peak transients: logits gradients, a recomputed layer, FSDP gathers
    optimizer_temporary: float  # foreach AdamW's fp32 intermediate during the step (0 with fused)
    weights_at_rest: float  # parameters between steps (sharded)
    rank: str  # which pipeline rank is the fuller: first | last | only
    details: dict = field(default_factory=dict)  # arithmetic for --explain

    @property
    def forward_backward_peak(self) -> float:
        return self.weights + self.grads_during_backward + self.optimizer + self.activations + self.weight_casts \
            + self.temporary

    @property
    def step_peak(self) -> float:
        return self.weights_at_rest + self.grads + self.optimizer + self.optimizer_temporary

    @property
    def peak(self) -> float:
        return max(self.forward_backward_peak, self.step_peak)

    grads_during_backward: float = 0.0  # gradients already accumulated while a later micro-batch runs


def memory(cfg: RunConfig, layout: Layout) -> Memory:
    """The memory of ``layout`` on its fuller pipeline rank (first or last)."""
    sh = Shape.of(cfg)
    ranks = [("only", True, True, 0)] if layout.pp == 1 else [("first", True, False, 0),
                                                              ("last", False, True, layout.pp - 1)]
    return max((_rank_memory(cfg, sh, layout, name, first=f, last=la, rank=r) for name, f, la, r in ranks),
               key=lambda mem: mem.peak)


def _rank_memory(cfg: RunConfig, sh: Shape, layout: Layout, name: str, *, first: bool, last: bool,
                 rank: int) -> Memory:
    precision = cfg.trainer.precision
    t, dp = layout.tp, layout.dp
    c = 4 if precision == "fp32" else 2
    tokens = sh.seq * layout.micro_batch  # per micro-batch
    params = stage_params(sh, layout, first=first, last=last)
    p = params.total
    sharded = dp > 1 and layout.sharding != "none"
    shard = dp if sharded else 1
    weights_at_rest = MASTER_BYTES * p / shard
    gathered = 0.0
    if sharded and layout.sharding == "optimizer_and_grads":
        weights = weights_at_rest + MASTER_BYTES * p  # kept unsharded from forward to the end of backward
    else:
        weights = weights_at_rest
        if sharded:  # full: a layer gathered while the next is prefetched
            gathered = 2 * MASTER_BYTES * layer_params(sh, t)
    grads = GRAD_BYTES * p / shard
    optimizer = ADAM_BYTES * p / shard
    opt_temp = FOREACH_TEMP_BYTES * p / shard if cfg.optim.implementation == "foreach" else 0.0

    per_layer = layer_activation_bytes_per_token(sh, layout, precision)
    layers_held = in_flight_layers(sh, layout, rank=rank)
    acts = per_layer * tokens * layers_held
    norm_div = t if layout.sp else 1
    vocab_local = sh.padded_vocab(t) / t
    if first and sh.hidden_dropout:  # the embedding dropout's mask
        acts += tokens * sh.hidden / norm_div
    if layout.pp > 1:  # the pipeline keeps each in-flight chunk's output (fp32 hidden states) until its
        # backward; the last rank's last chunk outputs the loss instead
        chunks_held = layers_held * layout.pp * layout.vpp / sh.layers
        acts += 4 * sh.hidden * tokens / norm_div * max(chunks_held - (1 if last else 0), 0)
    # model.fused_cross_entropy (the whole vocabulary on one rank: no tp; a pipeline's last stage too,
    # unless FSDP full sharding reshards its output weight after forward)
    fused_ce = (cfg.model.fused_cross_entropy and sh.family == "gpt" and t == 1
                and not (layout.pp > 1 and layout.dp > 1 and layout.sharding == "full"))
    chunk = min(tokens, max(1, CHUNK_ELEMENTS // sh.padded_vocab(t)))  # tokens per fused chunk
    if last and fused_ce:  # final norm input (+ RMSNorm's copy); the fused loss keeps the gradients it made:
        # the hidden states' (fp32) and the output weight's (fp32 [vocab, hidden])
        acts += tokens * (4 * sh.hidden * (2 if sh.rms else 1) + 4 * sh.hidden) + 4 * vocab_local * sh.hidden
    elif last:  # final norm input (+ RMSNorm's normalized copy), the head's input, the fp32 log-softmax
        acts += tokens * (4 * sh.hidden * (2 if sh.rms else 1) / norm_div + c * sh.hidden + 4 * vocab_local)
        if sh.family == "bert":  # MLM transform: dense input and output, GELU output, its norm's fp32 input
            acts += tokens * sh.hidden * (4 * c + (4 if c == 2 else 0))
    casts = 0.0
    if precision == "fp32" and sh.fused_qkv and layout.recompute == "none":
        # fused q, k, v keep their concatenated fp32 weight (this rank's columns) for backward (under
        # autocast: its cast, as below)
        casts = 4 * params.layers * sh.hidden * (sh.heads + 2 * sh.groups) * sh.head_dim / t
    if precision != "fp32":  # recomputed layers cast their weights again in backward; the head is not recomputed
        casts = c * ((params.layers * layer_matrix_params(sh, t) if layout.recompute == "none" else 0)
                     + (0 if fused_ce else params.head_matrix))  # the fused loss drops its cast after forward
    temp = 0.0
    if last and fused_ce:  # while the loss runs: the weight's cast and its gradient's per-chunk product
        # (compute dtype + fp32), one chunk's logits (compute dtype, fp32) and their gradient (compute dtype)
        temp += (2 * c + 4) * vocab_local * sh.hidden + (4 + 2 * c) * chunk * vocab_local
    elif last:  # gradients of the logits (fp32 and compute dtype); the vocabulary-parallel cross-entropy
        # backward (loss_parallel, tp > 1) holds two more fp32 buffers (one-hot mask, exp) at once
        temp += (12 if t > 1 else 8) * vocab_local * tokens
    # FSDP gathers layers only once the logits' gradients are freed (measured): the larger of the two
    temp = max(temp, gathered)
    if layout.recompute != "none":  # one layer recomputed in full, and its weight casts
        temp += layer_activation_bytes_per_token(sh, layout, precision, "none") * tokens
        temp += c * layer_matrix_params(sh, t) if precision != "fp32" else 0
    mem = Memory(weights=weights, grads=grads, optimizer=optimizer, activations=acts, weight_casts=casts,
                 temporary=temp, optimizer_temporary=opt_temp, weights_at_rest=weights_at_rest, rank=name,
                 details={"params_on_rank": p, "layers_on_rank": params.layers, "layer_bytes_per_token": per_layer,
                          "tokens_per_microbatch": tokens, "layer_microbatches_in_flight": layers_held,
                          "data_parallel_shards": shard})
    # with several micro-batches per step the gradients of earlier ones are held during later ones
    mem.grads_during_backward = grads if layout.num_microbatches > 1 else 0.0
    return mem
