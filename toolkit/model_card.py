"""The model card of a published export: ``README.md`` metadata (``huggingface_hub.ModelCardData``)
and a body describing the training recipe, data, parallel layout, final metrics and how to load it,
written from the ``megaforge.json`` that ``megaforge convert --to hf`` leaves in the export (see
:mod:`toolkit.convert.provenance`). Used by :func:`toolkit.hub.publish`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from huggingface_hub import ModelCard


@dataclass(frozen=True)
class ModelInfo:
    """What :func:`toolkit.hub.check_loads` found when it loaded the export with transformers."""

    architecture: str  # transformers class named in config.json, e.g. GPT2LMHeadModel
    auto_class: str  # the Auto class that loads it, e.g. AutoModelForCausalLM
    pipeline_tag: str | None  # Hub task, e.g. text-generation
    model_type: str  # config.json model_type, e.g. gpt2
    parameters: int  # parameter count of the loaded model
    dtype: str  # weight dtype as stored, e.g. float32


@dataclass(frozen=True)
class CardOptions:
    """Model-card metadata given on the command line (None/empty: derived from the export)."""

    license: str | None = None  # SPDX-style Hub license id, e.g. apache-2.0; None → none written
    language: tuple[str, ...] = ()  # ISO 639-1 codes; empty → en for the shipped (English) corpora
    tags: tuple[str, ...] = ()  # added to megaforge, the model type and the family tags
    datasets: tuple[str, ...] = ()  # Hub dataset ids the model was trained on
    base_model: str | None = None  # Hub id of the model this one was fine-tuned from; None → from init_from


def build_card(repo_id: str, info: ModelInfo, provenance: dict | None, options: CardOptions) -> ModelCard:
    """A ``huggingface_hub.ModelCard``: metadata from ``ModelCardData``, body from ``megaforge.json``."""
    from huggingface_hub import ModelCard, ModelCardData

    cfg = (provenance or {}).get("config") or {}
    data, tok = cfg.get("data") or {}, cfg.get("tokenizer") or {}
    corpus = data.get("corpus") if not data.get("data_prefix") else None
    tags = ["megaforge", info.model_type] + (["clinical", "gatortron"] if corpus == "clinical" else [])
    base_model = options.base_model or _hub_id((cfg.get("checkpoint") or {}).get("init_from"))
    metadata = ModelCardData(
        license=options.license, language=list(options.language) or (["en"] if corpus else None),
        library_name="transformers", pipeline_tag=info.pipeline_tag,
        tags=list(dict.fromkeys(tags + list(options.tags))), datasets=list(options.datasets) or None,
        base_model=base_model, model_name=repo_id.split("/")[-1])
    body = _card_body(repo_id, info, provenance, cfg, corpus, tok)
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n{body}")


def _card_body(repo_id: str, info: ModelInfo, prov: dict | None, cfg: dict, corpus: str | None, tok: dict) -> str:
    name = repo_id.split("/")[-1]
    lines = [f"# {name}", ""]
    if not prov:
        lines += [f"A `{info.architecture}` model ({_count(info.parameters)} parameters, {info.dtype} weights) "
                  "published with megaforge. The folder has no megaforge.json, so its training recipe is not "
                  "recorded here.", ""]
        return "\n".join(lines + _how_to_load(repo_id, info))
    m, opt, tr, par = (cfg.get(k) or {} for k in ("model", "optim", "trainer", "parallel"))
    state = prov.get("checkpoint") or {}
    desc = cfg.get("description") or ""
    lines += [f"A `{info.architecture}` model ({_count(info.parameters)} parameters, {info.dtype} weights) trained "
              f"with megaforge from the `{cfg.get('name', '?')}` recipe"
              f"{': ' + desc if desc else ''}, and converted with `megaforge convert --to hf`"
              f" (checkpoint step {state.get('step', '?')}).", ""]
    heads = f"{m.get('num_attention_heads')} heads"
    if m.get("num_query_groups") and m.get("num_query_groups") != m.get("num_attention_heads"):
        heads += f" ({m['num_query_groups']} key/value groups)"
    ffn = m.get("ffn_hidden_size") or 4 * int(m.get("hidden_size") or 0)
    layers = f"{m.get('num_layers')} layers"
    if m.get("family") == "t5":
        layers = f"{m.get('num_layers')} encoder + {m.get('num_decoder_layers') or m.get('num_layers')} decoder layers"
    lr = (f"{opt.get('lr')} → {opt.get('min_lr')} ({opt.get('lr_decay_style')}, "
          f"{opt.get('lr_warmup_steps')} warmup steps)")
    steps, consumed = state.get("step"), state.get("consumed_samples")
    tokens = f" — about {_count(consumed * m['seq_length'])} tokens" if consumed and m.get("seq_length") else ""
    lines += ["## Training recipe", "", "| setting | value |", "| --- | --- |",
              f"| model | {layers}, hidden {m.get('hidden_size')}, {heads}, MLP {ffn}, "
              f"{m.get('normalization')} ({m.get('layernorm_position')}-norm), {m.get('activation')}, "
              f"{m.get('position_embedding_type')} positions |",
              f"| sequence length | {m.get('seq_length')} |",
              f"| vocabulary | {m.get('vocab_size')}"
              + (f" (tokenizer `{_short(tok['path'])}`)" if tok.get("path") else "") + " |",
              f"| optimizer | {opt.get('name')}, lr {lr}, weight decay {opt.get('weight_decay')}, "
              f"betas ({opt.get('adam_beta1')}, {opt.get('adam_beta2')}), gradient clip {opt.get('clip_grad')} |",
              f"| batch | {tr.get('global_batch_size')} sequences per step "
              f"({tr.get('micro_batch_size')} per micro-batch) |",
              f"| steps | {steps} of {tr.get('max_steps')}{tokens} |",
              f"| precision | {tr.get('precision')} |", f"| seed | {state.get('seed', tr.get('seed'))} |", ""]
    task = cfg.get("task") or {}
    if task.get("type") not in (None, "none"):
        lines += _task_lines(task, prov.get("evaluations") or {})
    else:
        data = _data_lines(m.get("family"), cfg.get("data") or {}, corpus, bool(m.get("bert_binary_head")))
        lines += ["## Data", ""] + data + [""]
    layout = state.get("layout") or {}
    tp, pp, dp = (layout.get(k, 1) for k in ("tp", "pp", "dp"))
    extras = ["sequence parallel" if par.get("sequence_parallel") else None,
              f"{par.get('virtual_pipeline_model_parallel_size')} virtual stages per rank"
              if par.get("virtual_pipeline_model_parallel_size") else None,
              f"data-parallel sharding `{par.get('data_parallel_sharding')}`" if dp > 1 else None]
    extras = [e for e in extras if e]
    lines += ["## Parallel layout", "",
              f"Trained on {tp * pp * dp} rank(s): tensor parallel {tp} × pipeline parallel {pp} × data parallel {dp}"
              f"{' (' + ', '.join(extras) + ')' if extras else ''}. The weights here are one unsharded model; "
              "any layout loads them.", ""]
    lines += _metric_lines(prov.get("last_metrics"), prov.get("last_eval"))
    if corpus == "clinical":
        lines += ["## Limitations", "",
                  "Trained on megaforge's synthetic clinical notes (no patient data): a demonstration of the "
                  "GatorTron-style recipe, not a model for clinical use.", ""]
    return "\n".join(lines + _how_to_load(repo_id, info))


_PAIR_TASKS = {"sop": "sentence-order", "nsp": "next-sentence"}  # data.bert_pair_task → card wording
_TASK_WORDS = {"token_classification": "token classification (named-entity recognition)",
               "sequence_classification": "sequence classification", "regression": "regression (a score per text pair)",
               "sft": "instruction following (supervised fine-tuning on prompt/completion and chat data)",
               "seq2seq": "sequence to sequence (input → target text)"}
#: evaluate's flat metrics shown on the card, in this order
_CARD_METRICS = ("f1_strict", "precision_strict", "recall_strict", "f1_lenient", "token_accuracy", "accuracy",
                 "macro_f1", "pearson", "spearman", "exact_match", "token_f1", "rouge_l", "loss")


def _task_lines(task: dict, evaluations: dict) -> list[str]:
    """The fine-tuning task, its labels and data, and ``megaforge evaluate``'s metrics per split."""
    files = [f"{split} `{_short(task.get(f'{split}_file'))}`" for split in ("train", "valid", "test")
             if task.get(f"{split}_file")]
    labels = task.get("labels") or []
    lines = ["## Task", "", f"Fine-tuned for {_TASK_WORDS.get(task['type'], task['type'])}"
             + (f" on {', '.join(files)}" if files else "") + "."]
    if labels:
        lines += ["", "Labels: " + ", ".join(f"`{label}`" for label in labels) + "."]
    lines.append("")
    if evaluations:
        splits = sorted(evaluations)
        shown = [k for k in _CARD_METRICS if any(isinstance(evaluations[s].get(k), (int, float)) for s in splits)]
        lines += ["## Evaluation", "", "Measured with `megaforge evaluate` (NER: entity-level, strict = exact span "
                  "and type, lenient = overlap with the same type).", "",
                  "| metric | " + " | ".join(splits) + " |", "| --- |" + " --- |" * len(splits)]
        for k in shown:
            values = [evaluations[s].get(k) for s in splits]
            lines.append(f"| {k} | " + " | ".join(f"{v:.4f}" if isinstance(v, (int, float)) else "" for v in values)
                         + " |")
        lines.append("")
    return lines


