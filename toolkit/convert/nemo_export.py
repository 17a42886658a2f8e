"""A megaforge GPT run → a NeMo 1.x ``.nemo`` archive that NeMo's ``MegatronGPTModel`` restores
(megatron-core names with Transformer Engine's layout, no model parallelism), verified by importing
it back with :mod:`toolkit.convert.nemo` and comparing logits.
"""

from __future__ import annotations

import json
import logging
import tarfile
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
import yaml

from toolkit.checkpoint.run_dir import load_megaforge_model, resolve_checkpoint
from toolkit.config import ModelConfig, load_config, padded_vocab_size
from toolkit.convert.adapters import family_adapter, padded_context
from toolkit.convert.nemo import CONFIG_FILE, NEMO_GPT_TARGET, WEIGHTS_FILE, import_nemo
from toolkit.convert.streaming import DCPSource, parse_dtype, scratch_dir, stream_steps
from toolkit.convert.verify import VerificationError, our_logits, probe_ids
from toolkit.errors import CheckpointError
from toolkit.mapping.megatron import MCORE_TE_EXTRA_STATE, mcore_te_gpt_name

logger = logging.getLogger(__name__)


_PRECISION = {torch.float32: 32, torch.bfloat16: "bf16", torch.float16: 16}


def nemo_model_config(mcfg: ModelConfig, tokenizer_section: dict, precision: Any) -> dict:
    """The ``model_config.yaml`` of a NeMo 1.x ``MegatronGPTModel`` (megatron-core, Transformer Engine
    spec, no model parallelism) holding ``mcfg``."""
    act = {"gelu": "gelu", "gelu_tanh": "gelu", "swiglu": "fast-swiglu"}[mcfg.activation]
    heads = mcfg.num_attention_heads
    return {
        "mcore_gpt": True, "target": NEMO_GPT_TARGET,
        "micro_batch_size": 1, "global_batch_size": 1, "rampup_batch_size": None,
        "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
        "virtual_pipeline_model_parallel_size": None,
        "encoder_seq_length": mcfg.seq_length,
        "max_position_embeddings": mcfg.max_position_embeddings or mcfg.seq_length,
        "num_layers": mcfg.num_layers, "hidden_size": mcfg.hidden_size,
        "ffn_hidden_size": mcfg.ffn_hidden_size or 4 * mcfg.hidden_size, "num_attention_heads": heads,
        "num_query_groups": mcfg.num_query_groups or heads, "kv_channels": mcfg.kv_channels,
        "init_method_std": mcfg.init_method_std, "use_scaled_init_method": True,
        "hidden_dropout": mcfg.hidden_dropout, "attention_dropout": mcfg.attention_dropout, "ffn_dropout": 0.0,
        "normalization": {"LayerNorm": "layernorm", "RMSNorm": "rmsnorm"}[mcfg.normalization],
        "layernorm_epsilon": mcfg.layernorm_epsilon, "do_layer_norm_weight_decay": False,
        "make_vocab_size_divisible_by": mcfg.make_vocab_size_divisible_by,
        "pre_process": True, "post_process": True, "persist_layer_norm": True,
        "bias": mcfg.add_bias_linear, "activation": act,
        # exact GELU is F.gelu unfused; the tanh approximation is openai_gelu (NeMo then cannot fuse it)
        "openai_gelu": mcfg.activation == "gelu_tanh", "onnx_safe": False,
        "bias_activation_fusion": mcfg.activation == "swiglu", "bias_dropout_add_fusion": False,
        "masked_softmax_fusion": True, "headscale": False, "transformer_block_type": "pre_ln",
        "normalize_attention_scores": True, "apply_query_key_layer_scaling": False,
        "position_embedding_type": mcfg.position_embedding_type, "rotary_percentage": 1.0,
        "rotary_base": mcfg.rotary_base, "apply_rope_fusion": False, "seq_len_interpolation_factor": None,
        "share_embeddings_and_output_weights": mcfg.share_embeddings_and_output_weights,
        "num_moe_experts": None, "qk_layernorm": False,
        "transformer_engine": True, "fp8": False, "megatron_amp_O2": False, "precision": precision,
        "native_amp_init_scale": 4294967296, "native_amp_growth_interval": 1000, "hysteresis": 2,
        "fp32_residual_connection": False, "fp16_lm_cross_entropy": False, "seed": 1234,
        "sequence_parallel": False, "activations_checkpoint_granularity": None,
        "activations_checkpoint_method": None, "activations_checkpoint_num_layers": None,
        "tokenizer": tokenizer_section,
        "data": {"data_prefix": [], "seq_length": mcfg.seq_length, "splits_string": "969,30,1",
                 "index_mapping_dir": None, "data_impl": "mmap", "num_workers": 0,
                 "dataloader_type": "single", "eod_mask_loss": False},
        "optim": {"name": "fused_adam", "lr": 1e-4, "weight_decay": 0.01, "betas": [0.9, 0.95],
                  "sched": {"name": "CosineAnnealing", "warmup_steps": 0, "min_lr": 1e-5}},
    }


