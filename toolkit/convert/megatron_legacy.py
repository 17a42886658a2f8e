"""Import legacy Megatron-LM GPT and BERT checkpoints (``model_optim_rng.pt`` per model-parallel rank).

Layout (see docs/conversion.md)::

    <dir>/latest_checkpointed_iteration.txt     an iteration number or "release"
    <dir>/iter_0000100/ (or release/)
        mp_rank_{tp:02d}/model_optim_rng.pt            pipeline size 1
        mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt   pipeline size > 1

Files are unpickled by :func:`toolkit.convert.safe_load.safe_load`: ``weights_only=True`` with an
explicit allow-list, Megatron's own classes as inert placeholders, anything else refused.

Tensor-parallel shards are merged (column-parallel on dim 0, row-parallel on dim 1, the rest
replicated), pipeline stages (and virtual chunks) are stacked by counting their layers, the fused
QKV is brought to the per-query-group layout ``[groups, heads/groups + 2, head_dim]`` whatever the
``checkpoint_version`` (0: ``[3, heads, head_dim]``, 1.0: ``[heads, head_dim, 3]``, ≥ 2.0 and
megatron-core: grouped), and the result runs through the family's Megatron template table
(``FamilyAdapter.megatron_table``, e.g. in ``models/gpt/hf.py``) like the HF converters. Legacy
(``language_model.encoder.layers.N...``) and megatron-core (``decoder.layers.N...``) names are both
accepted.

The family comes from the tensors: BERT checkpoints (Megatron-BERT, the format GatorTron was trained
in) hold ``lm_head.*`` (the masked-LM head; its vocabulary-parallel ``lm_head.bias`` is merged like
the word embeddings) and, with the sentence-pair head, ``language_model.pooler.*`` and
``binary_head.*``; they import as our pre-LN BERT.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from toolkit.config import ModelConfig
from toolkit.convert.adapters import family_adapter
from toolkit.convert.megaforge_folder import write_megaforge_folder
from toolkit.convert.safe_load import safe_load
from toolkit.convert.streaming import LazySource, meta_tensor
from toolkit.errors import CheckpointError
from toolkit.tokenization import load_tokenizer

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")


# ---------------------------------------------------------------------------- finding files


def is_megatron_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / TRACKER).is_file() or any(_RANK_DIR.match(p.name) for p in path.glob("mp_rank_*"))


def iteration_dir(src: Path) -> Path:
    """``src`` itself when it holds ``mp_rank_*`` folders, else the folder the tracker file names."""
    if any(_RANK_DIR.match(p.name) for p in src.glob("mp_rank_*")):
        return src
    tracker = src / TRACKER
    if not tracker.is_file():
        raise CheckpointError(f"{src} is not a Megatron-LM checkpoint (no {TRACKER} and no mp_rank_* folders)")
    text = tracker.read_text().strip()
    if text == "release":
        folder = src / "release"
    elif text.isdigit():
        folder = src / f"iter_{int(text):07d}"
    else:
        raise CheckpointError(f"{tracker} holds {text!r}; expected an iteration number or 'release'")
    if not folder.is_dir():
        raise CheckpointError(f"{tracker} points to {folder.name}, which does not exist")
    return folder


def rank_files(folder: Path) -> dict[tuple[int, int], Path]:
    """(tp rank, pp rank) → ``model_optim_rng.pt``, checked to form a full tp × pp grid."""
    files: dict[tuple[int, int], Path] = {}
    for d in sorted(folder.iterdir()):
        m = _RANK_DIR.match(d.name)
        if m and d.is_dir():
            f = d / RANK_FILE
            if not f.is_file():
                pts = sorted(d.glob("*.pt"))
                if len(pts) != 1:
                    raise CheckpointError(f"{d} has no {RANK_FILE}")
                f = pts[0]
            files[(int(m.group(1)), int(m.group(2) or 0))] = f
    tp = 1 + max((t for t, _ in files), default=-1)
    pp = 1 + max((p for _, p in files), default=-1)
    for t in range(tp):
        for p in range(pp):
            if (t, p) not in files:
                raise CheckpointError(f"{folder} is missing mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")
                                      + f" (tensor parallel {tp} × pipeline {pp})")
    if not files:
        raise CheckpointError(f"{folder} has no mp_rank_* folders")
    return files


# ---------------------------------------------------------------------------- names


# megatron-core / older legacy spellings → the canonical names used below (order matters)
_RENAMES: list[tuple[re.Pattern, str]] = [(re.compile(a), b) for a, b in [
    (r"^language_model\.", ""),
    (r"^(?:encoder|transformer|decoder)\.(layers\.|final_layernorm\.|final_norm\.)", r"\1"),
    (r"^final_norm\.", "final_layernorm."),
    (r"\.attention\.", ".self_attention."),
    (r"\.self_attention\.linear_qkv\.layer_norm_(weight|bias)$", r".input_layernorm.\1"),
    (r"\.mlp\.linear_fc1\.layer_norm_(weight|bias)$", r".post_attention_layernorm.\1"),
    (r"\.linear_qkv\.", ".query_key_value."),
    (r"\.linear_proj\.", ".dense."),
    (r"\.pre_mlp_layernorm\.", ".post_attention_layernorm."),
    (r"\.linear_fc1\.", ".dense_h_to_4h."),
    (r"\.linear_fc2\.", ".dense_4h_to_h."),
]]
_DROP = re.compile(r"(_extra_state$|^word_embeddings_for_head\.|\.inv_freq$)")
_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")
_COLUMN = ("query_key_value.weight", "query_key_value.bias", "dense_h_to_4h.weight", "dense_h_to_4h.bias",
           "word_embeddings.weight", "output_layer.weight", "lm_head.bias")
#: canonical names only a BERT checkpoint holds
_BERT_ONLY = ("lm_head.", "binary_head.", "pooler.", "embedding.tokentype_embeddings.")
_ROW = ("self_attention.dense.weight", "dense_4h_to_h.weight")


def canonical_name(name: str) -> str | None:
    """A legacy or megatron-core key → the canonical (legacy, prefix-free) key; None to drop it."""
    for pattern, repl in _RENAMES:
        name = pattern.sub(repl, name)
    return None if _DROP.search(name) else name


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested legacy state dicts (``language_model → encoder → ...``) → dotted keys."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = tree
    return out


# ---------------------------------------------------------------------------- config


def _arg(args: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(args, n, None)
        if v is not None:
            return v
    return default


def config_from_args(args: Any, vocab_size: int, *, family: str = "gpt", num_tokentypes: int = 0,
                     binary_head: bool = False) -> ModelConfig:
    """Megatron-LM ``args`` (argparse Namespace) → our :class:`ModelConfig` of ``family`` (gpt | bert;
    for BERT the tensors say how many token types there are and whether the sentence-pair head is there)."""
    if args is None:
        raise CheckpointError("the checkpoint has no 'args'; megaforge needs them to know the model shape")
    unsupported = [("apply_residual_connection_post_layernorm", True), ("apply_layernorm_1p", True),
                   ("squared_relu", True), ("rotary_interleaved", True)]
    for key, bad in unsupported:
        if getattr(args, key, None) == bad:
            raise CheckpointError(f"Megatron models with {key}={bad} are not supported")
    if float(_arg(args, "rotary_percent", default=1.0)) != 1.0:
        raise CheckpointError("Megatron models with rotary_percent < 1 are not supported")
    hidden, heads = int(args.hidden_size), int(args.num_attention_heads)
    bias = bool(_arg(args, "add_bias_linear", default=True))
    if bool(_arg(args, "add_qkv_bias", default=bias)) != bias:
        raise CheckpointError("Megatron models with add_qkv_bias != add_bias_linear are not supported")
    swiglu = bool(_arg(args, "swiglu", default=False))
    if swiglu:
        activation = "swiglu"
    elif _arg(args, "openai_gelu", default=False) or (bias and _arg(args, "bias_gelu_fusion", default=False)):
        activation = "gelu_tanh"  # Megatron's fused bias-GELU is the tanh approximation
    else:
        activation = "gelu"
    rope = (_arg(args, "position_embedding_type", default="learned_absolute") == "rope"
            or bool(_arg(args, "use_rotary_position_embeddings", default=False)))
    kv = int(_arg(args, "kv_channels", default=hidden // heads))
    groups = int(args.num_query_groups) if _arg(args, "group_query_attention", default=False) else None
    seq = int(_arg(args, "seq_length", "max_position_embeddings"))
    extra: dict[str, Any] = {}
    if family == "bert":
        if rope or swiglu:
            raise CheckpointError("Megatron BERT checkpoints with rotary positions or SwiGLU are not supported")
        # Megatron-BERT is pre-LN with a final LayerNorm; its MLM head is always tied to the word embeddings
        extra = dict(layernorm_position="pre", num_tokentypes=num_tokentypes, bert_binary_head=binary_head)
    return ModelConfig(
        family=family, num_layers=int(args.num_layers), hidden_size=hidden,
        ffn_hidden_size=int(_arg(args, "ffn_hidden_size", default=4 * hidden)), num_attention_heads=heads,
        num_query_groups=groups, kv_channels=None if kv * heads == hidden else kv, seq_length=seq,
        max_position_embeddings=int(_arg(args, "max_position_embeddings", default=seq)),
        position_embedding_type="rope" if rope else "learned_absolute",
        rotary_base=float(_arg(args, "rotary_base", default=10000.0)),
        normalization=_arg(args, "normalization", default="LayerNorm"),
        layernorm_epsilon=float(_arg(args, "norm_epsilon", "layernorm_epsilon", default=1e-5)),
        activation=activation, add_bias_linear=bias,
        share_embeddings_and_output_weights=not _arg(args, "untie_embeddings_and_output_weights", default=False),
        hidden_dropout=float(_arg(args, "hidden_dropout", default=0.1)),
        attention_dropout=float(_arg(args, "attention_dropout", default=0.1)),
        init_method_std=float(_arg(args, "init_method_std", default=0.02)),
        make_vocab_size_divisible_by=int(_arg(args, "make_vocab_size_divisible_by", default=128)),
        vocab_size=vocab_size, **extra,
    )


# ---------------------------------------------------------------------------- merging shards


class MegatronShards:
    """All rank files of one iteration, merged lazily into single-device canonical tensors."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = rank_files(folder)
        self.tp = 1 + max(t for t, _ in self.files)
        self.pp = 1 + max(p for _, p in self.files)
        self.states = {k: safe_load(f) for k, f in sorted(self.files.items())}
        first = self.states[(0, 0)]
        self.args = first.get("args")
        self.version = float(first.get("checkpoint_version", 0) or 0)
        self.iteration = first.get("iteration")
        self._index: dict[str, list[torch.Tensor]] = {}  # global canonical name → shard per tp rank

    def canonical_tensors(self) -> dict[str, torch.Tensor]:
        """Canonical name → tensor of tensor-parallel rank 0, over every stage and chunk (layer
        indices local to their stage): enough to tell the family and its optional parts."""
        out: dict[str, torch.Tensor] = {}
        for (tp, _), state in self.states.items():
            if tp != 0:
                continue
            for chunk, tree in state.items():
                if re.fullmatch(r"model\d*", chunk):
                    for key, value in flatten(tree).items():
                        name = canonical_name(key)
                        if name is not None and isinstance(value, torch.Tensor):
                            out.setdefault(name, value)
        return out

    def build_index(self, cfg: ModelConfig) -> None:
        chunks = sorted((k for k in self.states[(0, 0)] if re.fullmatch(r"model\d*", k)),
                        key=lambda k: int(k[5:] or 0))
        if not chunks:
            raise CheckpointError(f"{self.files[(0, 0)]} has no 'model' entry")
        offset = 0
        for chunk in chunks:  # virtual pipeline: chunk-major, then stage
            for pp in range(self.pp):
                local_layers: set[int] = set()
                for tp in range(self.tp):
                    flat = flatten(self.states[(tp, pp)].get(chunk, {}))
                    for key, value in flat.items():
                        name = canonical_name(key)
                        if name is None or not isinstance(value, torch.Tensor):
                            continue
                        m = _LAYER.match(name)
                        if m:
                            local_layers.add(int(m.group(1)))
                            name = f"layers.{int(m.group(1)) + offset}.{m.group(2)}"
                        elif cfg.share_embeddings_and_output_weights and name == "output_layer.weight":
                            continue  # the tied head's copy on the last stage
                        shards = self._index.setdefault(name, [])
                        if len(shards) == tp:  # first stage holding a replicated global keeps it
                            shards.append(value)
                offset += len(local_layers)
        if offset != cfg.num_layers:
            raise CheckpointError(f"{self.folder}: found {offset} layers across the pipeline stages, but "
                                  f"args.num_layers={cfg.num_layers}")
        for name, shards in self._index.items():
            if len(shards) != self.tp:
                raise CheckpointError(f"{self.folder}: '{name}' is present in {len(shards)} of {self.tp} "
                                      "tensor-parallel ranks")

    def merged(self, name: str, cfg: ModelConfig, *, meta: bool = False) -> torch.Tensor:
        shards = self._index[name]
        if meta:
            shards = [meta_tensor(t.shape, t.dtype) for t in shards]
        if name.endswith(_COLUMN):
            if "query_key_value" in name:
                shards = [self._grouped_qkv(t, cfg) for t in shards]
            if "dense_h_to_4h" in name and cfg.activation == "swiglu":
                halves = [t.chunk(2, dim=0) for t in shards]  # each rank: [its gate rows; its up rows]
                shards = [h[0] for h in halves] + [h[1] for h in halves]
            return torch.cat(shards, dim=0)
        if name.endswith(_ROW):
            return torch.cat(shards, dim=1)
        return shards[0]

    def _grouped_qkv(self, t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
        """One rank's fused QKV → the grouped layout [groups, q/group + 2, head_dim, ...]."""
        if self.version >= 2.0:
            return t
        heads = cfg.num_attention_heads // self.tp
        hd = t.shape[0] // (3 * heads)
        rest = t.shape[1:]
        if self.version >= 1.0:  # [heads, head_dim, 3, ...] → [heads, 3, head_dim, ...]
            return t.reshape(heads, hd, 3, *rest).transpose(1, 2).reshape(t.shape)
        return t.reshape(3, heads, hd, *rest).transpose(0, 1).reshape(t.shape)  # [3, heads, head_dim, ...]

    def source(self, cfg: ModelConfig) -> LazySource:
        metas = {n: self.merged(n, cfg, meta=True) for n in self._index}
        return LazySource(metas, lambda n: self.merged(n, cfg))


# ---------------------------------------------------------------------------- import


def import_megatron(src: str | Path, out: str | Path, *, tokenizer: str | Path | None = None,
                    vocab_size: int | None = None, dtype: str | torch.dtype | None = "fp32") -> Path:
    """Convert a legacy Megatron-LM GPT or BERT checkpoint folder into the megaforge folder ``out``.

    The true vocabulary size comes from ``vocab_size``, else the ``tokenizer``, else ``args.vocab_size``;
    without any, the padded size is kept (and said so).
    """
    folder = iteration_dir(Path(src))
    shards = MegatronShards(folder)
    tok = load_tokenizer(str(tokenizer)) if tokenizer is not None else None
    padded = getattr(shards.args, "padded_vocab_size", None)
    vocab = vocab_size or (tok.vocab_size if tok is not None else None) or getattr(shards.args, "vocab_size", None)
    if vocab is None:
        vocab = padded or _embedding_rows(shards)
        logger.info(f"note: true vocabulary size unknown; keeping all {vocab} rows (pass vocab_size or a tokenizer)")
    tensors = shards.canonical_tensors()
    family = "bert" if any(n.startswith(_BERT_ONLY) for n in tensors) else "gpt"  # MLM head, pooler, token types
    types = tensors.get("embedding.tokentype_embeddings.weight")
    cfg = config_from_args(shards.args, int(vocab), family=family,
                           num_tokentypes=int(types.shape[0]) if types is not None else 0,
                           binary_head="binary_head.weight" in tensors)
    if family == "bert" and "lm_head.bias" not in tensors:
        raise CheckpointError(f"{folder}: the BERT checkpoint has no lm_head (masked-LM head); megaforge imports "
                              "pretraining checkpoints, not fine-tuned classifiers")
    if family == "bert" and cfg.activation == "gelu_tanh":
        logger.info("note: the MLP used Megatron's fused bias-GELU (tanh approximation), imported as gelu_tanh; "
                       "Megatron's LM head used exact GELU, megaforge's uses the same activation as the MLP")
    shards.build_index(cfg)
    adapter = family_adapter(cfg.family)
    if adapter.megatron_table is None:
        raise CheckpointError(f"model family {cfg.family!r} has no legacy Megatron-LM importer yet")
    ctx = adapter.context(cfg)
    source = shards.source(cfg)
    table = adapter.megatron_table
    steps = table.plan("from_hf", source.names(), ctx, where=str(folder))
    state = {"step": 0, "consumed_samples": 0, "imported_from": str(src), "megatron_iteration": shards.iteration,
             "megatron_checkpoint_version": shards.version}
    out = write_megaforge_folder(out, cfg, steps, source, ctx, tokenizer=tok, dtype=dtype, trainer_state=state,
                                 where=str(folder), name=Path(str(src)).name,
                                 description=f"imported from Megatron-LM checkpoint {src}")
    logger.info(f"imported Megatron-LM {family.upper()} checkpoint {folder} (tensor parallel {shards.tp}, "
                f"pipeline {shards.pp}, version {shards.version:g}) → {out}")
    return out


def _embedding_rows(shards: MegatronShards) -> int:
    for state in shards.states.values():
        for key, value in flatten(state.get("model", {})).items():
            if canonical_name(key) == "embedding.word_embeddings.weight":
                return value.shape[0] * shards.tp
    raise CheckpointError(f"{shards.folder}: no word embeddings found")
