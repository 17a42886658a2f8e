"""AdamW step time, fused against foreach kernels, on a recipe's parameters (random gradients).

    python benchmarks/optimizer_step.py                       # gpt2-124m, 1 thread, 3 steps each, twice
    python benchmarks/optimizer_step.py --recipe gpt-1.3b --threads 2

Builds the recipe's model (``model.vocab_size`` defaults to GPT-2's 50257), gives every parameter a
random gradient, and times ``optimizer.step()`` for ``optim.implementation`` fused and foreach
alternately (after one untimed step that allocates the moments), printing seconds per step.
"""

from __future__ import annotations

import argparse
import time

import torch

from toolkit.config import OptimConfig, load_config
from toolkit.optim import build_optimizer
from toolkit.registry import get_spec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="gpt2-124m")
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.recipe, [f"model.vocab_size={args.vocab}"])
    torch.manual_seed(0)
    model = get_spec(cfg.model.family).build(cfg.model)
    for param in model.parameters():
        param.grad = torch.randn_like(param) * 1e-3
    n = sum(param.numel() for param in model.parameters())
    print(f"{args.recipe}: {n:,} parameters in {len(list(model.parameters()))} tensors, {args.threads} thread(s)")
    print("| kernels | s/step |\n| --- | --- |")
    for _ in range(args.rounds):
        for impl in ("foreach", "fused"):
            opt = build_optimizer(model, OptimConfig(implementation=impl))
            opt.step()  # allocates the moments
            start = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            print(f"| {impl} | {(time.perf_counter() - start) / args.steps:.3f} |", flush=True)


if __name__ == "__main__":
    main()
