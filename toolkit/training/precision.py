"""Mixed precision: autocast for bf16/fp16 and dynamic loss scaling for fp16."""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """``autocast()`` context for the forward pass and a loss scaler (active for fp16 only)."""

    def __init__(self, precision: str, device: torch.device, *, initial_loss_scale: float = 65536.0):
        self.precision = precision
        self.device = device
        self.dtype = DTYPES[precision]
        self.scaler = torch.amp.GradScaler(device.type, init_scale=initial_loss_scale,
                                           enabled=precision == "fp16")

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def state_dict(self) -> dict:
        return {"loss_scale": float(self.scaler.get_scale())} if self.scaler.is_enabled() else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler.is_enabled() and "loss_scale" in state:
            self.scaler.update(new_scale=float(state["loss_scale"]))
