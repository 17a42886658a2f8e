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
        """The loss scaler's state (scale and growth tracker; JSON-serializable), empty unless fp16."""
        if not self.scaler.is_enabled():
            return {}
        return {k: (float(v) if isinstance(v, float) else int(v)) for k, v in self.scaler.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the scaler so a resumed fp16 run scales (and grows the scale) exactly as before."""
        if not self.scaler.is_enabled() or not state:
            return
        if "loss_scale" in state:  # checkpoints written before the growth tracker was saved
            state = {**self.scaler.state_dict(), "scale": float(state["loss_scale"])}
        self.scaler.load_state_dict(state)
