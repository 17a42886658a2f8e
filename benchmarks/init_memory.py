"""Start-up memory: peak RSS of each rank while the model is built, for a recipe and a few layouts.

    python benchmarks/init_memory.py gpt-1.3b                      # layouts 1, tp2, pp2 (2 CPU ranks, gloo)
    python benchmarks/init_memory.py gatortron-medium --layouts tp2,pp2

Each layout runs in fresh processes (one, or ``torchrun`` with 2 ranks) that set up the runtime,
call ``toolkit.training.run.build_model_parts`` — build, parallelize, materialize, initialize — and
stop there (the point is the set-up, not training). Each rank reports ``VmHWM`` (its peak resident
set) from ``/proc/self/status`` before and after the build, the bytes of parameters it holds and the
time the build took. ``--toolkit DIR`` measures another checkout (e.g. the code before a change:
``git archive HEAD toolkit recipes | tar -x -C /tmp/before``). Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ONE = ["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
       "trainer.global_batch_size=2", "trainer.micro_batch_size=1"]  # recipes may set a layout of their own
LAYOUTS = {  # name -> (processes, overrides)
    "1": (1, ONE),
    "tp2": (2, [*ONE, "parallel.tensor_model_parallel_size=2"]),
    "pp2": (2, [*ONE, "parallel.pipeline_model_parallel_size=2"]),
    "dp2": (2, [*ONE, "parallel.data_parallel_sharding=full"]),
}


def vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(recipe: str, overrides: list[str]) -> None:
    import torch
    from torch.distributed.tensor import DTensor

    from toolkit.config import load_config
    from toolkit.parallel import dist_env, validate_parallel
    from toolkit.parallel.runtime import setup
    from toolkit.training.run import build_model_parts

    cfg = load_config(recipe, ["trainer.device=cpu", *overrides])
    if cfg.model.vocab_size is None:  # a recipe that takes it from its tokenizer
        cfg.model.vocab_size = 50257
    validate_parallel(cfg, dist_env().world_size)
    runtime = setup(cfg, torch.device("cpu"))
    before = vm_hwm_mib()
    start = time.perf_counter()
    parts, _, n_params = build_model_parts(cfg, runtime)
    seconds = time.perf_counter() - start
    held = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
               for part in parts for p in part.parameters())
    print("INIT_MEMORY " + json.dumps({"rank": runtime.rank, "vmhwm_before_mib": round(before),
                                       "vmhwm_after_mib": round(vm_hwm_mib()), "held_mib": round(held / 2**20),
                                       "params": n_params, "build_s": round(seconds, 1)}), flush=True)
    runtime.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(recipe: str, layout: str, toolkit_dir: Path) -> list[dict]:
    nproc, overrides = LAYOUTS[layout]
    env = dict(os.environ, PYTHONPATH=str(toolkit_dir), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    me = str(Path(__file__).resolve())
    cmd = [sys.executable, me, "--worker", recipe, *overrides] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
        str(_free_port()), me, "--worker", recipe, *overrides]
    out = subprocess.run(cmd, cwd=toolkit_dir, capture_output=True, text=True, env=env)
    rows = [json.loads(line.split("INIT_MEMORY ", 1)[1]) for line in out.stdout.splitlines() if "INIT_MEMORY " in line]
    if out.returncode != 0 or len(rows) != nproc:
        print(f"{layout}: failed (exit {out.returncode})\n{out.stderr[-3000:]}", file=sys.stderr)
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--layouts", default="1,tp2,pp2", help=f"comma-separated, of {', '.join(LAYOUTS)}")
    ap.add_argument("--toolkit", type=Path, default=Path(__file__).resolve().parents[1],
                    help="the checkout whose toolkit/ and recipes/ are measured (default: this one)")
    args = ap.parse_args()
    print(f"{args.recipe} ({args.toolkit}): peak RSS (VmHWM) per rank after build_model_parts")
    for layout in args.layouts.split(","):
        for r in run_layout(args.recipe, layout, args.toolkit.resolve()):
            print(f"  {layout:4s} rank {r['rank']}: peak {r['vmhwm_after_mib']:6d} MiB (before build "
                  f"{r['vmhwm_before_mib']} MiB), holds {r['held_mib']:6d} MiB of parameters, build {r['build_s']} s")


if __name__ == "__main__":
    main()
