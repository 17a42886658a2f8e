"""Kill -9 soak: a training run killed at random moments (some during checkpoint saves), restarted
with the same command each time, must end bitwise equal to the same run left alone.

    python benchmarks/kill_soak.py --kills 50                      # a long soak: gpt-tiny, 200 steps
    python benchmarks/kill_soak.py --kills 5 --seed 3 -- trainer.max_steps=40 checkpoint.save_interval=2

It trains the reference run once, then the soaked run: start ``megaforge train``, SIGKILL it after a
random delay (uniform up to half the reference run's wall time, so kills land in start-up, steps
and saves alike), start it again, ... ``--kills`` times or until the last checkpoint is written, then
let it finish. It prints the kills
delivered, the checkpoints present at each kill, and whether the losses at every step (exact float
equality, metrics.jsonl) and the final weights (``torch.equal``) match the reference; exit 0 when
they do. ``tests/reliability/test_run_faults.py`` runs a few kills in CI through :func:`kill_cycle`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# gpt-tiny shrunk so one run takes seconds on two cores; dropout on, so the RNG path is exercised.
SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.seq_length=64",
         "trainer.micro_batch_size=4", "trainer.global_batch_size=8", "trainer.eval_interval=0",
         "logging.wandb.enabled=false", "logging.progress_bar=false", "logging.plot=false", "trainer.num_threads=1",
         "trainer.sample_prompt=null", "model.hidden_dropout=0.1", "trainer.max_steps=12",
         "checkpoint.save_interval=4"]
SOAK = ["trainer.max_steps=200", "checkpoint.save_interval=4"]  # the soak's default: longer, more saves


def train_command(run_dir: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "toolkit", "train", "gpt-tiny", *SMALL, *overrides, f"trainer.run_dir={run_dir}"]


def kill_cycle(cmd: list[str], run_dir: Path, *, kills: int, max_delay: float, rng: random.Random,
               final: str | None = None, log=print) -> int:
    """Start ``cmd``, SIGKILL it after a random delay up to ``max_delay`` s, ``kills`` times (stopping
    early once the run ends by itself or ``latest`` names ``final``, its last checkpoint), then run it
    to the end; returns the kills delivered. Raises RuntimeError when a restart or the final run fails."""
    delivered = 0
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for i in range(kills):
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
        try:
            proc.wait(timeout=rng.uniform(0.5, max_delay))
            if proc.returncode != 0:
                raise RuntimeError(f"restart {i} failed (exit {proc.returncode}): {proc.stderr.read()[-2000:]}")
            break  # it finished before the kill
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stderr.close()
            delivered += 1
            folder = run_dir / "checkpoints"
            present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
            log(f"kill {delivered}: checkpoints/ holds {present or 'nothing yet'}")
            pointer = folder / "latest"
            if final and pointer.is_file() and pointer.read_text().strip() == final:
                break  # trained to the end: later kills would only hit start-up
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"the final run failed (exit {out.returncode}): {out.stderr[-2000:]}")
    return delivered


def step_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def same_run(run: Path, reference: Path) -> list[str]:
    """What differs between two finished runs (losses at every step, final weights); empty if nothing."""
    import torch

    from toolkit.checkpoint import load_megaforge_model

    problems = []
    a, b = step_losses(run), step_losses(reference)
    if a != b:
        first = min(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        problems.append(f"loss at step {first}: {a.get(first)} vs {b.get(first)}")
    wa = load_megaforge_model(run)[0].state_dict()
    wb = load_megaforge_model(reference)[0].state_dict()
    problems += [f"weights {k} differ" for k in wb if k not in wa or not torch.equal(wa[k], wb[k])]
    return problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs to deliver (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill delays")
    p.add_argument("--max-delay", type=float, default=None,
                   help="longest wait before a kill, s (default: half the reference run's wall time)")
    p.add_argument("--work-dir", default=None, help="where the two runs go (default: a temporary folder)")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE overrides for both runs (after --; default: "
                                                "trainer.max_steps=200 checkpoint.save_interval=4)")
    args = p.parse_args()
    args.overrides = args.overrides or SOAK
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="kill-soak-"))
    reference, soaked = work / "reference", work / "soaked"
    start = time.monotonic()
    out = subprocess.run(train_command(reference, args.overrides), cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        return 1
    wall = time.monotonic() - start
    final = (reference / "checkpoints" / "latest").read_text().strip()
    print(f"reference run: {wall:.1f} s to {final} → {reference}")
    delivered = kill_cycle(train_command(soaked, args.overrides), soaked, kills=args.kills,
                           max_delay=args.max_delay or wall / 2,
                           rng=random.Random(args.seed), final=final)
    problems = same_run(soaked, reference)
    print(f"kills survived: {delivered}; bitwise identical to the reference: {'yes' if not problems else 'NO'}")
    for line in problems[:10]:
        print(f"  {line}")
    return 0 if not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
