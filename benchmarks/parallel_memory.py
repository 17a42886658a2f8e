"""Peak memory per rank: dp2 replicated vs dp2 FSDP2 (full sharding) on a mid-size GPT.

    python -m torch.distributed.run --nproc-per-node 2 benchmarks/parallel_memory.py [--hidden 512 --layers 8]

On CUDA it reports ``torch.cuda.max_memory_allocated``; on CPU, the bytes of parameters, gradients
and optimizer state held by this rank after two AdamW steps (the part FSDP shards), measured from
the tensors themselves (RSS is too noisy on CPU). Prints both and the ratio on rank 0.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def local_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    def nbytes(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    total = sum(nbytes(p) + (nbytes(p.grad) if p.grad is not None else 0) for p in model.parameters())
    for state in optimizer.state.values():
        total += sum(nbytes(v) for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    return total


def measure(sharding: str, args, device: torch.device) -> int:
    from toolkit.config import load_config
    from toolkit.models.build import build_initialized_model
    from toolkit.models.gpt.objective import causal_lm
    from toolkit.optim import build_optimizer
    from toolkit.parallel.runtime import setup
    from toolkit.registry import get_spec

    cfg = load_config("gpt-tiny", [f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}",
                                   "model.num_attention_heads=8", "model.seq_length=64", "model.vocab_size=8192",
                                   f"parallel.data_parallel_sharding={sharding}"])
    runtime = setup(cfg, device)
    model = build_initialized_model(cfg, device)
    runtime.parallelize(model, get_spec("gpt").tensor_parallel)
    optimizer = build_optimizer(model, cfg.optim)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokens = torch.randint(0, 8192, (2, 65), device=device)
    for _ in range(2):
        causal_lm(model, {"tokens": tokens}).backward()
        optimizer.step()
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return local_bytes(model, optimizer)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
        torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    results = {s: measure(s, args, device) for s in ("none", "full")}
    if dist.get_rank() == 0:
        what = "peak allocated" if device.type == "cuda" else "params+grads+optimizer bytes"
        for s, label in (("none", "dp2 replicated"), ("full", "dp2 FSDP2 full")):
            print(f"{label:16s} {what} per rank: {results[s] / 2**20:8.1f} MiB")
        print(f"ratio FSDP2 / replicated: {results['full'] / results['none']:.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
