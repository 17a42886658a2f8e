"""``megaforge convert RUN OUT --to peft``: a LoRA run's adapters as a ``peft`` adapter folder.

Writes ``adapter_config.json`` (``peft.LoraConfig`` fields) and ``adapter_model.safetensors`` with
``peft``'s key names (``base_model.model.<HF module>.lora_A.weight``), so that::

    base = AutoModelForCausalLM.from_pretrained(BASE)       # ...ForTokenClassification for a BERT tagger
    model = PeftModel.from_pretrained(base, OUT)

gives megaforge's logits. ``BASE`` (``base_model_name_or_path``) is ``peft.base_model_name_or_path``
(recorded when the run started from a Hugging Face folder or Hub id), else an HF export of the
run's base written to ``OUT/base``.

Names go through the family's HF table: an adapter on a linear that maps one-to-one keeps its
matrices (GPT-2's Conv1D layers too: ``peft`` keeps ``lora_A`` [r, in] there and sets
``fan_in_fan_out``). GPT-2's fused ``c_attn`` holds our separate q, k, v: their adapters are
stacked into one of rank 3r (A = [A_q; A_k; A_v], B block-diagonal), with
``rank_pattern``/``alpha_pattern`` keeping the scaling alpha/r — the same update, exactly (a LoRA on
only some of them is refused: export it merged with ``--to hf``). A task
head (BERT's ``classifier``) goes in ``modules_to_save``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from toolkit.checkpoint.run_dir import load_megaforge_model, resolve_checkpoint
from toolkit.config import load_config
from toolkit.convert.adapters import export_target, family_adapter, padded_context
from toolkit.convert.hf import export_hf
from toolkit.errors import CheckpointError
from toolkit.models.common.lora import LoRALinear, lora_modules

logger = logging.getLogger(__name__)

PREFIX = "base_model.model."
_TASK_TYPES = {"token_classification": "TOKEN_CLS", "sequence_classification": "SEQ_CLS", "regression": "SEQ_CLS"}
_FUSED = {"gpt2.qkv_weight"}  # one HF module holding several of ours, stacked on the output rows
_ONE_TO_ONE = {"identity": False, "transpose": True}  # transform → HF stores [in, out] (Conv1D: fan_in_fan_out)


def export_peft(src: str | Path, out: str | Path) -> Path:
    """Write the ``peft`` adapter folder ``out`` for the LoRA run (directory or ``step_N``) ``src``."""
    run_dir, step_dir = resolve_checkpoint(src)
    cfg = load_config(str(run_dir / "config.yaml"))
    if cfg.peft.method != "lora":
        raise CheckpointError(f"{run_dir} was trained without adapters (peft.method={cfg.peft.method}); export it "
                              "with --to hf, or train with peft.method=lora")
    model, cfg, _ = load_megaforge_model(step_dir)
    lora = dict(lora_modules(model))
    state = model.state_dict()
    base_names = [n for n in state if ".lora_A." not in n and ".lora_B." not in n]
    adapter = family_adapter(cfg.model.family)
    target = export_target(cfg)
    ctx = padded_context(adapter, cfg.model, cfg.parallel.tensor_model_parallel_size)
    steps = target.table.plan("to_hf", base_names, ctx, where=str(step_dir))
    heads = tuple(getattr(model, "HEAD_PREFIXES", ()))

    tensors: dict[str, torch.Tensor] = {}
    modules: list[str] = []  # HF module paths holding an adapter
    all_modules: set[str] = set()  # every HF linear path (to tell whether short target names are exact)
    ranks: dict[str, int] = {}
    fan_in_fan_out = False
    for step in steps:
        owners = [n[: -len(".weight")] if n.endswith(".weight") else None for n in step.src]
        hf_mods = [d[: -len(".weight")] for d in step.dst if d.endswith(".weight")]
        all_modules.update(hf_mods)
        if heads and all(n.startswith(heads) for n in step.src):  # a trainable head: modules_to_save
            for name, t in zip(step.dst, step.run([state[n] for n in step.src], ctx)):
                tensors[PREFIX + name] = t.contiguous()
            continue
        adapted = [lora.get(o) if o is not None else None for o in owners]
        if not any(adapted):
            continue
        if step.transform in _ONE_TO_ONE and len(step.src) == 1 and len(step.dst) == 1:
            m = adapted[0]
            a, b = m.lora_A.weight, m.lora_B.weight
            fan_in_fan_out |= _ONE_TO_ONE[step.transform]
        elif step.transform in _FUSED and len(step.dst) == 1:
            a, b = _stack(adapted)
            ranks[hf_mods[0]] = a.shape[0]
        else:
            raise CheckpointError(f"cannot export the LoRA adapter of {', '.join(step.src)} to peft: its Hugging Face "
                                  f"tensor is built by the {step.transform!r} transform; export the merged model "
                                  "with --to hf instead")
        hf = hf_mods[0]
        modules.append(hf)
        tensors[f"{PREFIX}{hf}.lora_A.weight"] = a.detach().contiguous()
        tensors[f"{PREFIX}{hf}.lora_B.weight"] = b.detach().contiguous()

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = cfg.peft.base_model_name_or_path
    if not base:
        base_dir = out / "base"
        export_hf(step_dir, base_dir, weights={n: state[n] for n in base_names})
        base = str(base_dir.resolve())
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    r, alpha = cfg.peft.rank, cfg.peft.alpha
    config = {
        "peft_type": "LORA",
        "task_type": _task_type(cfg),
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": cfg.peft.dropout,
        "target_modules": _target_names(modules, all_modules),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "modules_to_save": sorted({n.rpartition(".")[0] for n in _head_names(tensors)}) or None,
        "rank_pattern": {_leaf(m): k for m, k in ranks.items()},
        "alpha_pattern": {_leaf(m): alpha * k / r for m, k in ranks.items()},
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    logger.info(f"exported the LoRA adapters of {step_dir} → {out} ({len(modules)} modules, r={r}, alpha={alpha}; "
                f"base {base})")
    return out


def _stack(adapted: list[LoRALinear | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """One adapter of rank Σr for a fused HF module: A stacked on rows, B block-diagonal [Σout, Σr]."""
    if any(m is None for m in adapted):
        raise CheckpointError("cannot export a LoRA on only some of q/k/v to a fused Hugging Face module (c_attn); "
                              "target all three (c_attn), or export the merged model with --to hf")
    a = torch.cat([m.lora_A.weight for m in adapted], dim=0)  # [Σr, in]
    b = torch.block_diag(*[m.lora_B.weight for m in adapted])  # [Σout, Σr]
    return a, b


def _task_type(cfg) -> str | None:
    if cfg.task.type in _TASK_TYPES:
        return _TASK_TYPES[cfg.task.type]
    if cfg.model.family == "t5":
        return "SEQ_2_SEQ_LM"
    if cfg.model.family == "gpt":
        return "CAUSAL_LM"
    return None


def _target_names(modules: list[str], all_modules: set[str]) -> list[str]:
    """Short names (``q_proj``) when they pick exactly the adapted modules, else the full module paths."""
    leaves = {_leaf(m) for m in modules}
    if {m for m in all_modules if _leaf(m) in leaves} == set(modules):
        return sorted(leaves)
    return sorted(modules)


def _leaf(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def _head_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [n[len(PREFIX):] for n in tensors if ".lora_" not in n]


