"""Fine-tuning for a task (``task.type`` set): the task datasets, labels, and the metrics of a model
on a split — what ``megaforge finetune`` trains with, validates every ``trainer.eval_interval``,
and ``megaforge evaluate`` reports.

Labels are discovered from the training file (or kept from ``task.labels`` when set, e.g. a run
continuing another fine-tune) and saved in the run's ``config.yaml``; a valid/test label not among
them is an error naming file, line and label. Token classification is scored per word (the
prediction of each word's first sub-token, from the window that owns it) against the file's tags.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from toolkit.config import RunConfig
from toolkit.data.tasks import LabelSet, read_examples, resolve_task_file
from toolkit.data.tasks.datasets import EpochSampled, TaskDataset, ner_dataset, pair_dataset
from toolkit.data.tasks.encoding import merge_word_predictions
from toolkit.data.tasks.sft import SftDataset, chat_template, encode_sft_examples, generation_prompt, read_sft
from toolkit.errors import ConfigError, DataError
from toolkit.evaluation.metrics import classification_metrics, generation_metrics, ner_metrics, regression_metrics
from toolkit.training import seq2seq

logger = logging.getLogger(__name__)

#: the validation metric ``checkpoints/best`` follows unless ``task.metric_for_best`` names another
MAIN_METRIC = {"token_classification": "f1_strict", "sequence_classification": "accuracy", "regression": "pearson",
               "sft": "loss", "seq2seq": "rouge_l"}


def split_file(cfg: RunConfig, split: str) -> str | None:
    return {"train": cfg.task.train_file, "valid": cfg.task.valid_file, "test": cfg.task.test_file}[split]


def read_split(cfg: RunConfig, path: str) -> list:
    return read_examples(resolve_task_file(path), cfg.task.format, regression=cfg.task.type == "regression")


def set_labels(cfg: RunConfig, train: list) -> LabelSet | None:
    """The run's label set: ``task.labels`` if given, else discovered from ``train`` (and stored)."""
    t = cfg.task.type
    if t in ("regression", "sft"):
        return None
    found = LabelSet.for_ner(train) if t == "token_classification" else LabelSet.for_classes(train)
    if not cfg.task.labels:
        cfg.task.labels = list(found.labels)
    labels = LabelSet(tuple(cfg.task.labels))

    def present(e) -> list[str]:
        return list(e.tags) if t == "token_classification" else [str(e.label)]

    missing = sorted({label for e in train for label in present(e)} - set(labels.labels))
    if missing:  # task.labels was given, or taken over from a fine-tuned checkpoint.init_from
        where = next(e.where for e in train if missing[0] in present(e))
        raise DataError(f"{where}: label {missing[0]!r} is not in task.labels ({', '.join(labels.labels)}; set in the "
                        "config or taken over from a fine-tuned checkpoint.init_from); list every label in "
                        "task.labels (a label set other than the source's trains a fresh classifier)")
    return labels


def check(labels: LabelSet | None, task_type: str, examples: list) -> None:
    if labels is None:
        return
    if task_type == "token_classification":
        labels.check_ner(examples)
    else:
        labels.check_classes(examples)


def task_dataset(cfg: RunConfig, examples: list, tokenizer, labels: LabelSet | None) -> TaskDataset:
    if cfg.task.type == "token_classification":
        return ner_dataset(examples, tokenizer, labels, max_length=cfg.model.seq_length, stride=cfg.task.stride)
    return pair_dataset(examples, tokenizer, labels, max_length=cfg.model.seq_length)


@dataclass
class FinetuneData:
    train: EpochSampled  # max_steps × global_batch_size samples, epoch by epoch
    valid: TaskDataset | None
    labels: LabelSet | None
    # a task's own validation, device → (model parts → scores) (seq2seq: loss and generation scores)
    make_evaluator: Callable[[torch.device], Callable[[list[nn.Module]], dict]] | None = None


def prepare(cfg: RunConfig, tokenizer) -> FinetuneData:
    """Read the train (and valid) files, fix ``task.labels`` and encode them."""
    if not cfg.task.train_file:
        raise ConfigError(f"task.type={cfg.task.type} needs task.train_file (a file, a BRAT folder or a shipped "
                          "task such as ncbi-disease:train)")
    if cfg.task.type == "sft":
        return _prepare_sft(cfg, tokenizer)
    if cfg.task.type == "seq2seq":
        return _prepare_seq2seq(cfg, tokenizer)
    train = read_split(cfg, cfg.task.train_file)
    labels = set_labels(cfg, train)
    valid = None
    if cfg.task.valid_file:
        examples = read_split(cfg, cfg.task.valid_file)
        check(labels, cfg.task.type, examples)
        valid = task_dataset(cfg, examples, tokenizer, labels)
    train_ds = task_dataset(cfg, train, tokenizer, labels)
    t = cfg.trainer
    logger.info(f"fine-tuning for {cfg.task.type}: {len(train)} training examples ({len(train_ds)} inputs)"
                + (f", {len(valid.encoded.examples)} validation examples" if valid is not None else "")
                + (f"; labels {', '.join(labels.labels)}" if labels is not None else ""))
    return FinetuneData(train=EpochSampled(train_ds, t.max_steps * t.global_batch_size, t.seed), valid=valid,
                        labels=labels)


