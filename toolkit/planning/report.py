"""What ``megaforge plan`` prints: the best layouts as a table, the arithmetic of one
(``--explain``), or everything as JSON (``--json``)."""

from __future__ import annotations

import json

from toolkit.config import RunConfig
from toolkit.errors import ConfigError
from toolkit.planning.gpus import GPU
from toolkit.planning.layouts import DEFAULT_HEADROOM, Estimate
from toolkit.planning.memory import GiB, Shape, layer_params, total_params
from toolkit.planning.timing import DEFAULT_EFFICIENCY, flops_per_token

HEADER = ("#", "layout", "sharding", "SP", "recompute", "mb", "peak GiB", "w+g+opt", "act", "step s", "MFU",
          "tok/s")


def _gib(x: float) -> str:
    return f"{x / GiB:.1f}"


def row(i: int, e: Estimate) -> tuple:
    lay, mem, t = e.layout, e.memory, e.timing
    return (str(i), lay.label(), lay.sharding, "yes" if lay.sp else "no", lay.recompute, str(lay.micro_batch),
            _gib(mem.peak) + ("" if e.fits else " !"), _gib(mem.weights + mem.grads + mem.optimizer),
            _gib(mem.activations + mem.weight_casts), f"{t.step:.2f}", f"{100 * t.mfu:.1f}%",
            f"{t.tokens_per_second:,.0f}")


