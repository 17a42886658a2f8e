"""Time and peak memory of checkpoint conversion (megaforge ↔ Hugging Face) on a big model.

    python benchmarks/convert_memory.py                       # gpt-1.3b, fp32 (~5.3 GB checkpoint)
    python benchmarks/convert_memory.py --recipe gpt2-124m --dtype bf16   # quick

1. builds the recipe's model with random weights (on ``meta``, materialized and initialized in
   place: one copy of the weights) and saves it with ``CheckpointManager`` as a run directory, as
   training does (one ``.distcp`` file per rank);
2. runs ``export_hf`` (megaforge → HF) and then ``import_hf`` (HF → megaforge) each in a fresh
   subprocess, which reports its wall time, its peak RSS (the kernel's ``VmHWM``), and the peaks of
   anonymous and file-backed resident memory sampled every 10 ms (``RssAnon``/``RssFile``: mapped
   checkpoint pages count in RSS but the kernel can drop them), each above the RSS the process had
   after its imports;
3. times ``shutil.copytree`` of the same bytes (the checkpoint folder, the HF folder);

and prints a side-by-side table with ratios: time against the copy, memory against the model size
and the largest tensor. Everything is written under ``--workdir`` (default: a temporary folder in
/tmp) and removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- child side


def _status() -> dict[str, int]:
    """Memory fields of /proc/self/status in bytes (VmHWM, VmRSS, RssAnon, RssFile)."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


class PeakSampler:
    """Samples RssAnon and RssFile every ``interval`` seconds in a thread; keeps the maxima."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak_anon, self.peak_file = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            s = _status()
            self.peak_anon, self.peak_file = max(self.peak_anon, s["RssAnon"]), max(self.peak_file, s["RssFile"])
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def child(args) -> None:
    """Run one step in this process and print one JSON line with its time and memory."""
    import warnings

    import torch

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    from toolkit.checkpoint.native import CheckpointManager
    from toolkit.config import load_config, save_config
    from toolkit.convert.hf import export_hf, import_hf
    from toolkit.models.build import build_model

    torch.set_num_threads(1)
    base = _status()
    start = time.perf_counter()
    with PeakSampler() as peak:
        if args.child == "build":
            cfg = load_config(args.recipe, ["trainer.run_dir=" + args.out])
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
            with torch.device("meta"):
                model = build_model(cfg.model, tensor_parallel_size=cfg.parallel.tensor_model_parallel_size)
            model.to(dtype).to_empty(device="cpu")  # casting on meta costs nothing; then one real copy
            model.init_weights(cfg.trainer.seed)
            run = Path(args.out)
            run.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run / "config.yaml")
            CheckpointManager(run / "checkpoints").save(1, model, None, {"step": 1, "consumed_samples": 0})
        elif args.child == "export":
            export_hf(args.src, args.out)
        elif args.child == "import":
            import_hf(args.src, args.out, dtype=args.dtype)
        elif args.child == "copy":
            shutil.copytree(args.src, args.out)
            copied = time.perf_counter()
            for path in Path(args.out).rglob("*"):  # the converters fsync what they write; a fair copy does too
                if path.is_file():
                    fd = os.open(path, os.O_RDONLY)
                    os.fsync(fd)
                    os.close(fd)
    seconds = time.perf_counter() - start
    end = _status()
    extra = {"copy_seconds": copied - start} if args.child == "copy" else {}
    print(json.dumps({**extra, "seconds": seconds, "base_rss": base["VmRSS"], "peak_rss": end["VmHWM"],
                      "peak_anon": max(peak.peak_anon, end["RssAnon"]), "base_anon": base["RssAnon"],
                      "peak_file": max(peak.peak_file, end["RssFile"]), "base_file": base["RssFile"]}))


# ---------------------------------------------------------------------------- parent side


def run_child(step: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--child", step] + [f"--{k}={v}" for k, v in kw.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode != 0:
        sys.exit(f"{step} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def tensor_sizes(step_dir: Path) -> tuple[int, int, str]:
    """(model bytes, largest tensor bytes, its name) from the DCP metadata (no data read)."""
    from toolkit.convert.streaming import DCPSource

    src = DCPSource(step_dir)
    sizes = {n: src.meta(n).numel() * src.meta(n).element_size() for n in src.names()}
    name = max(sizes, key=sizes.get)
    return sum(sizes.values()), sizes[name], name


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="gpt-1.3b", help="recipe whose model is converted (default gpt-1.3b)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weight dtype (default fp32)")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a new temporary folder in /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints written")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--src", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="convert_memory-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    run, hf, back = work / "run", work / "hf", work / "imported"
    try:
        print(f"building {args.recipe} ({args.dtype}) with random weights in {run} ...", flush=True)
        build = run_child("build", recipe=args.recipe, dtype=args.dtype, out=run)
        step = run / "checkpoints" / "step_1"
        model_bytes, largest, largest_name = tensor_sizes(step)
        print(f"model {gib(model_bytes)}, largest tensor {largest_name} {gib(largest)}; checkpoint on disk "
              f"{gib(folder_bytes(step))}", flush=True)
        results = {"build (init + DCP save)": build}
        results["export_hf (megaforge → HF)"] = run_child("export", src=run, out=hf)
        results["copytree + fsync of the checkpoint"] = run_child("copy", src=step, out=work / "copy-ckpt")
        shutil.rmtree(work / "copy-ckpt")
        results["import_hf (HF → megaforge)"] = run_child("import", src=hf, out=back, dtype=args.dtype)
        results["copytree + fsync of the HF folder"] = run_child("copy", src=hf, out=work / "copy-hf")
        shutil.rmtree(work / "copy-hf")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n{args.recipe} {args.dtype}: model {gib(model_bytes)}, largest tensor {gib(largest)} ({largest_name}); "
          f"memory columns are growth above the process's RSS after imports\n")
    head = ("step", "time s", "× copy", "× copy+fsync", "peak RSS", "÷ model", "÷ largest", "peak anon",
            "÷ largest", "peak file")
    rows = []
    for label, r in results.items():
        copy = results["copytree + fsync of the checkpoint"] if "export" in label else \
            results["copytree + fsync of the HF folder"] if "import" in label else None
        rss, anon, file = (r["peak_rss"] - r["base_rss"], r["peak_anon"] - r["base_anon"],
                           r["peak_file"] - r["base_file"])
        time_s = f"{r['seconds']:.1f}" + (f" ({r['copy_seconds']:.1f} copy)" if "copy_seconds" in r else "")
        rows.append((label, time_s, f"{r['seconds'] / copy['copy_seconds']:.1f}" if copy else "",
                     f"{r['seconds'] / copy['seconds']:.2f}" if copy else "",
                     gib(rss), f"{rss / model_bytes:.2f}", f"{rss / largest:.2f}", gib(anon),
                     f"{anon / largest:.2f}", gib(file)))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for row in [head, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(row, widths))))


if __name__ == "__main__":
    main()
