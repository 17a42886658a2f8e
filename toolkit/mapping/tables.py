"""The generic state-dict mapping every model family's ``hf.py`` is written in.

A family describes a conversion target with ONE :class:`TemplateTable`: a list of :class:`Rule`\\ s,
each pairing external names (Hugging Face, or legacy Megatron) with our names, where ``{}`` stands
for the layer index, plus the name of a registered :class:`Transform` for the few tensors that are
not a plain copy (fused QKV, Conv1D transposes, vocabulary padding). Both directions are derived
from the same table:

* ``table.plan("to_hf", ...)`` reads our names and writes external names,
* ``table.plan("from_hf", ...)`` reads external names and writes ours,

so nothing is written twice. A plan is a list of :class:`Step`\\ s (source names → destination
names + transform) checked against the source's tensor names: a missing tensor or a tensor no rule
accounts for is a one-line :class:`~toolkit.errors.CheckpointError` naming it. Steps run on real
tensors or on ``meta`` tensors (to learn the output shapes before any data is read), which is what
lets the converters stream one step at a time.

Models with two stacks (T5's encoder and decoder) mark the second stack's rules with
``layers="<flag>"``: ``{}`` then spans that context flag's count instead of ``num_layers``. Rule
conditions read the context's flags (:func:`when_flag`), which each family sets in
:func:`model_context`. Legacy Megatron-LM layouts, the same for every family, are
:mod:`toolkit.mapping.megatron`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import torch

from toolkit.config import ModelConfig, head_dim, padded_vocab_size
from toolkit.errors import CheckpointError, first_line

Direction = Literal["to_hf", "from_hf"]
Tensors = list[torch.Tensor]
Condition = Callable[["MappingContext"], bool]


# ---------------------------------------------------------------------------- context


@dataclass(frozen=True)
class MappingContext:
    """What transforms and rule conditions may ask about the model being converted."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int  # true vocabulary (what external checkpoints hold)
    padded_vocab_size: int  # rows our embedding/output tables hold
    flags: Mapping[str, Any] = field(default_factory=dict)  # family-specific switches (bias, tied, ...)

    def flag(self, name: str) -> Any:
        return self.flags.get(name)


def model_context(cfg: ModelConfig, *, flags: Mapping[str, Any], num_kv_heads: int | None = None) -> MappingContext:
    """``cfg``'s sizes, its vocabulary padded as a one-process model pads it (the converters re-pad
    for their layout) and the family's ``flags``; ``num_kv_heads`` defaults to the query groups."""
    return MappingContext(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_heads=cfg.num_attention_heads,
        num_kv_heads=num_kv_heads or cfg.num_query_groups or cfg.num_attention_heads, head_dim=head_dim(cfg),
        vocab_size=cfg.vocab_size,
        padded_vocab_size=padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by),
        flags=flags,
    )


def when_flag(name: str, negate: bool = False) -> Condition:
    """Rule condition: the context flag ``name`` is set (or, with ``negate``, unset)."""
    return (lambda ctx: not ctx.flag(name)) if negate else (lambda ctx: bool(ctx.flag(name)))


# ---------------------------------------------------------------------------- transforms


@dataclass(frozen=True)
class Transform:
    """A pair of inverse tensor functions: ours → external and external → ours.

    ``to_hf(ours, ctx)`` receives our tensors in the order of a rule's ``ours`` names and returns the
    external tensors in the order of its ``hf`` names; ``from_hf`` does the reverse. They must be
    exact inverses (``from_hf(to_hf(x)) == x`` bit for bit) and work on ``meta`` tensors.
    """

    to_hf: Callable[[Tensors, MappingContext], Tensors]
    from_hf: Callable[[Tensors, MappingContext], Tensors]


TRANSFORMS: dict[str, Transform] = {}


def register_transform(name: str, to_hf: Callable[[Tensors, MappingContext], Tensors],
                       from_hf: Callable[[Tensors, MappingContext], Tensors]) -> None:
    """Register a transform under ``name`` (families prefix theirs, e.g. ``gpt2.qkv_weight``)."""
    if name in TRANSFORMS and TRANSFORMS[name] != Transform(to_hf, from_hf):
        raise ValueError(f"transform {name!r} is already registered")
    TRANSFORMS[name] = Transform(to_hf, from_hf)


