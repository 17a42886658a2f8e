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


def measure_parallel(cfg: RunConfig, world_size: int, rank: int = 0) -> dict[str, float]:
    """:func:`measure` for one rank of a multi-rank layout (tp, sequence parallel, FSDP2 on dp, a
    pipeline stage), in this one process: it joins PyTorch's fake process group (collectives move no
    data) as ``rank`` of ``world_size``, builds the runtime and model parts as training does (pipeline
    split → TP/SP plan → FSDP2, on meta), allocates that rank's shards as fake tensors and runs one
    step as the trainer does (forward and backward inside the loss context: loss_parallel when
    tp > 1). A pipeline stage runs one micro-batch: the first stage back-propagates a gradient of its
    output (what the next stage would send), a later stage starts from hidden states as it would
    receive them.

    DTensor's sharding propagation computes each op's global output shape in the active fake mode;
    under ours MemTracker would count those global-shaped tensors as memory, so the propagation is
    given a fake mode of its own (it then sees only the local shards' ops, as on a GPU)."""
    from unittest import mock

    import torch.distributed as dist
    import torch.distributed.tensor._sharding_prop as sharding_prop
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from toolkit.parallel.mesh import DistEnv
    from toolkit.parallel.runtime import setup
    from toolkit.training.run import build_model_parts

    spec = get_spec(cfg.model.family)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.trainer.precision == "bf16")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        runtime = setup(cfg, torch.device("cpu"), env=DistEnv(rank=rank, local_rank=0, world_size=world_size))
        (model,), pipeline, _ = build_model_parts(cfg, runtime, materialize_parts=False)
        with FakeTensorMode(allow_non_fake_inputs=True), \
                mock.patch.object(sharding_prop, "detect_fake_mode", lambda *args: None):
            model.to_empty(device="cpu")
            optimizer = build_optimizer(model, cfg.optim)
            batch = _batch(cfg)
            tracker = MemTracker()
            tracker.track_external(model, optimizer)
            with tracker:
                with runtime.loss_context():
                    with autocast:
                        loss = _forward(cfg, spec, model, pipeline, batch)
                    after_forward = _by_kind(tracker.get_tracker_snapshot("current"))
                    loss.backward(torch.ones_like(loss) if loss.dim() else None)
                backward_peak = _by_kind(tracker.get_tracker_snapshot("peak"))["Total"]
                optimizer.step()
                after_step = _by_kind(tracker.get_tracker_snapshot("current"))
                optimizer.zero_grad()
            peak = _by_kind(tracker.get_tracker_snapshot("peak"))["Total"]
    finally:
        dist.destroy_process_group()
    steady_peak = max(backward_peak + after_step["Optstate"], peak)
    return {"params": after_forward["Parameter"], "activations": after_forward["Activation"],
            "optimizer": after_step["Optstate"], "peak": steady_peak}


def _forward(cfg: RunConfig, spec, model: torch.nn.Module, pipeline, batch: dict) -> torch.Tensor:
    """The loss (one process, or the last pipeline stage), or a first stage's output hidden states."""
    if pipeline is None:
        return spec.objective(model, batch)
    args, kwargs, target = spec.pipeline_objective.inputs(batch)
    first, last = pipeline.stage_indices[0] == 0, pipeline.stage_indices[-1] == pipeline.num_stages - 1
    if not first:  # hidden states [b, s, h] as received from the previous stage
        args = (torch.randn(*args[0].shape, cfg.model.hidden_size, requires_grad=True),)
    output = model(*args, **kwargs)
    return pipeline.objective.loss(output, target) if last else output  # (the stage's fused loss, if any)
