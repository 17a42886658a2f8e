"""Where metrics go: metrics.jsonl, Weights & Biases (offline by default), TensorBoard (off by
default), a progress bar, a loss plot.

Only the logging rank (rank 0) creates these loggers; the trainer gives other ranks none.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from toolkit.config import LoggingConfig
from toolkit.errors import ConfigError

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tensorboard"


class MetricsFile:
    """Appends one JSON object per logged step to ``run_dir/metrics.jsonl``.

    On resume, lines from steps after the resumed checkpoint (written before the run was killed)
    are dropped, so the file always describes one uninterrupted run. Every line is strict JSON: a
    value that is not finite is written as the string ``"nan"``, ``"inf"`` or ``"-inf"`` (which
    Python's ``float()`` reads back).
    """

    def __init__(self, run_dir: Path, resume_step: int = 0):
        self.path = run_dir / METRICS_FILE
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(json_safe(record), allow_nan=False) + "\n")


def json_safe(record: dict) -> dict:
    """``record`` with non-finite floats as the strings "nan", "inf", "-inf" (strict JSON)."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


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


def tensorboard_dir(cfg: LoggingConfig, run_dir: Path) -> Path:
    """Where the event files go: ``logging.tensorboard.dir`` or ``run_dir/tensorboard``."""
    return Path(cfg.tensorboard.dir) if cfg.tensorboard.dir else run_dir / TENSORBOARD_DIR


def scalars(record: dict) -> dict[str, float]:
    """The values of a metrics record that are TensorBoard scalars: every finite int or float
    except ``step`` (the x axis). Booleans, strings, None and NaN/inf values are left out."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardLogger:
    """Writes each metrics record's scalars (:func:`scalars`) as ``add_scalar(key, value, step)`` under
    the same keys as metrics.jsonl, to :func:`tensorboard_dir`.

    Every record is flushed to disk as it is logged, as metrics.jsonl is, so a killed run's event file
    holds everything its metrics.jsonl does. On resume the writer purges events from steps after the
    resumed checkpoint (TensorBoard's ``purge_step``), mirroring :class:`MetricsFile`.
    """

    def __init__(self, cfg: LoggingConfig, run_dir: Path, resume_step: int = 0):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("logging.tensorboard.enabled=true needs the tensorboard package: "
                              "pip install tensorboard (or set logging.tensorboard.enabled=false)") from None
        self.log_dir = tensorboard_dir(cfg, run_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=resume_step + 1 if resume_step else None)

    def log(self, record: dict) -> None:
        step = record["step"]
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def plot_losses(run_dir: Path) -> Path | None:
    """Draw train (and validation) loss from metrics.jsonl into ``run_dir/loss.png``."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [(r["step"], float(r["loss"])) for r in records if "loss" in r]
    valid = [(r["step"], float(r["val_loss"])) for r in records if "val_loss" in r]
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
