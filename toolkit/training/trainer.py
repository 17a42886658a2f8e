"""The training loop: gradient accumulation, clipping, mixed precision, evaluation, checkpoints, logging.

The trainer receives built objects — the run config, this rank's model parts, their optimizers, the
objective, datasets, the parallel runtime and the run directory — and never reads YAML. One code path
serves one process and many: a single process is a world of size 1 of the same runtime. The model
is always a list of parts (one, or this rank's pipeline stages), driven by one
:class:`PartOptimizers`; under pipeline parallelism the :class:`~toolkit.parallel.pipeline.Pipeline`
runs forward and backward (one schedule step over all micro-batches), otherwise the trainer loops
over the micro-batches itself. It resumes exactly: the LR is a function of the step, dropout is
reseeded from (seed, step), and the sampler restarts at the consumed sample count.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from toolkit.checkpoint import CheckpointManager
from toolkit.checkpoint.native import has_frozen
from toolkit.config import RunConfig, to_yaml
from toolkit.data.sampler import PretrainingSampler
from toolkit.errors import ConfigError, TrainingDiverged
from toolkit.models.common.attention import CUDA_ONLY_BACKENDS, sdpa_backend
from toolkit.optim import lr_at, set_lr
from toolkit.parallel.pipeline import Pipeline
from toolkit.parallel.runtime import ParallelRuntime
from toolkit.training.batch_wait import TimedBatches
from toolkit.training.host_memory import GIB, HeapWatch
from toolkit.training.loggers import MetricsFile, TensorBoardLogger, WandbLogger, plot_losses
from toolkit.training.metrics import peak_flops
from toolkit.training.precision import Precision

logger = logging.getLogger(__name__)

Objective = Callable[[nn.Module, dict], torch.Tensor]  # (model, batch on device) -> mean loss


class PartOptimizers:
    """One optimizer per model part of this rank (one part, or one per pipeline stage), driven as one
    (``step``, ``zero_grad``, ``param_groups`` for the LR schedule and the loss scaler); checkpoints
    see the list."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    consumed_samples: int = 0  # training samples consumed over all data-parallel ranks


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # train loss of each step run in this process
    val_loss: float | None = None
    metrics_path: Path | None = None
    plot_path: Path | None = None
    preempted: str | None = None  # the signal that stopped the run early (a checkpoint was saved), if any
    skipped_steps: int = 0  # steps whose update was skipped for a non-finite loss or gradient norm (this process)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a loss that may be a (replicated) DTensor under tensor parallelism."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def step_seed(seed: int, step: int) -> int:
    """Seed of the dropout RNG for one optimizer step (independent of where a run was resumed)."""
    return (seed * 1_000_003 + step * 7919 + 17) % (2**63 - 1)