@torch.no_grad()
def predict(model: nn.Module, dataset: TaskDataset, *, batch_size: int,
            device: torch.device) -> tuple[list, list]:
    """Model outputs over ``dataset`` in order: per row the predicted ids [s] (token classification),
    the class id, or the score; and the matching confidences (softmax probability; None for scores)."""
    was_training = model.training
    model.eval()
    preds, scores = [], []
    try:
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: torch.stack([r[k] for r in rows]).to(device) for k in ("tokens", "token_types", "padding_mask")}
            out = model(batch["tokens"], token_types=batch["token_types"], padding_mask=batch["padding_mask"])
            out = out.full_tensor() if hasattr(out, "full_tensor") else out
            if out.dim() == 1:  # regression scores [b]
                preds += out.float().cpu().tolist()
                scores += [None] * len(rows)
            else:
                probs = out.float().softmax(-1)  # [b, (s,) labels]
                conf, ids = probs.max(-1)
                preds += ids.cpu().tolist()
                scores += conf.cpu().tolist()
    finally:
        model.train(was_training)
    return preds, scores


def metrics(task_type: str, dataset: TaskDataset, preds: list, labels: LabelSet | None) -> dict:
    """The task's metrics of ``preds`` (from :func:`predict`) against the dataset's gold labels."""
    examples = dataset.encoded.examples
    if task_type == "token_classification":
        words = merge_word_predictions(dataset.encoded.windows, preds, [len(e.words) for e in examples])
        pred_tags = [[labels.labels[i] for i in w] for w in words]
        return ner_metrics([e.tags for e in examples], pred_tags)
    if task_type == "sequence_classification":
        return classification_metrics([str(e.label) for e in examples], [labels.labels[i] for i in preds],
                                      labels=list(labels.labels))
    return regression_metrics([float(e.label) for e in examples], preds)


def _prepare_sft(cfg: RunConfig, tokenizer) -> FinetuneData:
    template = chat_template(cfg, tokenizer)

    def encode(path: str, packing: bool) -> SftDataset:
        examples = read_sft(resolve_task_file(path))
        return SftDataset(encode_sft_examples(examples, tokenizer, seq_length=cfg.model.seq_length, template=template,
                                              packing=packing))

    train = encode(cfg.task.train_file, cfg.task.packing)
    valid = encode(cfg.task.valid_file, False) if cfg.task.valid_file else None  # validation: one sample per row
    dropped = train.encoded.dropped + (valid.encoded.dropped if valid is not None else 0)
    packed = f" packed into {len(train)} sequences" if cfg.task.packing else ""
    logger.info(f"fine-tuning for sft: {len(train.encoded.examples)} training examples{packed}"
                + (f", {len(valid)} validation examples" if valid is not None else "")
                + (f"; {dropped} dropped: their answers do not fit model.seq_length={cfg.model.seq_length}" if dropped else ""))
    t = cfg.trainer
    return FinetuneData(train=EpochSampled(train, t.max_steps * t.global_batch_size, t.seed), valid=valid, labels=None)


def _prepare_seq2seq(cfg: RunConfig, tokenizer) -> FinetuneData:
    train, valid = seq2seq.prepare(cfg, tokenizer)
    t = cfg.trainer
    return FinetuneData(train=EpochSampled(train, t.max_steps * t.global_batch_size, t.seed), valid=valid, labels=None,
                        make_evaluator=lambda device: seq2seq.evaluator(cfg, valid, tokenizer, device))


@torch.no_grad()
def sft_loss(model: nn.Module, dataset: SftDataset, *, batch_size: int, device: torch.device) -> dict:
    """Token-weighted masked next-token loss (and perplexity) of ``model`` over all of ``dataset``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            tokens = torch.stack([r["tokens"] for r in rows]).to(device)  # [b, s + 1]
            mask = torch.stack([r["loss_mask"] for r in rows]).to(device)  # [b, s]
            logits = model(tokens[:, :-1])  # [b, s, V]
            logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits
            losses = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten(),
                                                       reduction="none")  # [b·s]
            total += float(losses[mask.flatten()].sum())
            count += int(mask.sum())
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "num_tokens": count}


@torch.no_grad()
def sft_generate(model: nn.Module, examples: list, tokenizer, *, template: str | None, device: torch.device,
                 max_new_tokens: int = 64, batch_size: int = 32) -> dict:
    """Greedy answers to each example's prompt, generated in left-padded batches
    (:func:`toolkit.training.generative.generate_texts`: the same answers as one prompt at a time),
    scored against the reference: :func:`generation_metrics`."""
    from toolkit.training.generative import generate_texts

    prompts, refs = zip(*(generation_prompt(ex, tokenizer, template) for ex in examples))
    preds = generate_texts(model, tokenizer, list(prompts), batch_size=batch_size, max_new_tokens=max_new_tokens)
    return generation_metrics(list(refs), preds)


def evaluator(cfg: RunConfig, data: FinetuneData, device: torch.device):
    """``(model parts) -> {metric: value}`` on the validation set, for the trainer (None without one)."""
    if data.valid is None:
        return None
    if data.make_evaluator is not None:
        return data.make_evaluator(device)
    if cfg.task.type == "sft":
        return lambda parts: sft_loss(parts[0], data.valid, batch_size=cfg.trainer.micro_batch_size, device=device)

    def run(parts: list[nn.Module]) -> dict:
        preds, _ = predict(parts[0], data.valid, batch_size=cfg.trainer.micro_batch_size, device=device)
        return metrics(cfg.task.type, data.valid, preds, data.labels)

    return run


def main_metric(cfg: RunConfig) -> str:
    return cfg.task.metric_for_best or MAIN_METRIC[cfg.task.type]
