"""NeMo checkpoints in, without NeMo: Megatron GPT and BERT models of NeMo 1.x (``.nemo``
archives) and NeMo 2.0 (``context/`` + ``weights/`` folders) are read into megaforge (the way out, a
``.nemo`` archive that NeMo 1.x's ``MegatronGPTModel`` restores, is :mod:`toolkit.convert.nemo_export`).

NeMo's Megatron models hold legacy Megatron-LM or megatron-core state dicts under a ``model.``
(NeMo 1.x) or ``module.`` (NeMo 2.0) prefix, so the import maps each layout onto the rank states of
:mod:`toolkit.convert.megatron_legacy` (``MegatronShards(files=, states=)``) and lets that importer
merge the tensor-parallel shards, stack the pipeline stages, read every naming scheme and check the
shapes; only the config (``model_config.yaml`` / ``context/model.yaml`` instead of ``args``) and the
containers are NeMo's own. Layouts read:

* ``.nemo`` (a tar, or an older ``tar.gz``; an unpacked folder with ``model_config.yaml`` too):
  ``model_weights.ckpt`` (no model parallelism), ``mp_rank_{tp:02d}/model_weights.ckpt``,
  ``tp_rank_{tp:02d}_pp_rank_{pp:03d}/model_weights.ckpt``, or the distributed ``model_weights/``
  folder (``metadata.json`` with ``sharded_backend: torch_dist``, PyTorch DCP files); tokenizer files
  at the root as ``<uuid>_<name>``, named in the config as ``nemo:<uuid>_<name>``;
* NeMo 2.0: ``context/model.yaml`` (the model's ``config``: a megatron-core ``TransformerConfig``),
  ``context/nemo_tokenizer/`` or ``context/artifacts/`` (Hugging Face tokenizer files) and
  ``weights/`` (DCP, keys ``module.…``, uniform layers stacked on a leading axis).

Pickled files are read with :func:`toolkit.convert.safe_load.safe_load` (``weights_only=True`` and an
explicit allow-list), DCP folders with :mod:`toolkit.checkpoint.safe_dcp` (a restricted unpickler for
``.metadata``); archives are unpacked with the ``data`` filter (no links out, no absolute paths).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tarfile
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from toolkit.checkpoint import safe_dcp
from toolkit.convert.adapters import family_adapter
from toolkit.convert.hf import export_hf
from toolkit.convert.megatron_legacy import MegatronImport, MegatronShards, check_imported_logits, plan_megatron
from toolkit.convert.safe_load import safe_load
from toolkit.convert.streaming import scratch_dir
from toolkit.errors import CheckpointError, first_line
from toolkit.tokenization import HFTokenizer, Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

CONFIG_FILE = "model_config.yaml"
WEIGHTS_FILE = "model_weights.ckpt"
DIST_WEIGHTS = "model_weights"
NEMO_GPT_TARGET = "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel"
_MP_RANK = re.compile(r"^mp_rank_(\d{2})$")
_TP_PP_RANK = re.compile(r"^tp_rank_(\d{2})_pp_rank_(\d{3})$")
#: a stacked layer key of a distributed checkpoint: ``decoder.layers.<rest>`` with no layer index
_STACKED = re.compile(r"^((?:decoder|encoder)\.layers\.)(?!\d+\.)(.+)$")


# ---------------------------------------------------------------------------- detection


def is_nemo_archive(path: str | Path) -> bool:
    """A NeMo 1.x ``.nemo`` file (tar or tar.gz) or an unpacked one (a folder with ``model_config.yaml``)."""
    path = Path(path)
    if path.is_dir():
        return (path / CONFIG_FILE).is_file()
    return path.is_file() and path.suffix == ".nemo" and tarfile.is_tarfile(path)


def is_nemo2_checkpoint(path: str | Path) -> bool:
    """A NeMo 2.0 checkpoint folder: ``context/`` and ``weights/``."""
    path = Path(path)
    return (path / "context").is_dir() and (path / "weights").is_dir()


def is_nemo_source(path: str | Path) -> bool:
    return is_nemo_archive(path) or is_nemo2_checkpoint(path)


@contextlib.contextmanager
def _unpacked(src: Path, scratch: Path | None = None) -> Iterator[Path]:
    """The folder holding the checkpoint's files: ``src`` itself, or a ``.nemo`` unpacked into a
    temporary folder (removed afterwards) — regular files and folders only, inside that folder."""
    if src.is_dir():
        yield src
        return
    with tempfile.TemporaryDirectory(dir=scratch, prefix=".megaforge-nemo-") as tmp:
        try:
            with tarfile.open(src, "r:*") as tar:
                members = [m for m in tar.getmembers() if m.isfile() or m.isdir()]
                tar.extractall(tmp, members=members, filter="data")
        except (tarfile.TarError, OSError) as e:
            raise CheckpointError(f"{src} is not a readable .nemo archive ({first_line(e)})") from None
        yield Path(tmp)


# ---------------------------------------------------------------------------- configs


def _load_yaml(path: Path) -> dict:
    """A NeMo YAML config, OmegaConf interpolations (``${.encoder_seq_length}``) resolved where they can be."""
    from omegaconf import OmegaConf

    try:
        conf = OmegaConf.load(path)
    except Exception as e:
        raise CheckpointError(f"{path.name} is not readable YAML ({first_line(e)})") from None
    try:
        data = OmegaConf.to_container(conf, resolve=True)
    except Exception:  # a resolver only NeMo registers (e.g. ${multiply:...}): keep what is literal
        data = OmegaConf.to_container(conf, resolve=False)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path.name} does not hold a mapping")
    return data


def _value(cfg: dict, key: str, default: Any = None) -> Any:
    v = cfg.get(key, default)
    return default if isinstance(v, str) and v.startswith("${") else v


def _target_name(value: Any) -> str:
    """A serialized callable (``{_target_: torch.nn.functional.silu, _call_: false}``) or a string → its name."""
    if isinstance(value, dict):
        value = value.get("_target_", "")
    return str(value or "").rsplit(".", 1)[-1].lower()


_NEMO1_NORMS = {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm", "layernorm1p": "LayerNorm"}


def nemo1_args(cfg: dict) -> dict:
    """A NeMo 1.x ``model_config.yaml`` (``MegatronGPTModel`` / ``MegatronBertModel``) → Megatron-LM
    ``args`` as :func:`~toolkit.convert.megatron_args.config_from_args` reads them; what megaforge
    cannot hold is refused naming the NeMo key."""
    block = _value(cfg, "transformer_block_type", "pre_ln")
    if block != "pre_ln":
        raise CheckpointError(f"NeMo models with transformer_block_type={block!r} are not supported (pre_ln is)")
    for key, bad, what in (("headscale", True, "head scaling"), ("normalize_attention_scores", False,
                                                                  "unscaled attention scores")):
        if _value(cfg, key) is bad:
            raise CheckpointError(f"NeMo models with {key}={bad} ({what}) are not supported")
    act = str(_value(cfg, "activation", "gelu")).lower()
    if act not in ("gelu", "swiglu", "fast-swiglu"):
        raise CheckpointError(f"NeMo models with activation={act!r} are not supported (gelu, swiglu and "
                              "fast-swiglu are)")
    norm = str(_value(cfg, "normalization", "layernorm")).lower()
    if norm not in _NEMO1_NORMS:
        raise CheckpointError(f"NeMo models with normalization={norm!r} are not supported (layernorm and rmsnorm are)")
    bias = bool(_value(cfg, "bias", True))
    heads = _value(cfg, "num_attention_heads")
    groups = _value(cfg, "num_query_groups")
    seq = _value(cfg, "encoder_seq_length") or _value(cfg, "seq_length") or _value(cfg, "max_position_embeddings")
    return dict(
        num_layers=_value(cfg, "num_layers"), hidden_size=_value(cfg, "hidden_size"),
        ffn_hidden_size=_value(cfg, "ffn_hidden_size"), num_attention_heads=heads,
        kv_channels=_value(cfg, "kv_channels"),
        group_query_attention=groups is not None and groups != heads, num_query_groups=groups,
        seq_length=seq, max_position_embeddings=_value(cfg, "max_position_embeddings", seq),
        position_embedding_type=_value(cfg, "position_embedding_type", "learned_absolute"),
        rotary_base=_value(cfg, "rotary_base", 10000.0), rotary_percent=_value(cfg, "rotary_percentage", 1.0),
        rotary_seq_len_interpolation_factor=_value(cfg, "seq_len_interpolation_factor"),
        normalization=_NEMO1_NORMS[norm], apply_layernorm_1p=norm == "layernorm1p",
        layernorm_epsilon=_value(cfg, "layernorm_epsilon", 1e-5), add_bias_linear=bias,
        swiglu=act in ("swiglu", "fast-swiglu"), openai_gelu=bool(_value(cfg, "openai_gelu", False)),
        # NeMo fuses bias + GELU by default: that fused kernel is the tanh approximation
        bias_gelu_fusion=act == "gelu" and bias and bool(_value(cfg, "bias_activation_fusion", True)),
        untie_embeddings_and_output_weights=not _value(cfg, "share_embeddings_and_output_weights", True),
        qk_layernorm=_value(cfg, "qk_layernorm"), num_experts=_value(cfg, "num_moe_experts"),
        hidden_dropout=_value(cfg, "hidden_dropout", 0.1), attention_dropout=_value(cfg, "attention_dropout", 0.1),
        init_method_std=_value(cfg, "init_method_std", 0.02),
        make_vocab_size_divisible_by=_value(cfg, "make_vocab_size_divisible_by", 128),
        tensor_model_parallel_size=_value(cfg, "tensor_model_parallel_size", 1),
        pipeline_model_parallel_size=_value(cfg, "pipeline_model_parallel_size", 1),
    )


def nemo2_args(model: dict) -> dict:
    """NeMo 2.0 ``context/model.yaml`` (its ``config``: megatron-core's ``TransformerConfig`` fields
    as ``GPTConfig``/``BertConfig`` dump them) → Megatron-LM ``args``."""
    cfg = model.get("config") if isinstance(model.get("config"), dict) else None
    if cfg is None:
        raise CheckpointError("context/model.yaml has no 'config' section (the model's TransformerConfig)")
    if str(cfg.get("bert_type", "megatron")).lower() != "megatron":
        raise CheckpointError(f"NeMo BERT models with bert_type={cfg.get('bert_type')!r} (post-LN) are not supported")
    act = _target_name(cfg.get("activation_func", "gelu"))
    gated = bool(cfg.get("gated_linear_unit", False))
    if (act, gated) not in (("gelu", False), ("silu", True)):
        raise CheckpointError(f"NeMo models with activation_func={act!r}, gated_linear_unit={gated} are not "
                              "supported (gelu, or silu gated: SwiGLU)")
    bias = bool(cfg.get("add_bias_linear", True))
    heads, groups = cfg.get("num_attention_heads"), cfg.get("num_query_groups")
    seq = cfg.get("seq_length") or cfg.get("max_position_embeddings")
    return dict(
        num_layers=cfg.get("num_layers"), hidden_size=cfg.get("hidden_size"),
        ffn_hidden_size=cfg.get("ffn_hidden_size"), num_attention_heads=heads, kv_channels=cfg.get("kv_channels"),
        group_query_attention=groups is not None and groups != heads, num_query_groups=groups,
        seq_length=seq, max_position_embeddings=cfg.get("max_position_embeddings") or seq,
        position_embedding_type=cfg.get("position_embedding_type", "learned_absolute"),
        rotary_base=cfg.get("rotary_base", 10000.0), rotary_percent=cfg.get("rotary_percent", 1.0),
        rotary_seq_len_interpolation_factor=cfg.get("seq_len_interpolation_factor"),
        normalization=cfg.get("normalization", "LayerNorm"),
        apply_layernorm_1p=bool(cfg.get("layernorm_zero_centered_gamma", False)),
        apply_residual_connection_post_layernorm=bool(cfg.get("apply_residual_connection_post_layernorm", False)),
        layernorm_epsilon=cfg.get("layernorm_epsilon", 1e-5), add_bias_linear=bias,
        add_qkv_bias=bool(cfg.get("add_qkv_bias", False)), swiglu=gated,
        bias_gelu_fusion=act == "gelu" and bias and bool(cfg.get("bias_activation_fusion", False)),
        untie_embeddings_and_output_weights=not cfg.get("share_embeddings_and_output_weights", True),
        qk_layernorm=cfg.get("qk_layernorm"), num_experts=cfg.get("num_moe_experts"),
        multi_latent_attention=cfg.get("multi_latent_attention"),
        hidden_dropout=cfg.get("hidden_dropout", 0.1), attention_dropout=cfg.get("attention_dropout", 0.1),
        init_method_std=cfg.get("init_method_std", 0.02),
        make_vocab_size_divisible_by=cfg.get("make_vocab_size_divisible_by", 128),
        vocab_size=cfg.get("vocab_size"),
    )


# ---------------------------------------------------------------------------- tokenizers


def _artifact(root: Path, value: Any) -> Path | None:
    if isinstance(value, str) and value.startswith("nemo:"):
        path = root / value[len("nemo:"):]
        return path if path.is_file() else None
    return None


def _gpt2_bpe(vocab: Path, merges: Path) -> Tokenizer:
    """GPT-2 style byte-level BPE from ``vocab.json`` + ``merges.txt`` (NeMo's ``GPT2BPETokenizer``)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    backend = Backend(models.BPE.from_file(str(vocab), str(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    ids = json.loads(vocab.read_text(encoding="utf-8"))
    specials = [t for t in ids if t.startswith("<|") and t.endswith("|>")] or \
        [t for t in ids if t.startswith("<") and t.endswith(">") and " " not in t and len(t) > 2]
    if specials:
        backend.add_special_tokens(specials)
    return HFTokenizer(backend)


def nemo1_tokenizer(cfg: dict, root: Path) -> Tokenizer | None:
    """The tokenizer a ``.nemo`` carries (``tokenizer.{model, vocab_file, merge_file}`` pointing at
    ``nemo:`` files in the archive): SentencePiece, WordPiece ``vocab.txt`` or GPT-2 BPE; else None."""
    tok = cfg.get("tokenizer") if isinstance(cfg.get("tokenizer"), dict) else {}
    model, vocab, merges = (_artifact(root, tok.get(k)) for k in ("model", "vocab_file", "merge_file"))
    kind = str(tok.get("type") or "")
    try:
        if model is not None:
            return load_tokenizer(str(model), type="sentencepiece")
        if vocab is not None and merges is not None:
            return _gpt2_bpe(vocab, merges)
        if vocab is not None and vocab.suffix == ".txt":
            return HFTokenizer.from_wordpiece_vocab(vocab, lowercase=True if "lowercase" in kind.lower() else
                                                    False if "case" in kind.lower() else None)
    except Exception as e:  # a tokenizer we cannot rebuild is no reason to refuse the weights
        logger.info(f"note: cannot load the archive's tokenizer ({first_line(e)}); pass --tokenizer")
    return None


def nemo2_tokenizer(context: Path) -> Tokenizer | None:
    """Hugging Face tokenizer files NeMo 2.0 keeps in ``context/nemo_tokenizer`` or ``context/artifacts``."""
    for folder in (context / "nemo_tokenizer", context / "artifacts", context):
        if folder.is_dir() and any((folder / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer.model")):
            try:
                return load_tokenizer(str(folder))
            except Exception as e:
                logger.info(f"note: cannot load the tokenizer in {folder} ({first_line(e)}); pass --tokenizer")
    return None


# ---------------------------------------------------------------------------- weights


def _nemo_model_state(state: Any, where: str) -> dict[str, dict[str, Any]]:
    """A NeMo 1.x ``model_weights.ckpt`` → Megatron model chunks (``model``, or ``model0``, … under
    virtual pipeline), with NeMo's ``model.`` prefix removed and legacy NeMo's two SwiGLU inputs fused."""
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{where} does not hold a state dict")
    chunks: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        if not key.startswith("model."):
            continue
        name = key[len("model."):]
        m = re.match(r"^(\d+)\.(.*)$", name)  # virtual pipeline: a ModuleList of chunks
        chunk = f"model{m.group(1)}" if m else "model"
        name = m.group(2) if m else name
        if name.startswith("module."):  # megatron_amp_O2 wraps the model in a Float16Module
            name = name[len("module."):]
        if name == "word_embeddings.weight":  # legacy NeMo: the last stage's copy of the tied embeddings
            name = "word_embeddings_for_head.weight"
        chunks.setdefault(chunk, {})[name] = value
    if not chunks:
        raise CheckpointError(f"{where} holds no 'model.' weights (a PEFT adapter or another kind of NeMo model?)")
    for tree in chunks.values():
        for name in [n for n in tree if n.endswith(".mlp.dense_h_to_4h_2.weight") or
                     n.endswith(".mlp.dense_h_to_4h_2.bias")]:
            up = tree.pop(name)  # legacy NeMo SwiGLU: dense_h_to_4h is the gate, dense_h_to_4h_2 the up half
            gate_name = name.replace("dense_h_to_4h_2", "dense_h_to_4h")
            tree[gate_name] = torch.cat([tree[gate_name], up], dim=0)  # per rank [gate; up], as Megatron-LM
    return chunks


def read_dcp_tensors(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor under ``prefix`` of a PyTorch DCP checkpoint (megatron-core ``torch_dist``), loaded
    in this one process as plain full tensors; ``_extra_state`` and other non-tensor entries are left out."""
    meta_file = folder / "metadata.json"
    if meta_file.is_file():
        try:
            backend = json.loads(meta_file.read_text()).get("sharded_backend")
        except ValueError:
            backend = None
        if backend not in (None, "torch_dist"):
            raise CheckpointError(f"{folder} is a {backend!r} distributed checkpoint; megaforge reads torch_dist "
                                  "(PyTorch DCP) only — re-save it with dist_ckpt_format=torch_dist")
    md = safe_dcp.read_metadata(folder)  # .metadata is a pickle: read with a restricted unpickler
    state = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()
             if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)}
    if not state:
        raise CheckpointError(f"{folder} holds no tensors under '{prefix}'")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            safe_dcp.load(state, folder, no_dist=True)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot read the tensors of {folder}: {first_line(e)}") from None
    return {k[len(prefix):]: v for k, v in state.items()}


def unstack_layers(tensors: dict[str, torch.Tensor], num_layers: int, where: str) -> dict[str, torch.Tensor]:
    """Distributed checkpoints stack a block's layers on a leading axis (``decoder.layers.X`` of shape
    ``[num_layers, …]``) → one tensor per layer (``decoder.layers.N.X``)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        m = _STACKED.match(name)
        if m is None:
            out[name] = t
            continue
        if t.dim() == 0 or t.shape[0] != num_layers:
            raise CheckpointError(f"{where}: stacked tensor '{name}' has {tuple(t.shape)[:1]} layers on its first "
                                  f"axis, but the config has num_layers={num_layers}")
        for i in range(num_layers):
            out[f"{m.group(1)}{i}.{m.group(2)}"] = t[i]
    return out


def _rank_weight_files(root: Path) -> dict[tuple[int, int], Path]:
    if (root / WEIGHTS_FILE).is_file():
        return {(0, 0): root / WEIGHTS_FILE}
    files: dict[tuple[int, int], Path] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        m, n = _MP_RANK.match(d.name), _TP_PP_RANK.match(d.name)
        if (m or n) and (d / WEIGHTS_FILE).is_file():
            files[(int(m.group(1)), 0) if m else (int(n.group(1)), int(n.group(2)))] = d / WEIGHTS_FILE
    tp = 1 + max((t for t, _ in files), default=-1)
    pp = 1 + max((p for _, p in files), default=-1)
    for t in range(tp):
        for p in range(pp):
            if (t, p) not in files:
                raise CheckpointError(f"the archive has no weights of tensor-parallel rank {t}, pipeline rank {p} "
                                      f"(tensor parallel {tp} × pipeline {pp})")
    return files


# ---------------------------------------------------------------------------- import


def plan_nemo(src: str | Path, root: Path, *, tokenizer: str | Path | None = None,
              vocab_size: int | None = None) -> MegatronImport:
    """Read the NeMo checkpoint unpacked at ``root`` (see :func:`_unpacked`) into a planned Megatron
    import. The true vocabulary: ``vocab_size``, else ``tokenizer``, else the checkpoint's own tokenizer."""
    src = Path(src)
    if (root / "context").is_dir() and (root / "weights").is_dir():
        model_yaml = root / "context" / "model.yaml"
        if not model_yaml.is_file():
            raise CheckpointError(f"{src}: context/model.yaml is missing (megaforge reads the model config from it)")
        try:
            model = yaml.safe_load(model_yaml.read_text())
        except yaml.YAMLError as e:
            raise CheckpointError(f"{model_yaml} is not readable YAML ({first_line(e)})") from None
        args = nemo2_args(model if isinstance(model, dict) else {})
        own = nemo2_tokenizer(root / "context")
        tensors = unstack_layers(read_dcp_tensors(root / "weights", "module."), int(args["num_layers"]), str(src))
        files = {(0, 0): root / "weights"}
        states = {(0, 0): {"args": args, "checkpoint_version": 3.0, "model": tensors}}
        label = "NeMo 2.0"
    else:
        cfg = _load_yaml(root / CONFIG_FILE)
        args = nemo1_args(cfg)
        own = nemo1_tokenizer(cfg, root)
        if (root / DIST_WEIGHTS).is_dir():
            tensors = unstack_layers(read_dcp_tensors(root / DIST_WEIGHTS, "model."), int(args["num_layers"]),
                                     str(src))
            files = {(0, 0): root / DIST_WEIGHTS}
            states = {(0, 0): {"args": args, "checkpoint_version": 3.0,
                               **_nemo_model_state({f"model.{k}": v for k, v in tensors.items()}, str(src))}}
        else:
            files = _rank_weight_files(root)
            if not files:
                raise CheckpointError(f"{src} has no {WEIGHTS_FILE} (nor mp_rank_*/, tp_rank_*_pp_rank_*/ or "
                                      f"{DIST_WEIGHTS}/)")
            states = {k: {"args": args, "checkpoint_version": 3.0,
                          **_nemo_model_state(safe_load(f), f"{src}: {f.relative_to(root)}")}
                      for k, f in sorted(files.items())}
        label = "NeMo"
    if tokenizer is None and own is not None:
        tokenizer = own
    if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(str(tokenizer))
    if tokenizer is not None:
        args["vocab_size"] = tokenizer.vocab_size
    shards = MegatronShards(src, files=files, states=states)
    return plan_megatron(src, tokenizer=tokenizer, vocab_size=vocab_size, shards=shards, label=label)


def import_nemo(src: str | Path, out: str | Path, *, tokenizer: str | Path | None = None,
                vocab_size: int | None = None, dtype: str | torch.dtype | None = "fp32",
                verify: bool = False) -> Path:
    """A NeMo 1.x ``.nemo`` (or its unpacked folder) or a NeMo 2.0 checkpoint folder → the megaforge
    folder ``out`` (``verify``: the Megatron import's checks — merged shapes, finite logits)."""
    src = Path(src)
    with _unpacked(src, scratch_dir(out)) as root:
        plan = plan_nemo(src, root, tokenizer=tokenizer, vocab_size=vocab_size)
        result = plan.write(out, dtype=dtype)
    if verify:
        report = check_imported_logits(result, shapes_checked=plan.shapes_checked)
        (logger.info if report.ok else logger.error)(report.summary())
        report.raise_if_failed()
    return result


def nemo_to_hf(src: str | Path, out: str | Path, *, verify: bool = False, dtype: str | None = None,
               max_shard_size: int | str = "2GB", tokenizer: str | None = None, vocab_size: int | None = None,
               tolerance: float = 1e-4) -> Path:
    """A NeMo checkpoint → the Hugging Face folder ``out``, through a megaforge folder in a temporary
    directory beside it (refused before anything is written when no Hugging Face class holds the model)."""
    src = Path(src)
    with tempfile.TemporaryDirectory(dir=scratch_dir(out), prefix=".megaforge-convert-") as tmp:
        with _unpacked(src, Path(tmp)) as root:
            plan = plan_nemo(src, root, tokenizer=tokenizer, vocab_size=vocab_size)
            family_adapter(plan.cfg.family).select(plan.cfg)  # refuses a model no Hugging Face class holds
            imported = plan.write(Path(tmp) / "imported", dtype=None, announce=False)
        if verify:
            report = check_imported_logits(imported, shapes_checked=plan.shapes_checked)
            (logger.info if report.ok else logger.error)(report.summary())
            report.raise_if_failed()
        return export_hf(imported, out, verify=verify, dtype=dtype, max_shard_size=max_shard_size,
                         tolerance=tolerance)