def _tokenizer_artifacts(run_dir: Path, work: Path) -> tuple[dict, list[Path]]:
    """The run's tokenizer as NeMo 1.x names it (``tokenizer`` section) and the files to add to the
    archive as ``<uuid>_<name>``: SentencePiece → ``library: sentencepiece``; WordPiece ``vocab.txt`` →
    ``megatron`` ``BertWordPiece*``; byte-level BPE → ``megatron`` ``GPT2BPETokenizer`` (vocab.json +
    merges.txt)."""
    section: dict[str, Any] = {"library": None, "type": None, "model": None, "vocab_file": None,
                               "merge_file": None, "delimiter": None, "sentencepiece_legacy": False}
    folder = run_dir / "tokenizer"

    def artifact(name: str, data: bytes) -> str:
        path = work / f"{uuid.uuid4().hex}_{name}"
        path.write_bytes(data)
        files.append(path)
        return f"nemo:{path.name}"

    files: list[Path] = []
    spm = sorted(folder.glob("*.model")) if folder.is_dir() else []
    tj = folder / "tokenizer.json"
    if spm:
        section.update(library="sentencepiece", model=artifact("tokenizer.model", spm[0].read_bytes()))
    elif tj.is_file():
        data = json.loads(tj.read_text(encoding="utf-8"))
        model = data.get("model") or {}
        added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
        vocab = {**model.get("vocab", {}), **added}
        if model.get("type") == "WordPiece":
            lower = bool((data.get("normalizer") or {}).get("lowercase", False))
            lines = "\n".join(t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])) + "\n"
            section.update(library="megatron", type="BertWordPieceLowerCase" if lower else "BertWordPieceCase",
                           vocab_file=artifact("vocab.txt", lines.encode("utf-8")))
        elif model.get("type") == "BPE":
            merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
            section.update(library="megatron", type="GPT2BPETokenizer",
                           vocab_file=artifact("vocab.json", json.dumps(vocab, ensure_ascii=False).encode("utf-8")),
                           merge_file=artifact("merges.txt", ("#version: 0.2\n" + "\n".join(merges) + "\n")
                                               .encode("utf-8")))
    if section["library"] is None:
        logger.info(f"note: {folder} is not a tokenizer NeMo 1.x can name; the archive has no tokenizer files")
    return section, files


