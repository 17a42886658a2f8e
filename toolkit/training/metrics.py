"""Throughput and model-FLOP utilization."""

from __future__ import annotations

import time
from functools import lru_cache

import torch

from toolkit.config import ModelConfig

# Dense bf16 / fp32 peaks (FLOP/s) of common accelerators, from their vendors' data sheets.
GPU_PEAKS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12},
}


def flops_per_token(cfg: ModelConfig, num_params_without_positions: int) -> float:
    """Training FLOPs per token: 6·N + 12·L·h·s (weights, forward + backward, plus attention scores)."""
    return 6.0 * num_params_without_positions + 12.0 * cfg.num_layers * cfg.hidden_size * cfg.seq_length


@lru_cache(maxsize=None)
def measured_matmul_peak(device_type: str, precision: str) -> float:
    """FLOP/s of a square matmul on this device (the CPU's practical peak, measured once)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    n = 1024
    a = torch.randn(n, n, dtype=dtype, device=device_type)
    b = torch.randn(n, n, dtype=dtype, device=device_type)
    for _ in range(3):
        a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.3:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)


def peak_flops(device: torch.device, precision: str, override_tflops: float | None = None) -> float:
    """Per-device peak FLOP/s used for MFU: the override, a data-sheet figure, or a measurement."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in GPU_PEAKS.items():
            if key in name:
                return peaks[precision]
    return measured_matmul_peak(device.type, precision)
