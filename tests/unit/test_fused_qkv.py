"""``model.fused_qkv``: self-attention's q, k, v as one matmul, against the separate projections."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from toolkit.config import load_config
from toolkit.models.build import build_initialized_model
from toolkit.models.common.attention import Attention

SMALL = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.seq_length=16",
         "model.vocab_size=300", "model.hidden_dropout=0", "model.attention_dropout=0"]
CASES = {  # recipe, extra overrides: GPT-2 style, Llama style (GQA, RoPE, no biases), BERT post-LN, T5
    "gpt": ("gpt-tiny", []),
    "llama": ("llama-tiny", ["model.num_query_groups=2"]),
    "bert": ("bert-tiny", ["model.layernorm_position=post"]),
    "t5": ("t5-tiny", ["model.decoder_seq_length=8"]),
}


def _models(recipe: str, extra: list[str]):
    """The same weights built twice, with and without ``fused_qkv`` (initialized as training does:
    ``build`` alone leaves some parameters to the initializer)."""
    models = []
    for fused in (False, True):
        cfg = load_config(recipe, [*SMALL, *extra, f"model.fused_qkv={str(fused).lower()}"])
        models.append(build_initialized_model(cfg, torch.device("cpu")))
    torch.testing.assert_close(models[1].state_dict(), models[0].state_dict(), rtol=0, atol=0)
    assert list(models[0].state_dict()) == list(models[1].state_dict())  # the names are unchanged
    return cfg, models


def _batch(cfg, family: str) -> dict:
    g = torch.Generator().manual_seed(1)
    s = cfg.model.seq_length
    if family == "t5":
        return {"enc": torch.randint(0, 300, (2, s), generator=g), "dec": torch.randint(0, 300, (2, 8), generator=g)}
    return {"tokens": torch.randint(0, 300, (2, s), generator=g)}


def _loss(model, batch: dict, family: str) -> torch.Tensor:
    if family == "t5":
        out = model(batch["enc"], batch["dec"])
    else:
        out = model(batch["tokens"])
    out = out["mlm_logits"] if isinstance(out, dict) else out
    logits = out[..., :300].float().flatten(0, -2)  # the real vocabulary (padded columns are -inf)
    targets = torch.randint(0, 300, logits.shape[:1], generator=torch.Generator().manual_seed(2))
    return torch.nn.functional.cross_entropy(logits, targets)


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_gradients_equal_the_separate_projections(case):
    recipe, extra = CASES[case]
    cfg, (plain, fused) = _models(recipe, extra)
    family = cfg.model.family
    batch = _batch(cfg, family)
    losses = []
    for model in (plain, fused):
        loss = _loss(model, batch, family)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-7)
    grads = {n: p.grad for n, p in fused.named_parameters()}
    for name, p in plain.named_parameters():
        if p.grad is None:  # not on the loss's path (BERT's pooler)
            assert grads[name] is None, name
            continue
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


class _Casts(TorchDispatchMode):
    """Counts fp32 → bf16 casts of 3-d (activation) tensors."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and args[0].dim() == 3 and args[0].dtype == torch.float32 \
                and out.dtype == torch.bfloat16:
            self.count += 1
        return out


def test_autocast_casts_the_attention_input_once_not_three_times():
    x = torch.randn(2, 5, 32)
    counts = {}
    for fused in (False, True):
        attn = Attention(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, bias=True, dropout=0.0,
                         fused_qkv=fused)
        with torch.autocast("cpu", dtype=torch.bfloat16), _Casts() as casts:
            out = attn(x, is_causal=True)
        assert out.dtype == torch.bfloat16
        counts[fused] = casts.count
    assert counts == {False: 3, True: 1}


def test_the_separate_path_runs_where_fusing_does_not_apply():
    """Cross-attention, cached decoding and LoRA-wrapped projections keep the separate linears."""
    from toolkit.config import PeftConfig
    from toolkit.models.common.attention import KVCache
    from toolkit.models.common.lora import apply_lora

    attn = Attention(hidden_size=32, num_heads=4, num_kv_heads=4, head_dim=8, bias=True, dropout=0.0, fused_qkv=True)
    assert attn._fusable()
    calls = []
    attn.q.register_forward_hook(lambda *_: calls.append("q"))
    x = torch.randn(1, 3, 32)
    attn(x, is_causal=True)
    assert calls == []  # fused: the q module itself is not called
    attn(x, kv_input=torch.randn(1, 4, 32))  # cross-attention
    attn(x, is_causal=True, cache=KVCache.empty(1, 4, 8, 8, device="cpu", dtype=torch.float32))
    assert calls == ["q", "q"]

    cfg, (_, fused) = _models("gpt-tiny", [])
    apply_lora(fused, PeftConfig(method="lora", rank=2, target_modules=["q", "v"]))
    assert not any(m._fusable() for m in fused.modules() if isinstance(m, Attention))
    _loss(fused, _batch(cfg, "gpt"), "gpt").backward()  # still trains


TP_CHECK = """
import os, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from toolkit.config import load_config
from toolkit.models.build import build_initialized_model
from toolkit.models.common.attention import Attention
from toolkit.models.gpt.parallelize import parallelize_gpt
from toolkit.models.common.loss import lm_cross_entropy
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"], RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo")
SMALL = {small!r}
taken = []
original = Attention._column_parallel_qkv
def spy(self, x):
    taken.append(1)
    return original(self, x)
Attention._column_parallel_qkv = spy
tokens = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(1))
out = {{}}
for fused in (False, True):
    cfg = load_config("llama-tiny", [*SMALL, "model.num_query_groups=2", f"model.fused_qkv={{str(fused).lower()}}"])
    model = build_initialized_model(cfg, torch.device("cpu"))
    parallelize_gpt(model, init_device_mesh("cpu", (1,)), sequence_parallel={sp})
    loss = lm_cross_entropy(model(tokens[:, :-1]).full_tensor(), tokens[:, 1:])  # logits: Shard(-1) DTensor
    loss.backward()
    out[fused] = (loss.item(), model.layers["0"].attn.k.weight.grad.full_tensor())
assert len(taken) == 2, taken  # the fused model's two layers took the column-parallel fused path
assert abs(out[True][0] - out[False][0]) < 1e-6, out
torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-5, atol=1e-7)
print("ok")
dist.destroy_process_group()
"""


@pytest.mark.parametrize("sp", [False, True])
def test_column_parallel_weights_take_the_fused_path(sp):
    """Under the tensor-parallel plan (DTensor ``Shard(0)`` weights; a world of one, in a process of
    its own) the fused matmul runs on the local shards and matches the separate projections."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO
    from tests.parallel.helpers import _free_port

    env = {**os.environ, "PORT": str(_free_port()), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", TP_CHECK.format(small=SMALL, sp=sp)], capture_output=True,
                         text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