def table(estimates: list[Estimate], top: int) -> str:
    rows = [HEADER] + [row(i + 1, e) for i, e in enumerate(estimates[:top])]
    widths = [max(len(r[k]) for r in rows) for k in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(w) if k < 5 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def summary(cfg: RunConfig, gpus: int, gpu: GPU, estimates: list[Estimate], headroom: float = DEFAULT_HEADROOM) -> str:
    sh = Shape.of(cfg)
    fit = sum(e.fits for e in estimates)
    return (f"{cfg.name}: {total_params(sh) / 1e9:.2f}B parameters, {sh.layers} layers × {sh.hidden}, seq {sh.seq}, "
            f"global batch {cfg.trainer.global_batch_size}, {cfg.trainer.precision} — on {gpus} × {gpu.name} "
            f"({gpu.memory_gib:g} GiB, {gpu.peak_flops(cfg.trainer.precision) / 1e12:g} TFLOP/s "
            f"{cfg.trainer.precision}); {fit} of {len(estimates)} valid layouts fit in "
            f"{(1 - headroom) * gpu.memory_gib:.1f} GiB")


def nothing_fits(cfg: RunConfig, gpus: int, gpu: GPU, estimates: list[Estimate], headroom: float) -> ConfigError:
    """The error for a job no layout fits: the closest layout and what to change."""
    best = min(estimates, key=lambda e: e.memory.peak)
    return ConfigError(
        f"no layout of {cfg.name} fits {gpus} × {gpu.name} ({(1 - headroom) * gpu.memory_gib:.1f} GiB usable): the "
        f"closest, {best.layout.label()} sharding={best.layout.sharding} recompute={best.layout.recompute} "
        f"micro-batch {best.layout.micro_batch}, needs {best.memory.peak / GiB:.1f} GiB; use more GPUs, a GPU with "
        f"more memory (--gpu), or a smaller model or sequence")


def explain(cfg: RunConfig, gpu: GPU, e: Estimate, index: int) -> str:
    """The arithmetic of one row."""
    sh, lay, mem, t = Shape.of(cfg), e.layout, e.memory, e.timing
    d = mem.details
    c = 4 if cfg.trainer.precision == "fp32" else 2
    step_note = "incl. foreach AdamW's 4 B × params" if mem.optimizer_temporary else "fused AdamW, in place"
    lines = [
        f"layout #{index}: {lay.label()}, sharding={lay.sharding}, sequence_parallel={lay.sp}, "
        f"recompute={lay.recompute}, micro-batch {lay.micro_batch} × {lay.num_microbatches} per step",
        "",
        f"parameters: {total_params(sh):,} in all; {layer_params(sh, lay.tp):,} per layer per tp rank; the {mem.rank} "
        f"pipeline rank holds {d['layers_on_rank']} layers and {d['params_on_rank']:,} parameters",
        f"  weights     {_gib(mem.weights):>8} GiB  4 B × params" + (
            " / dp at rest + 4 B × params unsharded from forward to backward (ZeRO-2-like)"
            if lay.sharding == "optimizer_and_grads" and lay.dp > 1 else
            " / dp (FSDP, gathered a layer at a time)" if lay.sharding == "full" and lay.dp > 1 else " (replicated)"),
        f"  gradients   {_gib(mem.grads):>8} GiB  4 B × params / {d['data_parallel_shards']}",
        f"  optimizer   {_gib(mem.optimizer):>8} GiB  8 B × params / {d['data_parallel_shards']} (AdamW moments, fp32)",
        f"  activations {_gib(mem.activations):>8} GiB  {d['layer_bytes_per_token']:.1f} B per token per layer × "
        f"{d['tokens_per_microbatch']} tokens × {d['layer_microbatches_in_flight']:.1f} layer-micro-batches in flight"
        + (" + logits (4 B × vocab/tp per token)" if mem.rank in ("last", "only") else "")
        + (" + each in-flight chunk's output (4 B × h per token) held by the pipeline" if lay.pp > 1 else ""),
        f"  weight casts{_gib(mem.weight_casts):>8} GiB  "
        + (f"{c} B × matrix params kept by autocast for backward" if c == 2
           else "4 B × q, k, v matrix params: model.fused_qkv's concatenated weights" if mem.weight_casts
           else "none in fp32"),
        f"  temporary   {_gib(mem.temporary):>8} GiB  logits gradients ({12 if e.layout.tp > 1 else 8} B × vocab/tp per "
        f"token), a recomputed layer,"
        f" FSDP gathers",
        f"  peak        {_gib(mem.peak):>8} GiB  max(forward/backward {_gib(mem.forward_backward_peak)}, optimizer step "
        f"{_gib(mem.step_peak)}, {step_note}); fits: {e.fits}",
        "",
        f"time per step: {flops_per_token(sh) / 1e9:.2f} GFLOP per token (6·N + 12·L·h·s) × "
        f"{cfg.trainer.global_batch_size * sh.seq:,} tokens = {t.model_flops:.3g} FLOP",
        f"  compute     {t.compute:8.3f} s  (recompute included) / ({gpu.peak_flops(cfg.trainer.precision) / 1e12:g} "
        f"TFLOP/s × efficiency), + per-layer-micro-batch overhead",
        f"  bubble      {t.bubble:8.3f} s  compute × (pp-1)/(m·vpp) = ({lay.pp}-1)/({lay.num_microbatches}·{lay.vpp})",
        f"  TP comm     {t.tp_comm:8.3f} s  4 collectives per layer per micro-batch (6 with full recompute) over "
        f"{gpu.intra_node_gbps:g} GB/s",
        f"  PP comm     {t.pp_comm:8.3f} s  2·m·vpp sends of s·b·h",
        f"  DP comm     {t.dp_comm:8.3f} s  fp32 gradients reduced (and parameters gathered) over "
        f"{gpu.inter_node_gbps if lay.tp * lay.dp > gpu.gpus_per_node else gpu.intra_node_gbps:g} GB/s",
        f"  step        {t.step:8.3f} s  → {t.tokens_per_second:,.0f} tokens/s, MFU {100 * t.mfu:.1f}%",
        "",
        "overrides:   " + " ".join(lay.overrides()),
    ]
    return "\n".join(lines)


def to_json(cfg: RunConfig, gpus: int, gpu: GPU, estimates: list[Estimate], top: int) -> str:
    rows = []
    for e in estimates[:top]:
        mem, t = e.memory, e.timing
        rows.append({
            "layout": {k: v for k, v in e.layout.__dict__.items()},
            "fits": e.fits,
            "memory_gib": {"peak": mem.peak / GiB, "weights": mem.weights / GiB, "grads": mem.grads / GiB,
                           "optimizer": mem.optimizer / GiB, "activations": mem.activations / GiB,
                           "weight_casts": mem.weight_casts / GiB, "temporary": mem.temporary / GiB,
                           "optimizer_temporary": mem.optimizer_temporary / GiB, "rank": mem.rank},
            "time_s": {"step": t.step, "compute": t.compute, "bubble": t.bubble, "tp_comm": t.tp_comm,
                       "pp_comm": t.pp_comm, "dp_comm": t.dp_comm},
            "mfu": t.mfu, "tokens_per_second": t.tokens_per_second,
            "overrides": e.layout.overrides(),
        })
    return json.dumps({"recipe": cfg.name, "gpus": gpus, "gpu": gpu.__dict__, "layouts": rows}, indent=2)


def plan_report(recipe: str, overrides: list[str], *, gpus: int, gpu: str | None = None,
                gpu_memory: float | None = None, gpu_flops: float | None = None, intra_node_gbps: float | None = None,
                inter_node_gbps: float | None = None, gpus_per_node: int | None = None,
                efficiency: float = DEFAULT_EFFICIENCY, headroom: float = DEFAULT_HEADROOM, top: int = 10,
                explain_row: int | None = None, as_json: bool = False) -> str:
    """``megaforge plan``: the text to print for ``recipe`` + ``overrides`` on ``gpus`` GPUs."""
    from toolkit.config import load_config
    from toolkit.planning.gpus import resolve_gpu
    from toolkit.planning.layouts import plan

    cfg = load_config(recipe, overrides)
    flops = {"bf16_tflops": gpu_flops, "fp16_tflops": gpu_flops, "fp32_tflops": gpu_flops}
    device = resolve_gpu(gpu, memory_gib=gpu_memory, intra_node_gbps=intra_node_gbps,
                         inter_node_gbps=inter_node_gbps, gpus_per_node=gpus_per_node, **flops)
    if not 0 <= headroom < 1:
        raise ConfigError(f"--headroom {headroom}: give the fraction of memory to leave free, in [0, 1)")
    if top < 1:
        raise ConfigError(f"--top {top}: give at least 1")
    estimates = plan(cfg, gpus, device, efficiency=efficiency, headroom=headroom)
    if not any(e.fits for e in estimates):
        raise nothing_fits(cfg, gpus, device, estimates, headroom)
    if as_json:
        return to_json(cfg, gpus, device, estimates, top)
    if explain_row is not None:
        if not 1 <= explain_row <= len(estimates):
            raise ConfigError(f"--explain {explain_row}: there are {len(estimates)} layouts; give 1 to {len(estimates)}")
        return explain(cfg, device, estimates[explain_row - 1], explain_row)
    return "\n".join([summary(cfg, gpus, device, estimates, headroom), "", table(estimates, top), "",
                      "row 1 as overrides: " + " ".join(estimates[0].layout.overrides()),
                      "(`!`: does not fit; --explain N shows a row's arithmetic, --json all figures)"])