def get_transform(name: str) -> Transform:
    try:
        return TRANSFORMS[name]
    except KeyError:
        raise KeyError(f"no transform named {name!r}; registered: {', '.join(sorted(TRANSFORMS))}") from None


def _vocab_cut(ts: Tensors, ctx: MappingContext) -> Tensors:
    return [ts[0][: ctx.vocab_size]]


def _vocab_pad(ts: Tensors, ctx: MappingContext) -> Tensors:
    t = ts[0]
    if t.shape[0] > ctx.padded_vocab_size:
        raise ValueError(f"{t.shape[0]} rows is more than the padded vocabulary {ctx.padded_vocab_size}")
    pad = t.new_zeros((ctx.padded_vocab_size - t.shape[0], *t.shape[1:]))  # padded rows are masked anyway
    return [torch.cat([t, pad], dim=0)]


def _transpose(ts: Tensors, ctx: MappingContext) -> Tensors:
    return [ts[0].t()]


register_transform("identity", lambda ts, ctx: list(ts), lambda ts, ctx: list(ts))
#: Linear weight [out, in] ↔ GPT-2 Conv1D weight [in, out]
register_transform("transpose", _transpose, _transpose)
#: our padded vocabulary rows ↔ the true vocabulary rows
register_transform("vocab_rows", _vocab_cut, _vocab_pad)


def qkv_sizes(ctx: MappingContext) -> list[int]:
    """Output rows of the q, k, v projections."""
    return [ctx.num_heads * ctx.head_dim, ctx.num_kv_heads * ctx.head_dim, ctx.num_kv_heads * ctx.head_dim]


def split_rows(t: torch.Tensor, sizes: Sequence[int], what: str) -> Tensors:
    """Split dim 0 of ``t`` into ``sizes``, with a clear error when it does not add up."""
    if t.shape[0] != sum(sizes):
        raise ValueError(f"{what}: expected {sum(sizes)} rows ({' + '.join(map(str, sizes))}), got {t.shape[0]}")
    return list(torch.split(t, list(sizes), dim=0))


# ---------------------------------------------------------------------------- rules and tables


@dataclass(frozen=True)
class Rule:
    """External names ↔ our names (``{}`` = layer index) and the transform between them."""

    hf: tuple[str, ...]
    ours: tuple[str, ...]
    transform: str = "identity"
    when: Condition | None = None  # rule applies only if this holds
    layers: str | None = None  # context flag holding how many layers ``{}`` spans; None → ctx.num_layers

    @property
    def per_layer(self) -> bool:
        return any("{}" in n for n in self.hf + self.ours)

    def names(self, side: Literal["hf", "ours"], layer: int | None) -> tuple[str, ...]:
        templates = self.hf if side == "hf" else self.ours
        return tuple(t.format(layer) if layer is not None else t for t in templates)


def rule(hf: str | Sequence[str], ours: str | Sequence[str], transform: str = "identity",
         when: Condition | None = None, layers: str | None = None) -> Rule:
    """A :class:`Rule` from one name or a list of names per side. ``layers`` names the context flag
    with the layer count of a second stack (T5's decoder); by default ``{}`` spans ``ctx.num_layers``."""
    as_tuple = (lambda x: (x,) if isinstance(x, str) else tuple(x))
    return Rule(as_tuple(hf), as_tuple(ours), transform, when, layers)


@dataclass(frozen=True)
class Step:
    """One unit of conversion: read ``src``, apply ``fn``, write ``dst`` (in this order)."""

    src: tuple[str, ...]
    dst: tuple[str, ...]
    transform: str
    direction: Direction

    def run(self, tensors: Tensors, ctx: MappingContext) -> Tensors:
        t = get_transform(self.transform)
        fn = t.to_hf if self.direction == "to_hf" else t.from_hf
        try:
            out = fn(list(tensors), ctx)
        except (RuntimeError, ValueError, IndexError) as e:
            shapes = ", ".join(f"{n} {tuple(x.shape)}" for n, x in zip(self.src, tensors))
            msg = first_line(e)
            raise CheckpointError(f"cannot convert {shapes} ({self.transform}): {msg}") from None
        if len(out) != len(self.dst):
            raise RuntimeError(f"transform {self.transform} returned {len(out)} tensors for {self.dst}")
        return out


