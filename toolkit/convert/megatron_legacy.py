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
(``FamilyAdapter.megatron_table``, e.g. in ``models/gpt/hf.py``) like the HF converters. Every
spelling Megatron-LM has written is accepted — legacy (``language_model.encoder.layers.N...``, the
older ``transformer.``/``attention.`` and the later ``input_norm``/``final_norm``) and megatron-core
(``decoder.layers.N...`` for GPT, ``encoder.layers.N...`` for BERT, Transformer Engine's fused norms);
see :mod:`toolkit.mapping.megatron`. The architecture comes from ``args`` whichever spelling that
version wrote (``norm_epsilon`` / ``layernorm_epsilon``, ``seq_length`` / ``encoder_seq_length``, …);
what megaforge cannot hold is refused naming the argument or tensor.

The family comes from the tensors: BERT checkpoints (Megatron-BERT, the format GatorTron was trained
in; megatron-core's ``BertModel``) hold the masked-LM head ``lm_head.*`` (its vocabulary-parallel
bias is ``lm_head.bias``, or ``output_layer.bias`` in megatron-core, merged like the word
embeddings) and, with the sentence-pair head, the pooler and ``binary_head.*``; they import as our
pre-LN BERT.

:func:`plan_megatron` reads and checks everything (merged shapes against ``args`` included) before
anything is written; :func:`import_megatron` writes the megaforge folder; :func:`check_imported_logits`
is what ``--verify`` adds (there is no reference implementation to compare with).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toolkit.checkpoint.run_dir import load_megaforge_model
from toolkit.config import ModelConfig
from toolkit.convert.adapters import family_adapter
from toolkit.convert.megaforge_folder import expected_shapes, write_megaforge_folder
from toolkit.convert.megatron_args import config_from_args, read_arg
from toolkit.convert.safe_load import safe_load
from toolkit.convert.streaming import LazySource, meta_tensor
from toolkit.convert.verify import VerificationError, our_logits, probe_ids
from toolkit.errors import CheckpointError
from toolkit.mapping.megatron import BERT_MARKERS, canonical_megatron_name, unsupported_megatron_tensor
from toolkit.mapping.tables import MappingContext, Step, TemplateTable
from toolkit.tokenization import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")


# ---------------------------------------------------------------------------- finding files


def is_megatron_checkpoint(path: str | Path) -> bool:
    """A Megatron-LM checkpoint folder or one iteration of it (a distributed one too, which
    :func:`rank_files` then refuses with what to do)."""
    path = Path(path)
    return ((path / TRACKER).is_file() or any(_RANK_DIR.match(p.name) for p in path.glob("mp_rank_*"))
            or _is_distributed(path))


def _is_distributed(folder: Path) -> bool:
    """megatron-core's distributed format (``--ckpt-format torch_dist`` / ``zarr``): metadata.json + common.pt."""
    return (folder / "metadata.json").is_file() and (folder / "common.pt").is_file()


def iteration_dir(src: Path) -> Path:
    """``src`` itself when it holds ``mp_rank_*`` folders, else the folder the tracker file names."""
    if any(_RANK_DIR.match(p.name) for p in src.glob("mp_rank_*")) or _is_distributed(src):
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
    if _is_distributed(folder):
        raise CheckpointError(f"{folder} is a distributed megatron-core checkpoint (--ckpt-format torch_dist or "
                              "zarr), which megaforge does not read; have Megatron-LM re-save it per rank "
                              "(--ckpt-convert-format torch --ckpt-convert-save DIR) and convert that")
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

# Every spelling Megatron-LM wrote → canonical names: toolkit.mapping.megatron (MEGATRON_RENAMES)
_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")
_COLUMN = ("query_key_value.weight", "query_key_value.bias", "dense_h_to_4h.weight", "dense_h_to_4h.bias",
           "word_embeddings.weight", "output_layer.weight", "lm_head.bias")
#: canonical names only a BERT checkpoint holds
_BERT_ONLY = BERT_MARKERS
_ROW = ("self_attention.dense.weight", "dense_4h_to_h.weight")
#: canonical names whose rows are the (padded, vocabulary-parallel) vocabulary
_VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight", "lm_head.bias")


def canonical_name(name: str, family: str | None = None) -> str | None:
    """A legacy or megatron-core key → the canonical (legacy, prefix-free) key; None to drop it."""
    return canonical_megatron_name(name, family=family)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested legacy state dicts (``language_model → encoder → ...``) → dotted keys."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = tree
    return out


def detect_family(names) -> str:
    """``gpt`` or ``bert`` from canonical tensor names: BERT holds a masked-LM head, a sentence-pair
    head, a pooler or token-type embeddings."""
    return "bert" if any(n.startswith(_BERT_ONLY) for n in names) else "gpt"


def refuse_unsupported(names: dict[str, str]) -> None:
    """Refuse, naming the tensor as the checkpoint spells it (``names``: canonical → quoted key),
    what megaforge cannot import: QK normalization, experts, cross-attention (T5), …"""
    for name, key in names.items():
        what = unsupported_megatron_tensor(name)
        if what is not None:
            raise CheckpointError(f"tensor {key} belongs to {what}, which megaforge cannot import from Megatron-LM")


# ---------------------------------------------------------------------------- merging shards


class MegatronShards:
    """All rank files of one iteration, merged lazily into single-device canonical tensors."""

    def __init__(self, folder: Path, *, files: dict[tuple[int, int], Path] | None = None,
                 states: dict[tuple[int, int], dict] | None = None):
        """``files`` and ``states`` (hook for other containers of Megatron state dicts, e.g. NeMo's
        :mod:`toolkit.convert.nemo`): (tp, pp) → the file each rank's state came from, and the states
        already read (``args``, ``checkpoint_version``, ``model``); without them the rank files are read."""
        self.folder = folder
        self.files = files if files is not None else rank_files(folder)
        self.tp = 1 + max(t for t, _ in self.files)
        self.pp = 1 + max(p for _, p in self.files)
        self.states = states if states is not None else {k: safe_load(f) for k, f in sorted(self.files.items())}
        first = self.states[(0, 0)]
        self.args = first.get("args")
        self.version = float(first.get("checkpoint_version", 0) or 0)
        self.iteration = first.get("iteration")
        self._index: dict[str, list[torch.Tensor]] = {}  # global canonical name → shard per tp rank
        self.origin: dict[str, str] = {}  # canonical name → the key it was read as, quoted (for messages)

    def chunks(self) -> list[str]:
        """The model entries of a rank file: ``model``, or ``model0``, ``model1``, … (virtual pipeline)."""
        chunks = sorted((k for k in self.states[(0, 0)] if re.fullmatch(r"model\d*", k)),
                        key=lambda k: int(k[5:] or 0))
        if not chunks:
            raise CheckpointError(f"{self.files[(0, 0)]} has no 'model' entry")
        return chunks

    def canonical_tensors(self, family: str | None = None) -> dict[str, torch.Tensor]:
        """Canonical name → tensor of tensor-parallel rank 0, over every stage and chunk (layer
        indices local to their stage): enough to tell the family and its optional parts."""
        out: dict[str, torch.Tensor] = {}
        for (tp, _), state in self.states.items():
            if tp != 0:
                continue
            for chunk, tree in state.items():
                if re.fullmatch(r"model\d*", chunk):
                    for key, value in flatten(tree).items():
                        name = canonical_name(key, family)
                        if name is not None and isinstance(value, torch.Tensor):
                            out.setdefault(name, value)
                            self.origin.setdefault(name, f"'{key}'")
        return out

    def build_index(self, cfg: ModelConfig) -> None:
        offset = 0
        chunks = self.chunks()
        for chunk in chunks:  # virtual pipeline: chunk-major, then stage
            for pp in range(self.pp):
                local_layers: set[int] = set()
                for tp in range(self.tp):
                    flat = flatten(self.states[(tp, pp)].get(chunk, {}))
                    for key, value in flat.items():
                        name = canonical_name(key, cfg.family)
                        if name is None or not isinstance(value, torch.Tensor):
                            continue
                        m = _LAYER.match(name)
                        if m:
                            local_layers.add(int(m.group(1)))
                            name = f"layers.{int(m.group(1)) + offset}.{m.group(2)}"
                        elif cfg.share_embeddings_and_output_weights and name == "output_layer.weight":
                            continue  # the tied head's copy on the last stage
                        shards = self._index.setdefault(name, [])
                        if not shards:  # a layer's key is local to its stage: say which file holds it
                            staged = m is not None and (self.pp > 1 or len(chunks) > 1)
                            self.origin[name] = f"'{key}' (in {self.files[(tp, pp)].parent.name}" + \
                                (f", {chunk})" if len(chunks) > 1 else ")") if staged else f"'{key}'"
                        if len(shards) == tp:  # first stage holding a replicated global keeps it
                            shards.append(value)
                offset += len(local_layers)
        if offset != cfg.num_layers:
            raise CheckpointError(f"{self.folder}: found {offset} layers across the pipeline stages, but "
                                  f"args.num_layers={cfg.num_layers}")
        for name, shards in self._index.items():
            if len(shards) != self.tp:
                raise CheckpointError(f"{self.folder}: {self.origin[name]} is present in {len(shards)} "
                                      f"of {self.tp} tensor-parallel ranks")

    def check_shapes(self, cfg: ModelConfig, expected: dict[str, tuple[int, ...]]) -> int:
        """Each merged tensor's shape against ``expected`` (canonical name → shape the architecture
        gives; vocabulary rows may be padded, so those need only be at least the vocabulary).
        Returns how many tensors were checked; a mismatch is a one-line error naming the tensor."""
        checked = 0
        for name in self._index:
            want = expected.get(name)
            if want is None:
                continue
            per_rank = tuple(self._index[name][0].shape)
            try:
                got = tuple(self.merged(name, cfg, meta=True).shape)
            except RuntimeError:  # an old fused QKV whose rows do not split into the heads args give
                got = None
            vocab = name in _VOCAB_ROWS
            if got is None:
                ok = False
            elif vocab:
                ok = len(got) == len(want) and got[1:] == tuple(want[1:]) and got[0] >= want[0]
            else:
                ok = got == tuple(want)
            if not ok:
                what = f"at least {want[0]} rows × {tuple(want[1:])}" if vocab else str(tuple(want))
                merged = f"merges over tensor parallel {self.tp} to shape {got}" if got is not None else \
                    f"does not split into the heads args give at tensor parallel {self.tp}"
                raise CheckpointError(f"{self.folder}: tensor {self.origin[name]} {merged} (per rank {per_rank}), "
                                      f"but args describe {what}; the checkpoint and its args disagree")
            checked += 1
        return checked

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


@dataclass
class MegatronImport:
    """A Megatron-LM checkpoint read and planned, before anything is written: its ``cfg``, the
    conversion ``steps`` over the merged ``source`` and how many merged tensors were checked
    against the architecture ``args`` describe (``shapes_checked``)."""

    src: Path
    folder: Path
    shards: MegatronShards
    cfg: ModelConfig
    tokenizer: Any
    ctx: MappingContext
    steps: list[Step]
    source: LazySource
    shapes_checked: int
    label: str = "Megatron-LM"  # what the messages call the source (NeMo imports say NeMo)

    def write(self, out: str | Path, *, dtype: str | torch.dtype | None = "fp32", announce: bool = True) -> Path:
        """Write the megaforge folder ``out`` (``dtype`` None keeps the checkpoint's own); ``announce``:
        say so at INFO (a folder that is only a step on the way is mentioned at DEBUG)."""
        shards = self.shards
        state = {"step": 0, "consumed_samples": 0, "imported_from": str(self.src),
                 "megatron_iteration": shards.iteration, "megatron_checkpoint_version": shards.version}
        out = write_megaforge_folder(out, self.cfg, self.steps, self.source, self.ctx, tokenizer=self.tokenizer,
                                     dtype=dtype, trainer_state=state, where=str(self.folder),
                                     name=Path(str(self.src)).name,
                                     description=f"imported from {self.label} checkpoint {self.src}")
        say = logger.info if announce else logger.debug
        say(f"imported {self.label} {self.cfg.family.upper()} checkpoint {self.folder} (tensor parallel {shards.tp}, "
            f"pipeline {shards.pp}, version {shards.version:g}) → {out}")
        return out


_HEAD_SPELLINGS = {"lm_head.dense.weight": "'lm_head.dense.weight'",
                   "lm_head.layernorm.weight": "'lm_head.layernorm.weight' (legacy) or 'lm_head.layer_norm.weight' "
                                               "(megatron-core)",
                   "lm_head.bias": "'lm_head.bias' (legacy) or 'output_layer.bias' (megatron-core)"}


def plan_megatron(src: str | Path, *, tokenizer: str | Path | Tokenizer | None = None,
                  vocab_size: int | None = None, shards: MegatronShards | None = None,
                  label: str = "Megatron-LM") -> MegatronImport:
    """Read a Megatron-LM checkpoint (legacy or megatron-core names), tell its family, build its
    config from ``args``, check the merged tensors' shapes against it and plan the conversion.
    ``shards``: states already read from another container (NeMo), named ``label`` in messages."""
    if shards is None:
        shards = MegatronShards(iteration_dir(Path(src)))
    folder = shards.folder
    tok = tokenizer if isinstance(tokenizer, Tokenizer) or tokenizer is None else load_tokenizer(str(tokenizer))
    padded = read_arg(shards.args, "padded_vocab_size") if shards.args is not None else None
    vocab = vocab_size or (tok.vocab_size if tok is not None else None) or \
        (read_arg(shards.args, "vocab_size") if shards.args is not None else None)
    if vocab is None:
        vocab = padded or _embedding_rows(shards)
        logger.info(f"note: true vocabulary size unknown; keeping all {vocab} rows (pass vocab_size or a tokenizer)")
    rows = _embedding_rows(shards)
    if int(vocab) > rows:
        said = ("vocab_size (--vocab-size)" if vocab_size else "the tokenizer" if tok is not None
                else "args.vocab_size")
        raise CheckpointError(f"{folder}: {said} gives a vocabulary of {vocab} ids, but the checkpoint's word "
                              f"embeddings have {rows} rows; they do not belong together")
    family = detect_family(shards.canonical_tensors())
    tensors = shards.canonical_tensors(family)  # BERT: megatron-core's MLM bias output_layer.bias → lm_head.bias
    refuse_unsupported({n: shards.origin[n] for n in tensors})
    if family == "bert":
        missing = [n for n in _HEAD_SPELLINGS if n not in tensors]
        if len(missing) == len(_HEAD_SPELLINGS):
            raise CheckpointError(f"{folder}: the BERT checkpoint has no lm_head.* (masked-LM head: "
                                  "lm_head.dense, lm_head.layernorm or lm_head.layer_norm, lm_head.bias or "
                                  "output_layer.bias); megaforge imports pretraining checkpoints, not fine-tuned "
                                  "classifiers")
        if missing:
            raise CheckpointError(f"{folder}: the BERT checkpoint's masked-LM head is incomplete: it has no "
                                  f"{_HEAD_SPELLINGS[missing[0]]}")
    types = tensors.get("embedding.tokentype_embeddings.weight")
    cfg = config_from_args(shards.args, int(vocab), family=family,
                           num_tokentypes=int(types.shape[0]) if types is not None else 0,
                           binary_head="binary_head.weight" in tensors)
    if family == "bert" and cfg.activation == "gelu_tanh":
        logger.info("note: the MLP used Megatron's fused bias-GELU (tanh approximation), imported as gelu_tanh; "
                    "Megatron's LM head used exact GELU, megaforge's uses the same activation as the MLP")
    shards.build_index(cfg)
    adapter = family_adapter(cfg.family)
    if adapter.megatron_table is None:
        raise CheckpointError(f"model family {cfg.family!r} has no legacy Megatron-LM importer yet")
    ctx = adapter.context(cfg)
    table = adapter.megatron_table
    checked = shards.check_shapes(cfg, megatron_shapes(table, cfg, ctx))
    source = shards.source(cfg)
    try:
        steps = table.plan("from_hf", source.names(), ctx, where=str(folder))
    except CheckpointError as e:  # name the tensor as the checkpoint spells it
        raise CheckpointError(_with_origin(str(e), shards.origin)) from None
    return MegatronImport(Path(str(src)), folder, shards, cfg, tok, ctx, steps, source, checked, label)


def _with_origin(message: str, origin: dict[str, str]) -> str:
    def spell(m: re.Match) -> str:
        name = m.group(1)
        key = origin.get(name)
        return f"'{name}'" if key is None or key == f"'{name}'" else f"{key} (read as {name})"
    return re.sub(r"'([^']+)'", spell, message, count=1)


def megatron_shapes(table: TemplateTable, cfg: ModelConfig, ctx: MappingContext) -> dict[str, tuple[int, ...]]:
    """Canonical Megatron name → the merged shape the architecture ``cfg`` gives it (vocabulary rows
    unpadded), found by running the family's Megatron table backwards on our shapes (``meta``)."""
    ours = {n: meta_tensor(shape, torch.float32) for n, shape in expected_shapes(cfg).items()}
    out: dict[str, tuple[int, ...]] = {}
    for r, layer in table.expand(ctx):
        names = r.names("ours", layer)
        if all(n in ours for n in names):
            step = Step(names, r.names("hf", layer), r.transform, "to_hf")
            out.update(zip(step.dst, (tuple(t.shape) for t in step.run([ours[n] for n in names], ctx))))
    return out


def import_megatron(src: str | Path, out: str | Path, *, tokenizer: str | Path | None = None,
                    vocab_size: int | None = None, dtype: str | torch.dtype | None = "fp32") -> Path:
    """Convert a Megatron-LM GPT or BERT checkpoint folder (legacy or megatron-core names) into the
    megaforge folder ``out``.

    The true vocabulary size comes from ``vocab_size``, else the ``tokenizer``, else ``args.vocab_size``;
    without any, the padded size is kept (and said so).
    """
    return plan_megatron(src, tokenizer=tokenizer, vocab_size=vocab_size).write(out, dtype=dtype)


@dataclass
class LogitReport:
    """What ``--verify`` says about a Megatron-LM import, which has no reference model to compare
    with: merged shapes checked against ``args``, and statistics of the imported model's logits."""

    shapes_checked: int
    num_tokens: int
    mean: float
    std: float
    finite: bool

    @property
    def ok(self) -> bool:
        return self.finite and self.std > 0

    def summary(self) -> str:
        verdict = "verification passed" if self.ok else "verification FAILED"
        logits = ("finite logits" if self.finite else "NON-FINITE logits") + \
            f" on {self.num_tokens} probe tokens (mean {self.mean:.4g}, std {self.std:.4g})"
        if self.finite and self.std == 0:
            logits += ": constant logits, the weights are degenerate"
        return (f"{verdict}: the shapes of {self.shapes_checked} merged tensors match the architecture in args; "
                f"the imported model gives {logits}")

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise VerificationError(self.summary())


@torch.no_grad()
def check_imported_logits(folder: str | Path, *, shapes_checked: int = 0) -> LogitReport:
    """Load an imported folder and run the probe batches (random ids, plus probe texts when it has
    a tokenizer) through it: mean, std and finiteness of the logits over the true vocabulary."""
    model, cfg, tokenizer = load_megaforge_model(folder)
    vocab = cfg.model.vocab_size
    max_len = cfg.model.max_position_embeddings or cfg.model.seq_length
    values = []
    tokens = 0
    for ids in probe_ids(vocab, max_len, tokenizer):
        values.append(our_logits(model, ids)[..., :vocab].float().reshape(-1))
        tokens += ids.numel()
    logits = torch.cat(values)
    finite = bool(torch.isfinite(logits).all())
    kept = logits[torch.isfinite(logits)]
    mean = float(kept.mean()) if kept.numel() else float("nan")
    std = float(kept.std()) if kept.numel() > 1 else 0.0
    return LogitReport(shapes_checked=shapes_checked, num_tokens=tokens, mean=mean, std=std, finite=finite)


def _embedding_rows(shards: MegatronShards) -> int:
    for state in shards.states.values():
        for chunk, tree in state.items():
            if not re.fullmatch(r"model\d*", chunk):
                continue
            for key, value in flatten(tree).items():
                if canonical_name(key) == "embedding.word_embeddings.weight":
                    return value.shape[0] * shards.tp
    raise CheckpointError(f"{shards.folder}: no word embeddings found")