class Trainer:
    def __init__(
        self,
        *,
        cfg: RunConfig,  # the resolved run config (trainer, optim, checkpoint and logging sections)
        model_parts: list[nn.Module],  # this rank's model: one part, or its pipeline stages (plain modules)
        optimizers: PartOptimizers,  # one optimizer per part
        objective: Objective,  # (part, batch on device) -> mean loss; unused under pipeline parallelism
        train_dataset: Dataset,
        valid_dataset: Dataset | None,
        runtime: ParallelRuntime,  # mesh, ranks and collective helpers (a world of size 1 in one process)
        run_dir: Path,  # where checkpoints/, metrics.jsonl and loss.png go
        flops_per_token: float,  # training FLOPs per token of the whole model (for MFU)
        tokens_per_sample: int,  # tokens one sample trains on (for tokens/s)
        pipeline: Pipeline | None = None,  # drives model_parts when pipeline_model_parallel_size > 1
        evaluator: Callable[[list[nn.Module]], dict] | None = None,  # validation metrics (fine-tuning)
        metric_for_best: str | None = None,  # with evaluator: the metric checkpoints/best follows
        fresh_head: bool = False,  # init_from: leave the source's task head out (another task or label set)
    ):
        self.model_parts, self.optimizers, self.objective = list(model_parts), optimizers, objective
        self.train_dataset, self.valid_dataset = train_dataset, valid_dataset
        self.runtime, self.pipeline = runtime, pipeline
        self.cfg, self.optim_cfg, self.ckpt_cfg, self.log_cfg = cfg.trainer, cfg.optim, cfg.checkpoint, cfg.logging
        self.config_dict = OmegaConf.to_container(OmegaConf.create(to_yaml(cfg)))
        self.run_dir, self.device = Path(run_dir), runtime.device
        self.flops_per_token, self.seq_length = flops_per_token, tokens_per_sample
        self.layout = runtime.layout
        self.dp_rank, self.dp_size = runtime.dp_rank, runtime.dims.dp
        self.is_logging_rank = runtime.is_logging_rank
        self.precision = Precision(cfg.trainer.precision, self.device, initial_loss_scale=cfg.trainer.initial_loss_scale)
        self.attention_backend = cfg.model.attention_backend
        if self.attention_backend in CUDA_ONLY_BACKENDS and self.device.type != "cuda":
            raise ConfigError(f"model.attention_backend={self.attention_backend} is a CUDA kernel and this run is on "
                              f"{self.device.type}; use auto, flash or math")
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last,
                                             verify_hashes=cfg.checkpoint.verify_hashes)
        self.num_microbatches = cfg.trainer.global_batch_size // (cfg.trainer.micro_batch_size * self.dp_size)
        self.state = TrainState()
        self.evaluator, self.metric_for_best = evaluator, metric_for_best
        self.finetuning = cfg.task.type != "none"  # a task head on a pretrained encoder
        self.best: float | None = None  # best value of metric_for_best so far
        self.fresh_head = fresh_head
        self.data_workers = cfg.data.num_workers  # loader processes for the training batches
        # host RSS after each step while glibc keeps freed memory (trainer.reuse_host_memory, CPU runs)
        self.heap_watch = HeapWatch() if cfg.trainer.reuse_host_memory and self.device.type == "cpu" else None
        self.skipped_in_a_row = 0  # consecutive steps skipped for a non-finite loss or gradient norm
        self.skipped_total = 0
        self.signal_received: str | None = None  # set by the SIGTERM / trainer.exit_signal handler
        self.stop_signal: str | None = None  # a signal any rank received, agreed at the end of a step

    # ---- checkpoints ---------------------------------------------------------------------
    def resume(self) -> bool:
        """Load the last complete checkpoint of the run directory, if any. True when resumed."""
        self.checkpoints.clean_partial()
        latest, passed_over = self.checkpoints.latest_intact() if self.ckpt_cfg.resume else (None, [])
        if passed_over and self.is_logging_rank:
            logger.warning(f"megaforge: warning: damaged checkpoint passed over ({'; '.join(passed_over)}); "
                           f"resuming from {latest.name}")
        best = self.checkpoints.best_state() if latest is not None else None
        self.best = best.get("best_metric") if best else None
        if latest is None:
            self._load_init_from()
            return False
        if has_frozen(self.model_parts):  # a LoRA run's checkpoints hold the adapters: the base comes first
            self._load_init_from()
        state = self.checkpoints.load(latest, self.model_parts, self.optimizers.optimizers, verified=True)
        self.state = TrainState(step=int(state["step"]), consumed_samples=int(state["consumed_samples"]))
        self.precision.load_state_dict(state.get("precision", {}))
        if self.is_logging_rank:
            saved = state.get("layout", {})
            change = f" (saved under {saved}, now {self.layout})" if saved and saved != self.layout else ""
            if state.get("repadded"):
                change += f"; vocabulary padding re-laid in {len(state['repadded'])} tensors"
            logger.info(f"resumed from {latest} at step {self.state.step}{change}")
        return True

    def _load_init_from(self) -> None:
        """A new run with ``checkpoint.init_from``: load those weights (any layout; see run.py, which
        resolved the source to a megaforge checkpoint folder). Optimizer, step and data start fresh."""
        if not self.ckpt_cfg.init_from:
            return
        source = Path(self.ckpt_cfg.init_from)
        # a fine-tune takes the encoder from a pretrained (or headless) model; its task head starts fresh
        skip = tuple(p for part in self.model_parts for p in getattr(part, "HEAD_PREFIXES", ())) if self.fresh_head else ()
        lora = has_frozen(self.model_parts)  # the base of a LoRA run: frozen weights loaded, adapters start fresh
        state = self.checkpoints.load(source, self.model_parts, None, partial=self.finetuning or lora, skip=skip,
                                      frozen=lora)
        if self.is_logging_rank:
            padded = f"; vocabulary padding re-laid in {len(state['repadded'])} tensors" if state.get("repadded") else ""
            fresh = [k for k in state.get("not_loaded") or [] if ".lora_" not in k]
            fresh_note = f"; initialized fresh (not in the source): {', '.join(fresh)}" if fresh else ""
            if lora:
                fresh_note += "; LoRA adapters start fresh on the frozen base"
            logger.info(f"initialized the weights from {source}{padded}{fresh_note}")

    def save(self) -> Path:
        """Write ``step_<N>`` (collective). Weights that are not finite are never saved: the run stops
        with :class:`TrainingDiverged` and ``latest`` keeps naming the last good checkpoint."""
        bad = [name for part in self.model_parts for name, p in part.named_parameters()
               if not bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())]
        if self.runtime.any_rank(bool(bad))[0]:
            where = bad[0] if bad else "on another rank"
            raise TrainingDiverged(f"the weights are not finite at step {self.state.step} ({where}); not saved. "
                                   f"{self._last_good()}")
        trainer_state = {
            "step": self.state.step,
            "consumed_samples": self.state.consumed_samples,
            "layout": self.layout,
            "precision": self.precision.state_dict(),
            "seed": self.cfg.seed,
        }
        return self.checkpoints.save(self.state.step, self.model_parts, self.optimizers.optimizers, trainer_state,
                                     after_write=lambda: self.runtime.fault_hook(self.state.step, "save"))

    def _last_good(self) -> str:
        """Where the user goes back to after a divergence: the last checkpoint ``latest`` names."""
        pointer = self.checkpoints.folder / "latest"
        if pointer.is_file():
            return (f"The last good checkpoint is {self.checkpoints.folder / pointer.read_text().strip()}: lower "
                    "optim.lr or set optim.clip_grad, then run the same command to resume from it")
        return "No checkpoint was saved before: lower optim.lr or set optim.clip_grad and start again"

    # ---- signals -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _stop_signals(self):
        """While training, SIGTERM (and ``trainer.exit_signal``) only set a flag: the current step
        finishes, the ranks agree (:meth:`_optimizer_step`), a checkpoint is saved and the run exits."""
        names = ["SIGTERM", *([self.cfg.exit_signal] if self.cfg.exit_signal else [])]
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, _frame):
            name = signal.Signals(signum).name
            if self.signal_received is None:
                self.signal_received = name
                logger.warning(f"megaforge: rank {self.runtime.rank} received {name}: saving a checkpoint after "
                               "this step, then exiting")

        previous = {name: signal.signal(getattr(signal, name), handler) for name in dict.fromkeys(names)}
        try:
            yield
        finally:
            for name, old in previous.items():
                signal.signal(getattr(signal, name), old)

    # ---- data ----------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, consumed: int, total: int) -> DataLoader:
        sampler = PretrainingSampler(
            total_samples=total, consumed_samples=consumed, micro_batch_size=self.cfg.micro_batch_size,
            data_parallel_rank=self.dp_rank, data_parallel_size=self.dp_size,
        )
        # data.num_workers loader processes for training (each sample is a pure function of its index, so the
        # batches are the same with any number); evaluation, one short pass, loads in this process
        workers = self.data_workers if dataset is self.train_dataset else 0
        extra = dict(prefetch_factor=2, persistent_workers=True) if workers > 0 else {}
        return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=self.device.type == "cuda",
                          **extra)

    def _to_device(self, batch: dict) -> dict:
        return {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}

    # ---- one step ------------------------------------------------------------------------
    def _compute(self) -> contextlib.ExitStack:
        """The forward pass's context: autocast (bf16/fp16) and the attention kernel (model.attention_backend)."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.precision.autocast())
        stack.enter_context(sdpa_backend(self.attention_backend))
        return stack

    def train_step(self, batches) -> tuple[float, float, bool]:
        """Forward/backward over the micro-batches of one global batch, then one optimizer step
        (skipped when the loss or gradient norm is not finite): (loss, gradient norm, skipped)."""
        # dropout differs across data-parallel ranks and pipeline stages (rank 0 keeps the
        # single-process stream; the tensor-parallel ranks of a stage share theirs)
        torch.manual_seed(step_seed(self.cfg.seed, self.state.step) + self.dp_rank
                          + self.runtime.pp_rank * self.dp_size)
        set_lr(self.optimizers, lr_at(self.state.step, self.optim_cfg, self.cfg.max_steps))
        if self.pipeline is not None:
            loss = self._pipeline_forward_backward(batches)
            return self._optimizer_step(loss, exclude_from_norm=self.pipeline.norm_exclusions())
        return self._optimizer_step(self._forward_backward(batches))

    def _forward_backward(self, batches) -> torch.Tensor:
        """Each micro-batch through the objective; gradients reduced over dp after the last one. The
        mean loss stays on the device (read back with the gradient norm, once per step)."""
        model, scaler = self.model_parts[0], self.precision.scaler
        total = torch.zeros((), device=self.device)
        for i in range(self.num_microbatches):
            batch = self._to_device(next(batches))
            self.runtime.set_grad_sync(model, i == self.num_microbatches - 1)
            with self.runtime.loss_context():
                with self._compute():
                    loss = self.objective(model, batch)
                scaler.scale(loss / self.num_microbatches).backward()
            total += _plain(loss).detach()
        return self.runtime.mean_over_dp(total) / self.num_microbatches

    def _pipeline_forward_backward(self, batches) -> torch.Tensor:
        """One schedule step over all micro-batches: gradients averaged over micro-batches and dp."""
        pipe, scaler = self.pipeline, self.precision.scaler
        args, kwargs, target = self._pipeline_batch([next(batches) for _ in range(self.num_microbatches)])
        if scaler.is_enabled():  # only the last stage scales a loss; every stage unscales its gradients
            scaler.scale(torch.zeros((), device=self.device))
        scale = float(scaler.get_scale()) if scaler.is_enabled() else 1.0  # the losses come back scaled
        with self.runtime.loss_context(), self._compute():
            losses = pipe.step(args, kwargs, target, loss_fn=self._pipeline_loss,
                               num_microbatches=self.num_microbatches)
        pipe.sync_shared_grads()  # tied embeddings: first and last stage sum their gradients
        return self._pipeline_mean(losses, scale=scale)

    def _optimizer_step(self, loss: torch.Tensor, exclude_from_norm=()) -> tuple[float, float, bool]:
        """Unscale (fp16), clip to the global gradient norm, step and zero the gradients: (loss, norm,
        skipped), the loss and norm read back to the host together, the step's one wait on the device.

        A non-finite loss or gradient norm skips the update on every rank (fp16: an overflow in the
        gradients is the loss scaler's to skip and count; a non-finite loss is ours). The same
        all-reduce shares whether any rank received a stop signal."""
        scaler = self.precision.scaler
        scaler.unscale_(self.optimizers)
        if scaler.is_enabled():  # fp16: every rank skips the step if any saw inf
            self.runtime.sync_found_inf(scaler, self.optimizers)
        params = [p for part in self.model_parts for p in part.parameters() if p.grad is not None]
        clip = self.optim_cfg.clip_grad if self.optim_cfg.clip_grad > 0 else float("inf")
        grad_norm = self.runtime.clip_grad_norm_(params, clip, exclude_from_norm=exclude_from_norm)
        bad = ~torch.isfinite(loss)
        if not scaler.is_enabled():
            bad = bad | ~torch.isfinite(grad_norm)
        loss, grad_norm, skip, stop = self.runtime.read_step(loss, grad_norm, bad, self.signal_received is not None)
        if stop and self.stop_signal is None:
            self.stop_signal = self.signal_received or "a signal on another rank"
        if not skip:
            scaler.step(self.optimizers)
        scaler.update()
        self.optimizers.zero_grad(set_to_none=True)
        return loss, grad_norm, skip

    def _pipeline_batch(self, micro_batches: list[dict]) -> tuple[tuple, dict, torch.Tensor]:
        """Micro-batches stacked along dim 0 (the schedule splits them again), as (args, kwargs, target)."""
        batch = {k: (torch.cat([b[k] for b in micro_batches]) if torch.is_tensor(micro_batches[0][k])
                     else micro_batches[0][k]) for k in micro_batches[0]}  # [n_micro × micro_batch_size, ...]
        return self.pipeline.objective.inputs(self._to_device(batch))

    def _pipeline_loss(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        return self.precision.scaler.scale(self.pipeline.objective.loss(output, target))

    def _pipeline_mean(self, losses: list[torch.Tensor] | None, *, scale: float = 1.0) -> torch.Tensor:
        """Mean of the last stage's micro-batch losses, then over dp, on every rank."""
        total = torch.zeros((), device=self.device)
        for loss in losses or []:  # summed in micro-batch order, as _forward_backward does
            total += _plain(loss).detach().float() / scale
        total = self.runtime.mean_over_dp(total / max(1, len(losses or [])))
        return self.pipeline.from_last_stage(total)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over the first ``eval_iters`` micro-batches of the validation set."""
        if self.valid_dataset is None or self.cfg.eval_iters <= 0:
            return None
        total = self.cfg.eval_iters * self.cfg.micro_batch_size * self.dp_size
        total = min(total, len(self.valid_dataset))
        if total < self.cfg.micro_batch_size * self.dp_size:
            return None
        for part in self.model_parts:
            part.eval()
        try:
            if self.pipeline is not None:
                micro_batches = list(self._loader(self.valid_dataset, 0, total))
                args, kwargs, target = self._pipeline_batch(micro_batches)
                with self.runtime.loss_context(), self._compute():
                    stage_losses = self.pipeline.evaluate(args, kwargs, target, loss_fn=self.pipeline.objective.loss,
                                                          num_microbatches=len(micro_batches))
                return self._pipeline_mean(stage_losses).item()
            losses = []
            for batch in self._loader(self.valid_dataset, 0, total):
                with self.runtime.loss_context(), self._compute():
                    losses.append(_plain(self.objective(self.model_parts[0], self._to_device(batch))).float())
            return self.runtime.mean_over_dp(torch.stack(losses).mean()).item()
        finally:
            for part in self.model_parts:
                part.train()

    def _validate_task(self, record: dict) -> None:
        """Task metrics on the validation set into ``record`` (``val_<metric>``); a new best value of
        ``metric_for_best`` saves ``checkpoints/best``."""
        scores = self.evaluator(self.model_parts)
        record.update({f"val_{k}": v for k, v in scores.items() if isinstance(v, (int, float))})
        if self.metric_for_best not in scores:
            return
        value = float(scores[self.metric_for_best])
        if not math.isfinite(value):
            return
        lower_is_better = self.metric_for_best in ("mse", "loss")
        if self.best is None or (value < self.best if lower_is_better else value > self.best):
            self.best = value
            self.checkpoints.save_best(self.model_parts, {"step": self.state.step, "best_metric": value,
                                                          "metric": self.metric_for_best, "layout": self.layout})
            if self.is_logging_rank:
                logger.info(f"step {self.state.step}: {self.metric_for_best}={value:.4f}, the best so far → "
                            f"{self.checkpoints.folder / 'best'}")

    def _on_skipped_step(self, loss: float, grad_norm: float, record: dict, metrics) -> None:
        """Log a step whose update was skipped; after ``trainer.max_skipped_steps`` in a row, stop."""
        step, limit = self.state.step, self.cfg.max_skipped_steps
        if self.is_logging_rank:
            logger.warning(f"megaforge: warning: step {step}: loss {loss:.4g}, gradient norm {grad_norm:.4g}: not "
                           f"finite, update skipped ({self.skipped_in_a_row} in a row; the run stops at "
                           f"trainer.max_skipped_steps={limit})")
        if self.skipped_in_a_row >= limit:
            if metrics is not None:
                metrics.log(record)
            raise TrainingDiverged(f"training diverged: the loss or gradient norm was not finite for {limit} steps in "
                                   f"a row (steps {step - limit + 1}-{step}); stopped without saving. "
                                   f"{self._last_good()}")

    # ---- the loop ------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        with self._stop_signals():
            return self._fit()

    def _fit(self) -> TrainResult:
        self.resume()
        cfg = self.cfg
        total_samples = cfg.max_steps * cfg.global_batch_size
        # batches come copied to the device; the time the step waits for them is logged as data_wait_s
        batches = TimedBatches(self._loader(self.train_dataset, self.state.consumed_samples, total_samples),
                               self._to_device)
        interval_wait = interval_time = 0.0  # data wait and step time since the last metrics record
        metrics = MetricsFile(self.run_dir, self.state.step) if self.is_logging_rank else None
        tensorboard = (TensorBoardLogger(self.log_cfg, self.run_dir, self.state.step)
                       if self.is_logging_rank and self.log_cfg.tensorboard.enabled else None)
        wandb = (WandbLogger(self.log_cfg, self.run_dir, self.config_dict)
                 if self.is_logging_rank and self.log_cfg.wandb.enabled else None)
        peak = peak_flops(self.device, cfg.precision, self.log_cfg.peak_tflops)
        world = max(1, self.layout.get("tp", 1) * self.layout.get("pp", 1) * self.layout.get("dp", 1))
        bar = tqdm(total=cfg.max_steps, initial=self.state.step, desc="train", dynamic_ncols=True, mininterval=1.0,
                   disable=not (self.is_logging_rank and self.log_cfg.progress_bar))
        result = TrainResult(run_dir=self.run_dir, steps=self.state.step)
        for part in self.model_parts:
            part.train()
        tokens_per_step = cfg.global_batch_size * self.seq_length
        while self.state.step < cfg.max_steps:
            self.runtime.fault_hook(self.state.step, parts=self.model_parts)
            start = time.perf_counter()
            waited = batches.seconds
            loss, grad_norm, skipped = self.train_step(batches)
            elapsed = time.perf_counter() - start
            interval_wait += batches.seconds - waited
            interval_time += elapsed
            lr = lr_at(self.state.step, self.optim_cfg, cfg.max_steps)
            self.state.step += 1
            self.state.consumed_samples += cfg.global_batch_size
            result.losses.append(loss)
            tps = tokens_per_step / elapsed
            mfu = self.flops_per_token * tps / (peak * world)
            record: dict[str, Any] = {"step": self.state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                      "tokens_per_sec": tps, "mfu": mfu, "step_time": elapsed,
                                      "consumed_samples": self.state.consumed_samples,
                                      "data_wait_s": interval_wait, "data_wait_frac": interval_wait / interval_time}
            if self.precision.scaler.is_enabled():
                record["loss_scale"] = float(self.precision.scaler.get_scale())
            rss = self.heap_watch.after_step() if self.heap_watch else None
            if rss is not None:
                record["host_rss_gib"] = rss / GIB
            self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
            self.skipped_total += skipped
            if self.skipped_total:
                record.update(skipped=skipped, skipped_steps=self.skipped_total)
            if skipped:
                self._on_skipped_step(loss, grad_norm, record, metrics)
            last = self.state.step == cfg.max_steps
            if cfg.eval_interval > 0 and (self.state.step % cfg.eval_interval == 0 or last):
                val = self.evaluate()
                if val is not None:
                    record["val_loss"] = val
                    record["val_ppl"] = math.exp(min(val, 50.0))
                    result.val_loss = val
                if self.evaluator is not None:
                    self._validate_task(record)
            logged = self.state.step % cfg.log_interval == 0 or last or "val_loss" in record
            if logged:
                interval_wait = interval_time = 0.0  # the next record covers the steps after this one
            if self.is_logging_rank and logged:
                metrics.log(record)
                if wandb:
                    wandb.log(record)
                if tensorboard:
                    tensorboard.log(record)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", mfu=f"{100 * mfu:.1f}%",
                            refresh=False)
            bar.update(1)
            save_every = self.ckpt_cfg.save_interval
            exiting = bool(cfg.exit_interval) and self.state.step % cfg.exit_interval == 0 and not last
            signalled = self.stop_signal is not None and not last
            # no periodic save while updates are being skipped: the weights are the last good step's anyway,
            # and saving them again would only rotate good checkpoints out (keep_last)
            periodic = save_every > 0 and self.state.step % save_every == 0 and not self.skipped_in_a_row
            if last or exiting or signalled or periodic:
                self.save()
            if exiting or signalled:
                why = f"{self.stop_signal} received" if signalled else f"exit_interval={cfg.exit_interval}"
                if self.is_logging_rank:
                    logger.info(f"{why}: saved and stopping at step {self.state.step}; run the same command again "
                                "to continue")
                result.preempted = self.stop_signal if signalled else None
                break
        bar.close()
        result.steps, result.skipped_steps = self.state.step, self.skipped_total
        if self.is_logging_rank:
            result.metrics_path = metrics.path
            if self.log_cfg.plot:
                result.plot_path = plot_losses(self.run_dir)
        if wandb:
            wandb.close()
        if tensorboard:
            tensorboard.close()
        return result
