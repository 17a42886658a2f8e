"""Where metrics go: metrics.jsonl, Weights & Biases (offline by default), a progress bar, a loss plot.

Only rank 0 logs; other ranks get :class:`NullLogger` objects from the trainer.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from toolkit.config import LoggingConfig

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsFile:
    """Appends one JSON object per logged step to ``run_dir/metrics.jsonl``.

    On resume, lines from steps after the resumed checkpoint (written before the run was killed)
    are dropped, so the file always describes one uninterrupted run.
    """

    def __init__(self, run_dir: Path, resume_step: int = 0):
        self.path = run_dir / METRICS_FILE
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


class WandbLogger:
    def __init__(self, cfg: LoggingConfig, run_dir: Path, config: dict):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]
        self.run = wandb.init(
            project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.wandb.name or run_dir.name,
            mode=cfg.wandb.mode, dir=str(run_dir), config=config, id=run_id, resume="allow",
        )

    def log(self, record: dict) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        self.run.finish()


def plot_losses(run_dir: Path) -> Path | None:
    """Draw train (and validation) loss from metrics.jsonl into ``run_dir/loss.png``."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    valid = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run_dir / PLOT_FILE
    fig.savefig(out)
    plt.close(fig)
    return out