def nemo_state_dict(run: str | Path, dtype: torch.dtype | None = None) -> tuple[dict[str, Any], ModelConfig]:
    """A megaforge GPT run (its latest checkpoint, or a ``step_N`` folder) → NeMo 1.x's
    ``model_weights.ckpt`` state dict (``model.`` + megatron-core Transformer Engine names; the
    vocabulary padded to a multiple of ``make_vocab_size_divisible_by``) and the model config."""
    run_dir, step_dir = resolve_checkpoint(run)
    cfg = load_config(str(run_dir / "config.yaml"))
    mcfg = cfg.model
    if mcfg.family != "gpt":
        raise CheckpointError(f"--to nemo writes NeMo's MegatronGPTModel; this is a {mcfg.family} model")
    if cfg.task.type not in ("none", "sft"):
        raise CheckpointError(f"--to nemo writes a language model; this run has a {cfg.task.type} task head")
    if mcfg.activation not in ("gelu", "gelu_tanh", "swiglu"):
        raise CheckpointError(f"cannot write activation={mcfg.activation!r} for NeMo (gelu, gelu_tanh and swiglu)")
    if mcfg.position_embedding_type not in ("learned_absolute", "rope"):
        raise CheckpointError(f"cannot write position_embedding_type={mcfg.position_embedding_type!r} for NeMo")
    adapter = family_adapter("gpt")
    ctx = padded_context(adapter, mcfg, cfg.parallel.tensor_model_parallel_size)
    source = DCPSource(step_dir)
    steps = adapter.megatron_table.plan("to_hf", source.names(), ctx, where=str(step_dir))
    rows = padded_vocab_size(mcfg.vocab_size, mcfg.make_vocab_size_divisible_by, 1)
    state: dict[str, Any] = {}
    for name, t in stream_steps(steps, source, ctx, dtype):
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            t = torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])  # NeMo pads the vocabulary
        state["model." + mcore_te_gpt_name(name)] = t.contiguous()
    for i in range(mcfg.num_layers):  # Transformer Engine modules' extra state (fp8 metadata): none
        for module in MCORE_TE_EXTRA_STATE:
            state[f"model.decoder.layers.{i}.{module}._extra_state"] = None
    return state, mcfg


def export_nemo(src: str | Path, out: str | Path, *, dtype: str | torch.dtype | None = None, verify: bool = False,
                tolerance: float = 1e-4) -> Path:
    """Write the NeMo 1.x archive ``out`` (``.nemo``: a plain tar of ``model_config.yaml``,
    ``model_weights.ckpt`` and the tokenizer files) from a megaforge GPT run or ``step_N`` folder.
    ``verify``: import the archive back and compare its logits with the run's."""
    torch_dtype = parse_dtype(dtype)
    state, mcfg = nemo_state_dict(src, torch_dtype)
    stored = next((t.dtype for t in state.values() if isinstance(t, torch.Tensor)), torch.float32)
    run_dir, step_dir = resolve_checkpoint(src)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch_dir(out), prefix=".megaforge-nemo-") as tmp:
        work = Path(tmp)
        section, artifacts = _tokenizer_artifacts(run_dir, work)
        config = nemo_model_config(mcfg, section, _PRECISION[stored])
        (work / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
        torch.save(state, work / WEIGHTS_FILE)
        partial = out.with_name(out.name + ".partial")
        with tarfile.open(partial, "w") as tar:  # NeMo ≥ 1.7 writes uncompressed tars with ./ names
            for path in [work / CONFIG_FILE, work / WEIGHTS_FILE, *artifacts]:
                tar.add(path, arcname=f"./{path.name}")
        partial.replace(out)
    logger.info(f"exported {step_dir} → {out} (NeMo 1.x MegatronGPTModel, megatron-core names, "
                f"{sum(isinstance(t, torch.Tensor) for t in state.values())} tensors, {str(stored)[6:]})")
    if verify:
        diff = _round_trip_diff(step_dir, out)
        ok = diff <= tolerance
        summary = (f"verification {'passed' if ok else 'FAILED'}: the archive imported back gives max |logit "
                   f"difference| = {diff:.3g} against the run (tolerance {tolerance:g})")
        (logger.info if ok else logger.error)(summary)
        if not ok:
            raise VerificationError(summary)
    return out


@torch.no_grad()
def _round_trip_diff(step_dir: Path, archive: Path) -> float:
    with tempfile.TemporaryDirectory(dir=scratch_dir(archive), prefix=".megaforge-verify-") as tmp:
        imported = import_nemo(archive, Path(tmp) / "imported", dtype="fp32")
        theirs, icfg, _ = load_megaforge_model(imported)
        ours, cfg, tok = load_megaforge_model(step_dir)
        vocab = cfg.model.vocab_size
        worst = 0.0
        for ids in probe_ids(vocab, cfg.model.max_position_embeddings or cfg.model.seq_length, tok):
            a = our_logits(ours, ids)[..., :vocab].float()
            b = our_logits(theirs, ids)[..., :vocab].float()
            worst = max(worst, float((a - b).abs().max()))
        return worst
