"""Preprocessing throughput: ``megaforge preprocess`` vs. the raw tokenizer on the same file.

Builds a jsonl corpus of ``--size-mb`` MB (default 100) by repeating the shipped English corpus
(``toolkit/data/corpora/english.jsonl.gz``), each pass in a new shuffled order, into
``--corpus-dir`` (default: the system temp folder; a file of the same size there is reused), then for
each ``--tokenizer`` times, alternately, each in a child process of its own with
``RAYON_NUM_THREADS=--workers`` (the Hugging Face ``tokenizers`` thread pool is sized once, at first
use, so each measurement gets a fresh process):

* **raw**: read the file line by line, ``json.loads``, and ``tokenizers.Tokenizer.encode_batch`` (the
  library's own API, offsets and all) on batches of ``--raw-batch`` documents, touching every
  ``Encoding.ids``; for a sentencepiece tokenizer ``SentencePieceProcessor.encode`` on the batch.
* **ours**: ``toolkit.data.preprocess.preprocess(..., workers=N)`` writing the indexed dataset
  (``.bin``/``.idx``, fsynced), exactly what ``megaforge preprocess --workers N`` runs.

It prints a markdown table: MB/s, documents/s, tokens/s (EOD tokens not counted, so both count the
same tokens, which is checked), the growth of the process's peak RSS during the run (``VmHWM``,
reset through ``/proc/self/clear_refs``, above the RSS before it, tokenizer loaded), the wall and
CPU seconds (all the process's threads) and ours/raw. ``ours`` and ``raw`` alternate
``--repeats`` times; the table gives the best and the median of each, and the ratio of the bests and
of the medians (the machine may be shared: compare within one run only). A second corpus of
``--small-mb`` MB (default a quarter of ``--size-mb``; 0 skips it) is run once more
to show that memory does not grow with the corpus.

    python benchmarks/preprocess_throughput.py                          # 100 MB, all cores
    python benchmarks/preprocess_throughput.py --workers 1 --size-mb 20 --repeats 3
    python benchmarks/preprocess_throughput.py --tokenizer english-bpe english-t5-spm
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1_000_000
REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "toolkit" / "data" / "corpora" / "english.jsonl.gz"


def build_corpus(path: Path, size_mb: float, seed: int = 0) -> Path:
    """Write ``size_mb`` MB of jsonl lines from the shipped corpus (reshuffled each pass); reuse ``path``
    if it already holds a corpus of that size."""
    target = int(size_mb * MB)
    if path.is_file() and abs(path.stat().st_size - target) < 64 * 1024:
        return path
    with gzip.open(SHIPPED, "rb") as f:
        lines = [line if line.endswith(b"\n") else line + b"\n" for line in f if line.strip()]
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    written = 0
    with open(tmp, "wb") as out:
        while written < target:
            rng.shuffle(lines)
            for line in lines:
                out.write(line)
                written += len(line)
                if written >= target:
                    break
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------- child


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def _raw(tok, corpus: Path, batch_size: int) -> tuple[int, int]:
    """(documents, tokens) of the raw library call on every document of ``corpus``."""
    sp = getattr(tok, "_sp", None)
    if sp is not None:  # sentencepiece: batch encode (its own threads)
        def encode(texts: list[str]) -> int:
            return sum(len(ids) for ids in sp.encode(texts, out_type=int))
    else:
        backend = tok.backend

        def encode(texts: list[str]) -> int:
            return sum(len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False))

    docs = tokens = 0
    batch: list[str] = []
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            batch.append(json.loads(line)["text"])
            if len(batch) == batch_size:
                tokens += encode(batch)
                docs += len(batch)
                batch = []
    if batch:
        tokens += encode(batch)
        docs += len(batch)
    return docs, tokens


def _ours(tok, corpus: Path, workers: int) -> tuple[int, int]:
    from toolkit.data.preprocess import preprocess

    out = Path(tempfile.mkdtemp(prefix="megaforge-bench-"))
    try:
        stats = preprocess([corpus], out / "ds", tok, workers=workers, progress=False)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return stats["documents"], stats["tokens"] - stats["documents"]  # EODs not counted, as raw does not add them


def child(mode: str, tokenizer: str, corpus: Path, workers: int, raw_batch: int) -> dict:
    from toolkit.tokenization import load_tokenizer

    tok = load_tokenizer(tokenizer)
    before = _proc_kib("VmRSS")
    _reset_peak_rss()
    start = time.perf_counter()
    cpu = time.process_time()
    docs, tokens = _raw(tok, corpus, raw_batch) if mode == "raw" else _ours(tok, corpus, workers)
    seconds = time.perf_counter() - start
    return {"mode": mode, "seconds": seconds, "cpu_s": time.process_time() - cpu, "documents": docs,
            "tokens": tokens, "rss_growth_mib": (_proc_kib("VmHWM") - before) / 1024}


# ---------------------------------------------------------------------------------------------- parent


def measure(mode: str, tokenizer: str, corpus: Path, workers: int, raw_batch: int, before: Path | None = None) -> dict:
    env = dict(os.environ, RAYON_NUM_THREADS=str(workers), TOKENIZERS_PARALLELISM="true")
    if mode == "before":  # ours, with the toolkit package of another checkout
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(before), env.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "--child", "raw" if mode == "raw" else "ours", "--tokenizer", tokenizer, "--corpus", str(corpus),
           "--workers", str(workers), "--raw-batch", str(raw_batch)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["mb"] = corpus.stat().st_size / MB
    return result


def row(label: str, size: float, runs: list[dict], pick) -> list[str]:
    secs = pick([r["seconds"] for r in runs])
    r = runs[0]
    rss = max(x["rss_growth_mib"] for x in runs)
    cpu = pick([x["cpu_s"] for x in runs])
    return [label, f"{size:.0f}", f"{r['mb'] / secs:.2f}", f"{r['documents'] / secs:,.0f}",
            f"{r['tokens'] / secs:,.0f}", f"{rss:.0f}", f"{secs:.1f}", f"{cpu:.1f}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="threads/processes (default: all cores)")
    p.add_argument("--size-mb", type=float, default=100.0, help="corpus size in MB (default 100)")
    p.add_argument("--small-mb", type=float, default=None,
                   help="a second corpus, for the memory check (default size/4; 0 skips it)")
    p.add_argument("--repeats", type=int, default=2, help="raw/ours pairs per tokenizer (default 2)")
    p.add_argument("--tokenizer", nargs="+", default=["english-bpe"],
                   help="tokenizers (shipped names or paths; default english-bpe, the GPT recipes' tokenizer)")
    p.add_argument("--raw-batch", type=int, default=1024, help="documents per raw encode_batch call (default 1024)")
    p.add_argument("--corpus-dir", type=Path, default=Path(tempfile.gettempdir()),
                   help="where the corpora are built (reused when present)")
    p.add_argument("--before", type=Path, default=None,
                   help="also time ours with the toolkit package in this folder (e.g. the code before a change: "
                        "git archive HEAD toolkit tokenizers | tar -x -C DIR)")
    p.add_argument("--child", choices=["raw", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.tokenizer[0], args.corpus, args.workers, args.raw_batch)))
        return 0

    big = build_corpus(args.corpus_dir / f"megaforge-preprocess-{args.size_mb:g}MB.jsonl", args.size_mb)
    small_mb = args.size_mb / 4 if args.small_mb is None else args.small_mb
    small = build_corpus(args.corpus_dir / f"megaforge-preprocess-{small_mb:g}MB.jsonl", small_mb) if small_mb else None
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    print(f"# preprocess throughput: --workers {args.workers}, {os.cpu_count()} cores ({cpu}), "
          f"{time.strftime('%Y-%m-%d')}, raw/ours alternating x{args.repeats}\n")
    header = ["tokenizer", "run", "MB", "MB/s", "docs/s", "tokens/s", "peak RSS growth MiB", "s", "CPU s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in args.tokenizer:
        modes = ("raw", "ours", "before") if args.before else ("raw", "ours")
        runs: dict[str, list[dict]] = {mode: [] for mode in modes}
        for _ in range(args.repeats):
            for mode in modes:
                runs[mode].append(measure(mode, name, big, args.workers, args.raw_batch, args.before))
        raw = runs["raw"]
        for pick, what in ((min, "best"), (statistics.median, "median")):
            for mode in modes:
                cells = row(f"{mode} ({what} of {args.repeats})", big.stat().st_size / MB, runs[mode], pick)
                print(f"| {name} | " + " | ".join(cells) + " |")
        for mode in modes[1:]:
            best = min(r["seconds"] for r in raw) / min(r["seconds"] for r in runs[mode])
            median = statistics.median(r["seconds"] for r in raw) / statistics.median(r["seconds"] for r in runs[mode])
            same = raw[0]["tokens"] == runs[mode][0]["tokens"] and raw[0]["documents"] == runs[mode][0]["documents"]
            print(f"| {name} | **{mode}/raw** | | **{best:.3f}** (best) | **{median:.3f}** (median) | "
                  f"{'same tokens' if same else 'TOKEN COUNTS DIFFER'} | | | |")
        if small is not None:
            for mode in ("raw", "ours"):
                r = measure(mode, name, small, args.workers, args.raw_batch)
                print(f"| {name} | " + " | ".join(row(f"{mode} (memory check)", r["mb"], [r], min)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