def _data_lines(family: str | None, data: dict, corpus: str | None, binary_head: bool) -> list[str]:
    objective = {"gpt": "causal language modelling (next-token prediction)",
                 "bert": f"masked language modelling ({data.get('masked_lm_prob', 0.15):.0%} of tokens masked"
                         f"{', whole words' if data.get('whole_word_masking') else ''})"
                         + (f" and {pair} prediction" if binary_head and (pair := _PAIR_TASKS.get(
                             data.get("bert_pair_task"))) else ""),
                 "t5": f"span corruption ({data.get('noise_density', 0.15):.0%} of tokens, mean span "
                       f"{data.get('mean_noise_span_length', 3.0)})"}.get(family or "", "pretraining")
    if corpus:
        what = {"english": "megaforge's shipped English corpus (Shakespeare's works, Project Gutenberg etexts)",
                "clinical": "megaforge's shipped synthetic clinical notes"}.get(corpus,
                                                                                f"the shipped corpus `{corpus}`")
        source = [f"- {what}"]
    else:
        prefixes = list(data.get("data_prefix") or [])
        pairs = list(zip(prefixes[::2], prefixes[1::2])) if prefixes and _is_number(prefixes[0]) else \
            [(None, p) for p in prefixes]
        source = [f"- `{_short(p)}`" + (f" (weight {w})" if w is not None else "") for w, p in pairs]
    return [f"Objective: {objective}.", ""] + source


