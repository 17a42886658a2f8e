"""Feed-forward blocks: plain (GELU/ReLU) and gated (SwiGLU, GeGLU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "swiglu": F.silu,  # gated: silu(gate(x)) * fc1(x)
    "geglu": lambda x: F.gelu(x, approximate="tanh"),  # gated: gelu(gate(x)) * fc1(x), as T5 v1.1
}
GATED = ("swiglu", "geglu")


class MLP(nn.Module):
    """``fc2(act(fc1(x)))``, or with a gate: ``fc2(act(gate(x)) * fc1(x))``.

    Under tensor parallelism ``fc1``/``gate`` are column-parallel and ``fc2`` row-parallel.
    """

    def __init__(self, *, hidden_size: int, ffn_hidden_size: int, activation: str, bias: bool,
                 dropout: float = 0.0):
        super().__init__()
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        self.fc1 = nn.Linear(hidden_size, ffn_hidden_size, bias=bias)
        self.gate = nn.Linear(hidden_size, ffn_hidden_size, bias=bias) if activation in GATED else None
        self.fc2 = nn.Linear(ffn_hidden_size, hidden_size, bias=bias)
        self.dropout = nn.Dropout(dropout)  # T5 applies dropout inside the MLP; GPT/BERT pass 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            h = self.act(self.gate(x)) * self.fc1(x)
        else:
            h = self.act(self.fc1(x))
        return self.fc2(self.dropout(h))
