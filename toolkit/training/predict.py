"""``megaforge evaluate`` and ``megaforge predict`` on a fine-tuned run directory.

Both load ``checkpoints/best`` when the run kept one (the best validation metric), else the latest
checkpoint. ``predict`` reads raw text — a ``.txt`` file (one document), a ``.jsonl`` file (one
``{"text": ...}`` per line) or a folder of ``.txt`` files — splits it into words with their
character offsets, runs the model over overlapping windows (no text is truncated) and writes one
jsonl line per document, ``{"text", "entities": [{"start", "end", "label", "text", "score"}]}``
with offsets into the original text (``score``: the mean probability of the entity's words), or
BRAT ``NAME.txt`` + ``NAME.ann`` files when the output is a folder (``NAME``: the input file's name,
plus ``-LINE`` for a jsonl line; an entity that crosses a line break is written as BRAT fragments,
:func:`brat_lines`).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from toolkit.checkpoint.native import BEST, is_complete
from toolkit.checkpoint.run_dir import load_megaforge_model
from toolkit.config import RunConfig
from toolkit.data.tasks import Document, LabelSet, document_example, spans
from toolkit.data.tasks.datasets import ner_dataset, pair_dataset
from toolkit.data.tasks.encoding import merge_word_predictions
from toolkit.data.tasks.formats import PairExample, json_lines, read_text
from toolkit.data.tasks.sft import SftDataset, chat_template, encode_sft_examples, read_sft
from toolkit.data.tasks.shipped import resolve_task_file
from toolkit.errors import ConfigError, DataError
from toolkit.training import finetune, generative, seq2seq

logger = logging.getLogger(__name__)


def load_task_run(run_dir: str | Path, *, device: str = "cpu"):
    """(model, config, tokenizer, checkpoint folder) of a fine-tuned run: its best checkpoint if kept."""
    run_dir = Path(run_dir)
    best = run_dir / "checkpoints" / BEST
    src = best if is_complete(best) else run_dir
    model, cfg, tokenizer = load_megaforge_model(src, device=device)
    if cfg.task.type == "none":
        raise ConfigError(f"{run_dir} is a pretraining run (no task section); evaluate and predict need a run from "
                          "megaforge finetune")
    return model, cfg, tokenizer, src


def _labels(cfg: RunConfig) -> LabelSet | None:
    return None if cfg.task.type == "regression" else LabelSet(tuple(cfg.task.labels))


def evaluate_run(run_dir: str | Path, *, split: str = "valid", data: str | None = None, device: str = "cpu",
                 batch_size: int = 32, perplexity: bool = False, stride: int | None = None) -> dict:
    """The task metrics of the run's model on ``split`` (or on the file ``data``); written to
    ``RUN_DIR/eval_<split>.json`` and returned. With ``perplexity`` (always for a pretraining run): the
    perplexity of a decoder run on ``data`` (:mod:`toolkit.training.perplexity`)."""
    if perplexity or generative.run_config(run_dir).task.type == "none":
        from toolkit.training.perplexity import perplexity_run

        return perplexity_run(run_dir, data, stride=stride, device=device, batch_size=batch_size)
    model, cfg, tokenizer, src = load_task_run(run_dir, device=device)
    path = data or finetune.split_file(cfg, split)
    if not path:
        raise ConfigError(f"the run has no task.{split}_file; pass --data FILE")
    if cfg.task.type == "seq2seq":  # the targets' loss, and greedy outputs scored
        return _write_eval(run_dir, split, path, src, seq2seq.evaluate(model, cfg, tokenizer, path,
                                                                       batch_size=batch_size, device=device))
    if cfg.task.type == "sft":  # the masked loss on the split's answers, and greedy answers scored
        template = chat_template(cfg, tokenizer)
        examples = read_sft(resolve_task_file(path))
        dataset = SftDataset(encode_sft_examples(examples, tokenizer, seq_length=cfg.model.seq_length, template=template))
        scores = finetune.sft_loss(model, dataset, batch_size=batch_size, device=torch.device(device))
        scores.update(finetune.sft_generate(model, examples, tokenizer, template=template, device=torch.device(device)))
        return _write_eval(run_dir, split, path, src, scores)
    examples = finetune.read_split(cfg, path)
    labels = _labels(cfg)
    finetune.check(labels, cfg.task.type, examples)
    dataset = finetune.task_dataset(cfg, examples, tokenizer, labels)
    preds, _ = finetune.predict(model, dataset, batch_size=batch_size, device=torch.device(device))
    scores = finetune.metrics(cfg.task.type, dataset, preds, labels)
    return _write_eval(run_dir, split, path, src, scores)


def _write_eval(run_dir, split: str, path, src, scores: dict) -> dict:
    result = {"split": split, "data": str(path), "checkpoint": str(src), **scores}
    out = Path(run_dir) / f"eval_{split}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    logger.info(f"evaluated {src} on {path}: " + ", ".join(f"{k}={v:.4f}" for k, v in scores.items()
                                                           if isinstance(v, float)) + f" → {out}")
    return result


# ---------------------------------------------------------------------------- predict


def read_documents(path: str | Path) -> list[tuple[str, str]]:
    """``(name, text)`` of every input document."""
    path = Path(path)
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files or not files[0].exists():
        raise DataError(f"{path}: no input; pass a .txt file, a .jsonl file with a 'text' key, or a folder of .txt files")
    docs = []
    for f in files:
        if f.suffix != ".jsonl":
            docs.append((f.stem, read_text(f)))
            continue
        for where, obj in json_lines(f):
            if not isinstance(obj.get("text"), str):
                raise DataError(f"{where}: each line needs a string 'text'")
            docs.append((f"{f.stem}-{where.rsplit(':', 1)[1]}", obj["text"]))
    return docs


def predict_documents(model, cfg: RunConfig, tokenizer, texts: list[str], *, device: str = "cpu",
                      batch_size: int = 32) -> list[dict]:
    """One result per text: ``{"text", "entities"}`` (token classification) or ``{"text", "label",
    "score"}`` (sequence classification; regression: ``score`` only)."""
    labels = _labels(cfg)
    if cfg.task.type != "token_classification":
        examples = [PairExample(t, None, 0.0 if labels is None else labels.labels[0], "input") for t in texts]
        dataset = pair_dataset(examples, tokenizer, labels, max_length=cfg.model.seq_length)
        preds, conf = finetune.predict(model, dataset, batch_size=batch_size, device=torch.device(device))
        if labels is None:
            return [{"text": t, "score": float(p)} for t, p in zip(texts, preds)]
        return [{"text": t, "label": labels.labels[p], "score": float(c)} for t, p, c in zip(texts, preds, conf)]
    examples = [document_example(Document(t, [], "input")) for t in texts]
    dataset = ner_dataset(examples, tokenizer, None, max_length=cfg.model.seq_length, stride=cfg.task.stride)
    preds, conf = finetune.predict(model, dataset, batch_size=batch_size, device=torch.device(device))
    windows = dataset.encoded.windows
    n_words = [len(e.words) for e in examples]
    ids = merge_word_predictions(windows, preds, n_words)
    probs = merge_word_predictions(windows, conf, n_words)
    out = []
    for ex, word_ids, word_probs in zip(examples, ids, probs):
        tags = [labels.labels[i] for i in word_ids]
        ents = []
        for label, a, b in spans(tags):
            start, end = ex.offsets[a][0], ex.offsets[b - 1][1]
            score = sum(word_probs[a:b]) / (b - a)
            ents.append({"start": start, "end": end, "label": label, "text": ex.text[start:end],
                         "score": round(score, 6)})
        out.append({"text": ex.text, "entities": ents})
    return out


#: characters ``str.splitlines`` breaks a line at (a superset of what a reader of ``.ann`` files splits at)
_LINE_BREAKS = re.compile(r"[\n\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]+")


def brat_fragments(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """``text[start:end]`` as BRAT fragments: cut at every line break, whitespace at the cuts left out."""
    cuts = [(m.start(), m.end()) for m in _LINE_BREAKS.finditer(text, start, end)]
    frags = []
    for a, b in zip([start] + [e for _, e in cuts], [s for s, _ in cuts] + [end]):
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if a < b:
            frags.append((a, b))
    return frags or [(start, end)]


def brat_lines(text: str, entities: list[dict]) -> list[str]:
    """The ``T`` lines of ``entities`` (``start``/``end`` offsets into ``text``) for a BRAT ``.ann`` file.

    An entity whose span crosses a line break (``chest\\npain``) is written as BRAT writes a
    discontinuous span, ``T1<TAB>LABEL 0 5;6 10<TAB>chest pain``: its text with the line break inside
    would end the ``.ann`` line there and turn the rest of the entity into a line of its own."""
    lines = []
    for i, e in enumerate(entities, 1):
        frags = brat_fragments(text, e["start"], e["end"])
        offsets = ";".join(f"{a} {b}" for a, b in frags)
        lines.append(f"T{i}\t{e['label']} {offsets}\t" + " ".join(text[a:b] for a, b in frags))
    return lines


def predict_run(run_dir: str | Path, input_path: str | Path, output: str | Path, *, device: str = "cpu",
                batch_size: int = 32, **generation) -> Path:
    """``megaforge predict RUN --input FILE --output FILE``: jsonl, or BRAT files when ``output`` is a
    folder (no extension). Decoder runs (pretraining or sft) generate a ``completion`` per prompt line
    (:mod:`toolkit.training.generative`; ``generation``: max_new_tokens, temperature, top_k, top_p, seed)."""
    if generative.run_config(run_dir).task.type in ("none", "sft"):
        return generative.predict_generative(run_dir, input_path, output, device=device, batch_size=batch_size,
                                             **generation)
    model, cfg, tokenizer, src = load_task_run(run_dir, device=device)
    if cfg.task.type == "seq2seq":  # each jsonl line back with its greedy "completion"
        return seq2seq.predict(model, cfg, tokenizer, input_path, output, batch_size=batch_size, device=device,
                               **generation)
    docs = read_documents(input_path)
    results = predict_documents(model, cfg, tokenizer, [t for _, t in docs], device=device, batch_size=batch_size)
    output = Path(output)
    if output.suffix == "" and cfg.task.type == "token_classification":
        output.mkdir(parents=True, exist_ok=True)
        for (name, text), res in zip(docs, results):
            (output / f"{name}.txt").write_text(text, encoding="utf-8")
            lines = brat_lines(text, res["entities"])
            (output / f"{name}.ann").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(output, "w", encoding="utf-8") as fh:
            for res in results:
                fh.write(json.dumps(res, ensure_ascii=False) + "\n")
    found = sum(len(r.get("entities", [])) for r in results)
    logger.info(f"predicted {len(docs)} documents with {src}" + (f" ({found} entities)" if found else "")
                + f" → {output}")
    return output
