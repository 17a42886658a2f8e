"""Training throughput: megaforge's GPT vs. Hugging Face ``GPT2LMHeadModel``, same shape, same run.

Both models get the GPT-2 124M shape (12 layers, 768 hidden, 12 heads, vocab 50304), dropout 0,
AdamW, the same random token batches; each precision is measured for both in the same process,
alternating, and the script prints tokens/s, MFU and the ratio ours / Hugging Face.

    python benchmarks/gpt_throughput.py                      # 124M shape, seq 512, batch 4, fp32 + bf16
    python benchmarks/gpt_throughput.py --layers 2 --steps 2 --precisions fp32   # a quick look

FLOPs per token = 6·N + 12·L·h·s with N the parameters excluding position embeddings; MFU divides
by the measured matmul peak of this machine (``toolkit.training.metrics.measured_matmul_peak``)
unless ``--peak-tflops`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from toolkit.config import ModelConfig, OptimConfig
from toolkit.models.common.loss import lm_cross_entropy
from toolkit.models.gpt import GPTModel
from toolkit.optim import build_optimizer
from toolkit.training.metrics import flops_per_token, measured_matmul_peak


def build_ours(args) -> torch.nn.Module:
    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                      seq_length=args.seq, max_position_embeddings=1024, vocab_size=args.vocab,
                      activation="gelu_tanh", hidden_dropout=0.0, attention_dropout=0.0)
    model = GPTModel(cfg)
    model.init_weights(0)
    return model


def build_hf(args) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=args.vocab, n_positions=1024, n_embd=args.hidden, n_layer=args.layers,
                     n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg)


def loss_ours(model, x):
    return lm_cross_entropy(model(x[:, :-1]), x[:, 1:])


def loss_hf(model, x):
    return lm_cross_entropy(model(input_ids=x[:, :-1]).logits, x[:, 1:])


def autocast(precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


def time_steps(model, loss_fn, batches, precision: str, compile_model: bool) -> list[float]:
    opt = build_optimizer(model, OptimConfig(lr=1e-4, weight_decay=0.1))
    fn = torch.compile(model) if compile_model else model
    times = []
    for x in batches:
        start = time.perf_counter()
        with autocast(precision):
            loss = loss_fn(fn, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[1:]  # first step is warm-up


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=4, help="timed steps per model and precision (+1 warm-up)")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--peak-tflops", type=float, default=None, help="per-device peak; default: measured matmul")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ours, hf = build_ours(args), build_hf(args)
    n_ours = ours.num_parameters(exclude_positions=True)
    n_hf = sum(p.numel() for p in hf.parameters()) - hf.transformer.wpe.weight.numel()
    cfg = ours.cfg
    fpt = flops_per_token(cfg, n_ours)
    tokens = args.batch * args.seq
    print(f"shape: {args.layers} layers, {args.hidden} hidden, {args.heads} heads, vocab {args.vocab}, "
          f"seq {args.seq}, batch {args.batch}; parameters (no positions) ours {n_ours:,} HF {n_hf:,}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, compile={args.compile}")
    print(f"{'precision':<10}{'model':<12}{'tokens/s':>12}{'MFU':>9}{'step s':>10}")
    for precision in args.precisions.split(","):
        peak = args.peak_tflops * 1e12 if args.peak_tflops else measured_matmul_peak("cpu", precision)
        gen = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
                   for _ in range(args.steps + 1)]
        result = {}
        for name, model, fn in (("huggingface", hf, loss_hf), ("megaforge", ours, loss_ours)):
            step = statistics.median(time_steps(model, fn, batches, precision, args.compile))
            result[name] = tokens / step
            print(f"{precision:<10}{name:<12}{tokens / step:>12.1f}{100 * fpt * tokens / step / peak:>8.1f}%"
                  f"{step:>10.2f}")
        print(f"{precision:<10}{'ratio':<12}{result['megaforge'] / result['huggingface']:>11.2f}x"
              f"   (megaforge / huggingface; matmul peak {peak / 1e9:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
