"""AdamW kernel choice (``optim.implementation``) and loading optimizer state across kernel choices."""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
from pathlib import Path

import pytest
import torch
from torch import nn

from toolkit.config import OptimConfig
from toolkit.optim import build_optimizer, kernels_kept, use_fused
from toolkit.planning.memory import FOREACH_TEMP_BYTES


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))


def _step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    torch.manual_seed(seed)
    model(torch.randn(5, 8)).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_auto_is_fused_on_cpu_and_the_names_are_honoured():
    params = list(_model().parameters())
    assert use_fused(OptimConfig(), params)
    assert not use_fused(OptimConfig(implementation="foreach"), params)
    assert use_fused(OptimConfig(implementation="fused"), params)
    assert not use_fused(OptimConfig(), [torch.empty(2, device="meta")])  # no fused kernel there
    opt = build_optimizer(_model(), OptimConfig())
    assert all(g["fused"] and not g["foreach"] for g in opt.param_groups)


def test_state_from_a_foreach_run_loads_into_a_fused_one_and_continues_alike():
    a = _model()
    opt_a = build_optimizer(a, OptimConfig(implementation="foreach"))
    for s in range(3):
        _step(a, opt_a, s)
    b = copy.deepcopy(a)
    opt_b = build_optimizer(b, OptimConfig(implementation="fused"))
    with kernels_kept(opt_b):
        opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # the writer's groups: foreach=True, fused=None
    assert all(g["fused"] and not g["foreach"] for g in opt_b.param_groups)
    steps = [opt_b.state[p]["step"] for p in b.parameters()]
    assert all(t.dtype == torch.float32 and float(t) == 3.0 for t in steps)
    _step(a, opt_a, 3)
    _step(b, opt_b, 3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)  # same AdamW, another kernel


def _step_peak_mib(implementation: str) -> float:
    """Peak RSS growth (MiB) of one AdamW step over 64 MiB of fp32 parameters, state already made."""
    params = [nn.Parameter(torch.randn(2048, 2048)) for _ in range(4)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = build_optimizer(nn.ParameterList(params), OptimConfig(implementation=implementation, weight_decay=0.0))
    opt.step()  # the moments are allocated here
    # hand freed heap pages back first: memory earlier tests freed stays resident, and a step reusing it
    # would not grow the RSS (48 of 64 MiB measured in a full-suite run)
    ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # VmHWM := VmRSS
    before = _status_mib("VmRSS")
    opt.step()
    return _status_mib("VmHWM") - before


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key + ":")) / 1024


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_fused_step_works_in_place_foreach_needs_a_copy_as_the_planner_counts():
    assert _step_peak_mib("fused") < 8  # nothing beyond noise (64 MiB of parameters)
    assert _step_peak_mib("foreach") > 0.9 * 64 * FOREACH_TEMP_BYTES / 4  # one fp32 intermediate per parameter