def _template_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"\d+") + "$")


class TemplateTable:
    """One conversion target's rules; ``ignore_hf`` lists external names (templates, optionally with
    a condition) that carry no weights of ours (old attention-mask buffers, rotary caches, a tied
    head's duplicate) and are skipped when reading."""

    def __init__(self, rules: Iterable[Rule], *, ignore_hf: Iterable[str | tuple[str, Condition]] = ()):
        self.rules = list(rules)
        for r in self.rules:
            get_transform(r.transform)  # fail early on a typo
        self._ignore = [(_template_regex(t), None) if isinstance(t, str) else (_template_regex(t[0]), t[1])
                        for t in ignore_hf]

    def active(self, ctx: MappingContext) -> list[Rule]:
        return [r for r in self.rules if r.when is None or r.when(ctx)]

    def expand(self, ctx: MappingContext) -> list[tuple[Rule, int | None]]:
        """Every (rule, layer) pair of this model in table order; the per-layer rules of one stack
        (same ``layers`` flag) are expanded, layer by layer, where the first of them stands."""
        rules = self.active(ctx)
        stacks: dict[str | None, list[Rule]] = {}
        for r in rules:
            if r.per_layer:
                stacks.setdefault(r.layers, []).append(r)
        out: list[tuple[Rule, int | None]] = []
        for r in rules:
            if not r.per_layer:
                out.append((r, None))
            elif r is stacks[r.layers][0]:
                count = ctx.num_layers if r.layers is None else int(ctx.flag(r.layers))
                out += [(lr, i) for i in range(count) for lr in stacks[r.layers]]
        return out

    def name_map(self, direction: Direction, ctx: MappingContext) -> dict[str, tuple[str, ...]]:
        """Concrete source name → the destination names it contributes to (layer indices filled in)."""
        src, dst = ("ours", "hf") if direction == "to_hf" else ("hf", "ours")
        mapping: dict[str, tuple[str, ...]] = {}
        for r, layer in self.expand(ctx):
            for name in r.names(src, layer):
                mapping[name] = r.names(dst, layer)
        return mapping

    def is_ignored(self, hf_name: str, ctx: MappingContext) -> bool:
        return any(p.match(hf_name) and (cond is None or cond(ctx)) for p, cond in self._ignore)

    def plan(self, direction: Direction, source_names: Iterable[str], ctx: MappingContext,
             *, where: str = "source") -> list[Step]:
        """Steps converting a source holding ``source_names``; every source tensor must be used."""
        src_side, dst_side = ("ours", "hf") if direction == "to_hf" else ("hf", "ours")
        available = set(source_names)
        used: set[str] = set()
        steps: list[Step] = []
        for r, layer in self.expand(ctx):
            src = r.names(src_side, layer)
            missing = [n for n in src if n not in available]
            if missing:
                raise CheckpointError(f"{where} has no tensor '{missing[0]}' (needed for "
                                      f"{', '.join(r.names(dst_side, layer))}); is it the model its config describes?")
            used.update(src)
            steps.append(Step(src, r.names(dst_side, layer), r.transform, direction))
        extra = sorted(n for n in available - used if not (direction == "from_hf" and self.is_ignored(n, ctx)))
        if extra:
            raise CheckpointError(f"{where} holds tensor '{extra[0]}' that the conversion does not use"
                                  + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                                  + "; its config and weights disagree")
        return steps


def check_shapes(step: Step, outputs: Tensors, expected: Mapping[str, torch.Size] | None, *, source: str) -> None:
    """Raise a one-line error when a converted tensor does not have the shape the model expects."""
    if expected is None:
        return
    for name, t in zip(step.dst, outputs):
        want = expected.get(name)
        if want is not None and tuple(t.shape) != tuple(want):
            src = step.src[0] if len(step.src) == 1 else "/".join(step.src)
            raise CheckpointError(f"{source}: tensor '{src}' gives {name} of shape {tuple(t.shape)}, but the "
                                  f"config describes {tuple(want)}; config and weights disagree")