def _metric_lines(last: dict | None, last_eval: dict | None) -> list[str]:
    if not last and not last_eval:
        return ["## Final metrics", "", "No metrics.jsonl was found in the run directory.", ""]
    rows = [("step", (last or last_eval or {}).get("step"))]
    if last and "loss" in last:
        rows.append(("training loss", f"{last['loss']:.4f}"))
    if last_eval:
        rows.append((f"validation loss (step {last_eval.get('step')})", f"{last_eval['val_loss']:.4f}"))
        if "val_ppl" in last_eval:
            rows.append(("validation perplexity", f"{last_eval['val_ppl']:.2f}"))
    return ["## Final metrics", "", "| metric | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows] + [""]


def _how_to_load(repo_id: str, info: ModelInfo) -> list[str]:
    example = {"text-generation": 'pipe("The patient was")',
               "fill-mask": 'pipe(f"The patient was {pipe.tokenizer.mask_token} to the ward.")',
               "text2text-generation": 'pipe("summarize: The patient was admitted with chest pain.")',
               "token-classification": 'pipe("The patient has type 2 diabetes and takes metformin.")',
               "text-classification": 'pipe("The patient was admitted with chest pain.")'}
    lines = ["## How to load", "", "```python", f"from transformers import AutoTokenizer, {info.auto_class}",
             "", f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
             f'model = {info.auto_class}.from_pretrained("{repo_id}")']
    if info.auto_class == "AutoModelForPreTraining":
        lines[3] = "from transformers import AutoModelForMaskedLM, AutoModelForPreTraining, AutoTokenizer"
        lines.append(f'mlm = AutoModelForMaskedLM.from_pretrained("{repo_id}")  # the masked-LM head alone')
    if info.pipeline_tag in example:
        lines += ["", "from transformers import pipeline", "",
                  f'pipe = pipeline("{info.pipeline_tag}", model="{repo_id}"'
                  + (', aggregation_strategy="first")' if info.pipeline_tag == "token-classification" else ")"),
                  example[info.pipeline_tag]]
    return lines + ["```", ""]


# ---------------------------------------------------------------------------- small helpers


def _hub_id(value: str | None) -> str | None:
    """``value`` when it reads as a Hub model id (namespace/name, not a local path)."""
    if not value or Path(value).expanduser().exists() or value.startswith((".", "/", "~")):
        return None
    return value if re.fullmatch(r"[\w.-]+/[\w.-]+", value) else None


def _short(path: str | None) -> str:
    return Path(str(path)).name if path and ("/" in str(path) or os.sep in str(path)) else str(path)


def _is_number(value) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def _count(n: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))
