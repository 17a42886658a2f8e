"""PyTorch's own memory accounting of one training step, for comparison with the planner.

The model is built under ``FakeTensorMode`` (real shapes, no storage) and one step — forward under
the run's autocast, backward, foreach AdamW step — runs under
``torch.distributed._tools.mem_tracker.MemTracker``. The steady-state peak of later steps (optimizer
state allocated before the forward, gradients freed by ``zero_grad``) is the larger of the backward
peak plus that state and the optimizer step's peak — checked against two real steps once; one step
keeps the test fast. Also used by the docs' comparison table.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from toolkit.config import RunConfig
from toolkit.models.build import build_model
from toolkit.optim import build_optimizer
from toolkit.parallel.recompute import apply_recompute, transformer_blocks
from toolkit.registry import get_spec


def _batch(cfg: RunConfig) -> dict:
    b, s = cfg.trainer.micro_batch_size, cfg.model.seq_length
    if cfg.model.family == "bert":  # no padding mask: attention stays on the fused kernel
        return {"tokens": torch.randint(0, 100, (b, s)), "labels": torch.randint(0, 100, (b, s)),
                "token_types": torch.zeros(b, s, dtype=torch.long), "is_random": torch.zeros(b, dtype=torch.long)}
    return {"tokens": torch.randint(0, 100, (b, s + 1))}


def measure(cfg: RunConfig) -> dict[str, float]:
    """Bytes by category: ``params``, ``optimizer`` (AdamW state after the step), ``activations``
    (held after the forward), ``peak`` (the whole second step)."""
    objective = get_spec(cfg.model.family).objective
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.trainer.precision == "bf16")
    with FakeTensorMode():
        model = build_model(cfg.model)
        apply_recompute(transformer_blocks(model), cfg.model.recompute_granularity)
        optimizer = build_optimizer(model, cfg.optim)
        batch = _batch(cfg)
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        with tracker:
            with autocast:
                loss = objective(model, batch)
            after_forward = _by_kind(tracker.get_tracker_snapshot("current"))
            loss.backward()
            backward_peak = _by_kind(tracker.get_tracker_snapshot("peak"))["Total"]
            optimizer.step()
            after_step = _by_kind(tracker.get_tracker_snapshot("current"))
            optimizer.zero_grad()
        peak = _by_kind(tracker.get_tracker_snapshot("peak"))["Total"]
    # a later step also holds the optimizer state through forward and backward
    steady_peak = max(backward_peak + after_step["Optstate"], peak)
    return {"params": after_forward["Parameter"], "activations": after_forward["Activation"],
            "optimizer": after_step["Optstate"], "peak": steady_peak}


def _by_kind(snapshot: dict) -> dict[str, float]:
    (per_device,) = snapshot.values()
    return {getattr(k, "value", k): v for k, v in per_device.items()}


def measure_real(cfg: RunConfig) -> dict[str, float]:
    """The same categories for real tensors on the CPU (a tiny model): two steps, the second measured."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads would only contend
    try:
        return _measure_real(cfg)
    finally:
        torch.set_num_threads(threads)


def _measure_real(cfg: RunConfig) -> dict[str, float]:
    objective = get_spec(cfg.model.family).objective
    model = build_model(cfg.model)
    apply_recompute(transformer_blocks(model), cfg.model.recompute_granularity)
    optimizer = build_optimizer(model, cfg.optim)
    batch = _batch(cfg)
    objective(model, batch).backward()
    optimizer.step()
    optimizer.zero_grad()
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        loss = objective(model, batch)
        after_forward = _by_kind(tracker.get_tracker_snapshot("current"))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peak = _by_kind(tracker.get_tracker_snapshot("peak"))["Total"]
    return {"activations": after_forward["Activation"], "peak": peak}