# ---------------------------------------------------------------------------- family adapters


def default_token_config(ids: Mapping[str, int]) -> dict:
    """Tokenizer special ids → config.json token-id keys (decoder-only models: bos, eos, pad)."""
    return {k: ids.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


def require_multi_head_attention(cfg: ModelConfig, architecture: str) -> None:
    """Raise unless ``cfg`` has plain multi-head attention with heads × head_dim = hidden, the only
    kind ``architecture`` (GPT-2, BERT) has."""
    groups = cfg.num_query_groups or cfg.num_attention_heads
    if groups != cfg.num_attention_heads:
        raise CheckpointError(f"cannot export to {architecture}: it has no grouped-query attention "
                              f"(model.num_query_groups={groups}, heads={cfg.num_attention_heads})")
    if head_dim(cfg) * cfg.num_attention_heads != cfg.hidden_size:
        raise CheckpointError(f"cannot export to {architecture}: model.kv_channels × heads must equal hidden_size")


@dataclass(frozen=True)
class HFTarget:
    """One Hugging Face architecture a family converts to and from."""

    model_type: str  # config.json "model_type", e.g. "gpt2"
    architecture: str  # config.json "architectures"[0], the transformers class, e.g. "GPT2LMHeadModel"
    table: TemplateTable
    config_to_hf: Callable[[Any], dict]  # ModelConfig → config.json body (token ids and dtype are added later)
    config_from_hf: Callable[[dict], Any]  # config.json → ModelConfig; CheckpointError when unsupported
    task: str = "causal_lm"  # which probe verify.py runs: causal_lm | masked_lm | seq2seq_lm
    #: config.json + the checkpoint's tensor names → ModelConfig, for targets whose weights decide part
    #: of the config (BERT: is there a pooler / NSP head?); None → ``config_from_hf``
    config_from_checkpoint: Callable[[dict, frozenset[str]], Any] | None = None
    #: external names a checkpoint may leave out because transformers ties them to another tensor:
    #: missing name → the tensor read in its place (T5 v1.1 saved by transformers 5 has no lm_head.weight)
    tied_aliases: Mapping[str, str] = field(default_factory=dict)
    #: tokenizer special ids (``special_token_ids``) → the token-id keys of config.json
    token_config: Callable[[Mapping[str, int]], dict] = default_token_config
    generation: bool = True  # write generation_config.json (the token ids that are set)
    tokenizer_class: str | None = None  # transformers tokenizer class for the export; None → PreTrainedTokenizerFast

    def import_config(self, hf_config: dict, names: Iterable[str]) -> Any:
        """The ModelConfig of a checkpoint with this ``config.json`` holding tensors ``names``."""
        if self.config_from_checkpoint is not None:
            return self.config_from_checkpoint(hf_config, frozenset(names))
        return self.config_from_hf(hf_config)


@dataclass(frozen=True)
class FamilyAdapter:
    """What ``checkpoint/hf.py`` needs from a model family (its ``models/<family>/hf.py``)."""

    family: str
    targets: tuple[HFTarget, ...]
    select: Callable[[Any], HFTarget]  # ModelConfig → the target it exports to, or CheckpointError saying why not
    context: Callable[[Any], MappingContext]  # ModelConfig → MappingContext
    megatron_table: TemplateTable | None = None  # canonical legacy Megatron-LM names ↔ ours (merged shards)
    #: (ModelConfig, TaskConfig) → the target a fine-tuned model (task head) exports to; None: no task export
    select_task: Callable[[Any, Any], HFTarget] | None = None
    #: (model_type, checkpoint tensor names, config.json) → the target reading that checkpoint when the
    #: names decide it (BERT: a headless BertModel folder, a task model); None → the first target of the model_type
    import_target: Callable[[str, frozenset[str], dict], HFTarget | None] | None = None

    def target(self, model_type: str) -> HFTarget | None:
        """The first target reading ``model_type`` (targets sharing a model_type share its table)."""
        return next((t for t in self.targets if t.model_type == model_type), None)
