"""Self-attention forward + backward with separate q/k/v projections against ``model.fused_qkv``.

    python benchmarks/qkv_projection.py                          # gpt2-124m shape, 4 x 512 tokens, fp32, 1 thread
    python benchmarks/qkv_projection.py --precision bf16 --recipe gpt-1.3b --seq 2048 --device cuda

Builds one attention block (``toolkit.models.common.attention.Attention``) of the recipe's shape
twice with the same weights, one with ``fused_qkv``, and times forward + backward of each in
alternation (``--rounds`` rounds of ``--steps`` calls; the median per-call time of each is printed
with the ratio), after checking that both give the same output. It also counts, for one call of
each, the matmuls (``aten::mm``/``addmm``) and the fp32 → 16-bit casts of activations autocast makes:
these counts do not depend on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from toolkit.config import head_dim, load_config
from toolkit.models.common.attention import Attention

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


class OpCounts(TorchDispatchMode):
    """Matmuls and fp32 → 16-bit casts of tensors with 3 or more dims (activations) seen by one call."""

    def __init__(self):
        super().__init__()
        self.matmuls = self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.matmuls += func in MATMULS
        if func is torch.ops.aten._to_copy.default and args[0].dim() >= 3 and args[0].dtype == torch.float32 \
                and out.dtype in (torch.bfloat16, torch.float16):
            self.casts += 1
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="gpt2-124m")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="calls per variant and round")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    m = load_config(args.recipe, ["model.vocab_size=50257"]).model
    blocks = {}
    for fused in (False, True):
        torch.manual_seed(0)
        blocks[fused] = Attention(hidden_size=m.hidden_size, num_heads=m.num_attention_heads,
                                  num_kv_heads=m.num_query_groups or m.num_attention_heads, head_dim=head_dim(m),
                                  bias=m.add_bias_linear, dropout=0.0, fused_qkv=fused).to(device)
    blocks[True].load_state_dict(blocks[False].state_dict())
    x = torch.randn(args.micro_batch, args.seq, m.hidden_size, device=device, requires_grad=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def call(fused: bool) -> torch.Tensor:
        with autocast:
            # x * 1: a non-leaf input, as a norm's output is in the model (autocast caches the casts of leaves)
            out = blocks[fused](x * 1.0, is_causal=True)
        out.float().sum().backward()
        return out.detach()

    torch.testing.assert_close(call(True).float(), call(False).float(), rtol=1e-2, atol=1e-2)
    print(f"{args.recipe}: hidden {m.hidden_size}, {m.num_attention_heads} heads, "
          f"{m.num_query_groups or m.num_attention_heads} key/value heads, {args.micro_batch} × {args.seq} tokens, "
          f"{args.precision}, {args.device}, {args.threads} thread(s), torch {torch.__version__}")
    times = {False: [], True: []}
    for _ in range(args.rounds):
        for fused in (False, True):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                call(fused)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[fused].append((time.perf_counter() - start) / args.steps)
    print("| q, k, v | matmuls per call | activation casts per call | median s/call |")
    print("| --- | --- | --- | --- |")
    for fused in (False, True):
        with OpCounts() as counts:
            call(fused)
        print(f"| {'fused' if fused else 'separate'} | {counts.matmuls} | {counts.casts} | "
              f"{statistics.median(times[fused]):.4f} |")
    ratio = statistics.median(times[False]) / statistics.median(times[True])
    print(f"separate / fused: {ratio:.3f}× (rounds: " + ", ".join(
        f"{a / b:.2f}" for a, b in zip(times[False], times[True])) + ")")


if __name__ == "__main__":
    main()
