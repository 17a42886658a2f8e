"""LoRA (low-rank adapters, Hu et al. 2021) on the linears of the shared attention and MLP blocks.

``peft.method: lora`` replaces each targeted ``nn.Linear`` with a :class:`LoRALinear`::

    y = W x + b + (alpha / r) · B(A(dropout(x)))      A: [r, in], B: [out, r], B starts at zero

The base weight keeps its name (``layers.0.attn.q.weight``), so a pretrained checkpoint
(``checkpoint.init_from``) loads into it as into the plain model; the adapters add
``….lora_A.weight`` and ``….lora_B.weight``. Everything else is frozen except a task head
(``HEAD_PREFIXES``: BERT's ``classifier``, what ``peft`` keeps trainable as ``modules_to_save``).

``A`` starts normal with the variance of ``peft``'s default (kaiming-uniform, a=√5: 1/(3·in)),
keyed by its name and ``trainer.seed`` through :mod:`toolkit.models.common.init` like every other
parameter, so every parallel layout starts bitwise equal. Under tensor parallelism the adapters
split to match their base (:mod:`toolkit.parallel.lora`).

Target names: megaforge's own (``q k v out fc1 gate fc2``) or a family's Hugging Face names
(:data:`HF_NAMES`); the GPT-2 and BERT names that cover several linears map to all of them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.config import PeftConfig
from toolkit.errors import ConfigError
from toolkit.models.common.attention import Attention
from toolkit.models.common.init import ZEROS, ParamInit, full_init, normal
from toolkit.models.common.mlp import MLP
from toolkit.parallel.lora import lora_style

#: megaforge's names of the linears LoRA can adapt (children of Attention and MLP)
OWN_NAMES = ("q", "k", "v", "out", "fc1", "gate", "fc2")
#: Hugging Face module names → megaforge's (Llama, GPT-2, BERT, T5)
HF_NAMES: dict[str, tuple[str, ...]] = {
    "q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "o_proj": ("out",),
    "gate_proj": ("gate",), "up_proj": ("fc1",), "down_proj": ("fc2",),  # Llama
    "c_attn": ("q", "k", "v"), "c_proj": ("out", "fc2"), "c_fc": ("fc1",),  # GPT-2 (Conv1D)
    "query": ("q",), "key": ("k",), "value": ("v",), "dense": ("out", "fc1", "fc2"),  # BERT
    "o": ("out",), "wi": ("fc1",), "wi_0": ("gate",), "wi_1": ("fc1",), "wo": ("fc2",),  # T5
}


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` (its ``weight``/``bias`` keep their names) plus a scaled low-rank update."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, rank: int, alpha: float,
                 dropout: float = 0.0, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False  # merge_lora folded B·A into weight

    @classmethod
    def wrap(cls, base: nn.Linear, cfg: PeftConfig) -> "LoRALinear":
        """A LoRA linear holding ``base``'s own weight and bias parameters (same device, frozen)."""
        w = base.weight
        new = cls(base.in_features, base.out_features, bias=base.bias is not None, rank=cfg.rank, alpha=cfg.alpha,
                  dropout=cfg.dropout, device=w.device, dtype=w.dtype)
        new.weight = base.weight
        new.bias = base.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """``scaling · B @ A`` [out, in] (full tensors)."""
        a, b = _full(self.lora_A.weight), _full(self.lora_B.weight)
        return (b @ a) * self.scaling

    def tensor_parallel_style(self, style):
        """The plan's style for this linear with the adapters split to match (see toolkit.parallel.lora)."""
        return lora_style(style)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def resolve_targets(names) -> set[str]:
    """``peft.target_modules`` → megaforge leaf names; an unknown name is a one-line ConfigError."""
    leaves: set[str] = set()
    for name in names:
        if name in OWN_NAMES:
            leaves.add(name)
        elif name in HF_NAMES:
            leaves.update(HF_NAMES[name])
        else:
            raise ConfigError(f"peft.target_modules: {name!r} names no linear LoRA can adapt; use megaforge's names "
                              f"({', '.join(OWN_NAMES)}) or Hugging Face's ({', '.join(HF_NAMES)})")
    return leaves


def target_linears(model: nn.Module, leaves: set[str]) -> list[tuple[str, nn.Linear]]:
    """(name, linear) of every attention/MLP linear whose leaf name is in ``leaves``."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, (Attention, MLP)):
            for leaf, child in module.named_children():
                if leaf in leaves and isinstance(child, nn.Linear):
                    found.append((f"{name}.{leaf}" if name else leaf, child))
    return found


def apply_lora(model: nn.Module, cfg: PeftConfig) -> nn.Module:
    """Replace the targeted linears of ``model`` (on ``meta`` or materialized) with LoRA linears, in
    place, and freeze every parameter but the adapters and a task head. Returns ``model``."""
    leaves = resolve_targets(cfg.target_modules)
    found = target_linears(model, leaves)
    if not found:
        present = sorted({n.rsplit(".", 1)[-1] for n, _ in target_linears(model, set(OWN_NAMES))})
        raise ConfigError(f"peft.target_modules={list(cfg.target_modules)} match no linear of this "
                          f"{type(model).__name__}; it has {', '.join(present)}")
    heads = tuple(getattr(model, "HEAD_PREFIXES", ()))
    for p_name, p in model.named_parameters():
        p.requires_grad_(p_name.startswith(heads) if heads else False)
    for name, linear in found:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, LoRALinear.wrap(linear, cfg))
    return model


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_init_rules(model: nn.Module) -> dict[str, ParamInit]:
    """Init rules of the adapters: A normal with peft's default variance (1/(3·in)), B zero."""
    rules: dict[str, ParamInit] = {}
    for name, m in lora_modules(model):
        rules[f"{name}.lora_A.weight"] = normal(1.0 / math.sqrt(3 * m.in_features))
        rules[f"{name}.lora_B.weight"] = ZEROS
    return rules


@torch.no_grad()
def init_lora(model: nn.Module, seed: int) -> None:
    """Fill the adapters of a materialized single-device model as sharded initialization would."""
    params = dict(model.named_parameters())
    for name, rule in lora_init_rules(model).items():
        p = params[name]
        p.copy_(full_init(rule, name, seed, p.shape, dtype=p.dtype, device=p.device))


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (``W += scaling · B A``), in place; forward then skips them."""
    for _, m in lora_modules(model):
        if not m.merged:
            m.weight.add_(m.delta_weight().to(m.weight.dtype))
            m.merged = True
    return model


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with each adapter folded in (no ``lora_*`` keys); ``model`` is unchanged."""
    lora = dict(lora_modules(model))
    out = {}
    for name, t in model.state_dict().items():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        owner, _, leaf = name.rpartition(".")
        m = lora.get(owner)
        if m is not None and leaf == "weight" and not m.merged:
            t = t + m.delta_weight().to(t.dtype)
        out[name] = t
    return out
