"""Step time and MFU of one layout: FLOPs over an achievable fraction of peak, the pipeline bubble,
and communication volume over the GPU's links (nothing assumed overlapped, so the estimate is a
conservative one).

* FLOPs per token: ``6·N + 12·L·h·s`` (N parameters without position embeddings; the second term
  is attention's scores and weighted values, forward and backward) — the figure megaforge reports
  as MFU. Recompute adds work: ``full`` a whole forward (+1/3), ``selective`` the attention core's
  forward (``4·L·h·s`` per token).
* compute time = FLOPs per GPU / (peak × efficiency); ``efficiency`` (default 0.6) is the fraction of
  the data-sheet peak that large bf16 matmuls reach in practice (Megatron-LM sustains 52% MFU at 530B
  including its bubble and communication).
* overhead: ``3e-4`` s per layer and micro-batch (eager kernel launches, norms, small ops) — what
  makes larger micro-batches faster on one GPU.
* bubble: ``(pp - 1) / (m · vpp)`` of the compute time (Narayanan et al. 2021).
* tensor parallelism: per layer and micro-batch 4 all-reduces (2 forward, 2 backward; with
  sequence parallelism the same volume as all-gathers and reduce-scatters), 6 with full recompute,
  each moving ``2·(tp-1)/tp × s·b·h`` activations, over the intra-node link.
* pipeline: each micro-batch sends its activations forward and their gradients back across every
  chunk boundary of the rank (``2·m·vpp`` messages of ``s·b·h``, ``/tp`` with sequence parallelism).
* data parallelism (fp32 gradients): replicated — an all-reduce (``2·(dp-1)/dp`` × gradient bytes);
  ZeRO-2-like — a reduce-scatter of gradients and an all-gather of parameters; full — the same plus
  an all-gather of parameters per micro-batch in forward and again in backward. Over the inter-node
  link when the data-parallel group spans nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.config import RunConfig
from toolkit.planning.gpus import GPU
from toolkit.planning.layout import Layout
from toolkit.planning.memory import Shape, stage_params, total_params

DEFAULT_EFFICIENCY = 0.6  # achievable fraction of dense peak for the model's matmuls
LAYER_OVERHEAD_S = 3e-4  # per layer and micro-batch (forward + backward): kernel launches and small ops


@dataclass
class Timing:
    """Seconds per optimizer step, by part, and the resulting MFU."""

    compute: float  # matmul work of the step on one GPU, recompute included, and per-micro-batch overhead
    bubble: float  # pipeline fill and drain
    tp_comm: float  # tensor-parallel collectives
    pp_comm: float  # pipeline sends and receives
    dp_comm: float  # gradient reduction and parameter gathers
    model_flops: float  # FLOPs per step of the whole model (no recompute): 6·N·T + 12·L·h·s·T
    mfu: float  # model FLOPs / (step time × GPUs × peak)
    tokens_per_second: float  # whole job

    @property
    def step(self) -> float:
        return self.compute + self.bubble + self.tp_comm + self.pp_comm + self.dp_comm


def flops_per_token(sh: Shape) -> float:
    """Model FLOPs per token: 6·N + 12·L·h·s (N without position embeddings)."""
    n = total_params(sh) - sh.positions * sh.hidden
    return 6.0 * n + 12.0 * sh.layers * sh.hidden * sh.seq


def step_time(cfg: RunConfig, layout: Layout, gpu: GPU, *, efficiency: float = DEFAULT_EFFICIENCY) -> Timing:
    sh = Shape.of(cfg)
    precision = cfg.trainer.precision
    gpus = layout.tp * layout.pp * layout.dp
    tokens = cfg.trainer.global_batch_size * sh.seq
    model_flops = flops_per_token(sh) * tokens
    extra = {"none": 0.0, "selective": 4.0 * sh.layers * sh.hidden * sh.seq,
             "full": flops_per_token(sh) / 3}[layout.recompute] * tokens
    peak = gpu.peak_flops(precision)
    m = layout.num_microbatches
    layers_on_rank = sh.layers // layout.pp
    compute = (model_flops + extra) / gpus / (peak * efficiency) + layers_on_rank * m * LAYER_OVERHEAD_S
    bubble = compute * (layout.pp - 1) / (m * layout.vpp)

    c = 4 if precision == "fp32" else 2
    act = sh.seq * layout.micro_batch * sh.hidden * c  # one micro-batch's hidden states
    tp_comm = 0.0
    if layout.tp > 1:
        link = gpu.intra_node_gbps if layout.tp <= gpu.gpus_per_node else gpu.inter_node_gbps
        collectives = 6 if layout.recompute == "full" else 4
        per = 2 * (layout.tp - 1) / layout.tp * act
        tp_comm = layers_on_rank * m * collectives * per / (link * 1e9)
    pp_comm = 0.0
    if layout.pp > 1:
        link = gpu.inter_node_gbps if layout.tp * layout.dp * layout.pp > gpu.gpus_per_node else gpu.intra_node_gbps
        pp_comm = 2 * m * layout.vpp * (act / (layout.tp if layout.sp else 1)) / (link * 1e9)
    dp_comm = 0.0
    if layout.dp > 1:
        link = gpu.inter_node_gbps if layout.tp * layout.dp > gpu.gpus_per_node else gpu.intra_node_gbps
        grad_bytes = 4 * stage_params(sh, layout, first=True, last=layout.pp == 1).total
        ring = (layout.dp - 1) / layout.dp
        volume = 2 * ring * grad_bytes  # all-reduce, or reduce-scatter + all-gather
        if layout.sharding == "full":
            volume += 2 * m * ring * grad_bytes  # parameters gathered again per micro-batch, forward and backward
        dp_comm = volume / (link * 1e9)
    t = Timing(compute=compute, bubble=bubble, tp_comm=tp_comm, pp_comm=pp_comm, dp_comm=dp_comm,
               model_flops=model_flops, mfu=0.0, tokens_per_second=0.0)
    t.mfu = model_flops / (t.step * gpus * peak)
    t.tokens_per_second = tokens / t.step
    return t
