"""Sequence-to-sequence fine-tuning of encoder–decoders (``task.type: seq2seq``, T5): the datasets
``megaforge finetune`` trains on, generation-based validation, and what ``megaforge evaluate`` and
``megaforge predict`` do with a seq2seq run.

Validation (every ``trainer.eval_interval``) and ``evaluate`` report the token-weighted loss of the
targets (``loss``, ``ppl``, ``num_tokens``) and score greedy outputs against the targets:
``exact_match``, ``token_f1``, ``rouge_l`` (:func:`~toolkit.evaluation.metrics.generation_metrics`).
Outputs are decoded in batches with the model's KV cache (the encoder runs once per batch, the
cross-attention keys are computed once, each step feeds one token), at most
``model.decoder_seq_length`` tokens, each row stopping at EOS.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from torch import nn

from toolkit.config import RunConfig
from toolkit.data.tasks.seq2seq import (
    Seq2SeqDataset,
    Seq2SeqExample,
    decoder_start_id,
    encode_input,
    encode_seq2seq_examples,
    read_seq2seq,
)
from toolkit.data.tasks.shipped import resolve_task_file
from toolkit.errors import DataError
from toolkit.evaluation.metrics import generation_metrics
from toolkit.generation import sample_next

logger = logging.getLogger(__name__)


def read_split(cfg: RunConfig, path: str) -> list[Seq2SeqExample]:
    return read_seq2seq(resolve_task_file(path), input_field=cfg.task.input_field, target_field=cfg.task.target_field)


def dataset(cfg: RunConfig, examples: list[Seq2SeqExample], tokenizer) -> Seq2SeqDataset:
    return Seq2SeqDataset(encode_seq2seq_examples(examples, tokenizer, seq_length=cfg.model.seq_length,
                                                  decoder_seq_length=cfg.model.decoder_seq_length))


def truncation_note(cfg: RunConfig, ds: Seq2SeqDataset) -> str:
    e = ds.encoded
    notes = []
    if e.truncated_inputs:
        notes.append(f"{e.truncated_inputs} inputs cut to model.seq_length={cfg.model.seq_length}")
    if e.truncated_targets:
        notes.append(f"{e.truncated_targets} targets cut to model.decoder_seq_length={cfg.model.decoder_seq_length}")
    return "; ".join(notes)


def prepare(cfg: RunConfig, tokenizer) -> tuple[Seq2SeqDataset, Seq2SeqDataset | None]:
    """(train, valid) datasets of the run's task files; truncations logged."""
    train = dataset(cfg, read_split(cfg, cfg.task.train_file), tokenizer)
    valid = dataset(cfg, read_split(cfg, cfg.task.valid_file), tokenizer) if cfg.task.valid_file else None
    cut = "; ".join(f"{name}: {note}" for name, note in (("train", truncation_note(cfg, train)),
                                                         ("valid", valid and truncation_note(cfg, valid))) if note)
    logger.info(f"fine-tuning for seq2seq: {len(train)} training examples"
                + (f", {len(valid)} validation examples" if valid is not None else "") + (f" ({cut})" if cut else ""))
    return train, valid


def _rows(ds: Seq2SeqDataset, start: int, stop: int, device: torch.device) -> dict[str, torch.Tensor]:
    rows = [ds[i] for i in range(start, min(stop, len(ds)))]
    return {k: torch.stack([r[k] for r in rows]).to(device) for k in rows[0]}


@torch.no_grad()
def seq2seq_loss(model: nn.Module, ds: Seq2SeqDataset, *, batch_size: int, device: torch.device) -> dict:
    """Token-weighted target loss (and perplexity) of ``model`` over all of ``ds``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(ds), batch_size):
            b = _rows(ds, start, start + batch_size, device)
            logits = model(b["encoder_tokens"], b["decoder_tokens"], b["encoder_padding_mask"])  # [b, s_dec, V]
            logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits
            total += float(torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), b["labels"].flatten(),
                                                             reduction="sum"))  # -100 ignored
            count += int((b["labels"] != -100).sum())
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "num_tokens": count}


@torch.no_grad()
def generate_batch(model: nn.Module, tokenizer, inputs: list[str], *, seq_length: int, max_new_tokens: int,
                   device: torch.device, sample=None) -> list[str]:
    """Greedy outputs of ``model`` for ``inputs`` (one batch, right-padded, each cut to ``seq_length``
    tokens as training cuts them); each output ends before its EOS. ``sample`` (last-position logits
    [b, V] → ids [b]) replaces greedy choice."""
    encoded = [encode_input(text, tokenizer, seq_length)[0] for text in inputs]
    width = max(len(ids) for ids in encoded)
    pad = decoder_start_id(tokenizer)
    tokens = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.bool)
    for r, ids in enumerate(encoded):
        tokens[r, : len(ids)], mask[r, : len(ids)] = torch.tensor(ids), True
    was_training = model.training
    try:
        new = model.generate_seq2seq(tokens.to(device), encoder_padding_mask=mask.to(device),
                                     max_new_tokens=max_new_tokens, decoder_start_id=pad,
                                     eos_id=tokenizer.eos_id, **({"sample": sample} if sample else {}))  # [b, n]
    finally:
        model.train(was_training)
    out = []
    for row in new.tolist():
        out.append(tokenizer.decode(row[: row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row))
    return out


def generate_all(model: nn.Module, tokenizer, inputs: list[str], *, seq_length: int, max_new_tokens: int,
                 batch_size: int, device: torch.device, sample=None) -> list[str]:
    """:func:`generate_batch` over ``inputs`` in batches of ``batch_size`` (sorted by length, so each
    batch pads little), in the order given."""
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    out: list[str | None] = [None] * len(inputs)
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        for i, text in zip(idx, generate_batch(model, tokenizer, [inputs[i] for i in idx], seq_length=seq_length,
                                                max_new_tokens=max_new_tokens, device=device, sample=sample)):
            out[i] = text
    return out


def seq2seq_scores(model: nn.Module, cfg: RunConfig, tokenizer, ds: Seq2SeqDataset, *, batch_size: int,
                   device: torch.device) -> dict:
    """The loss of ``ds``'s targets and the generation metrics of greedy outputs against them."""
    scores = seq2seq_loss(model, ds, batch_size=batch_size, device=device)
    examples = ds.encoded.examples
    preds = generate_all(model, tokenizer, [e.input for e in examples], seq_length=cfg.model.seq_length,
                         max_new_tokens=cfg.model.decoder_seq_length, batch_size=batch_size, device=device)
    scores.update(generation_metrics([e.target for e in examples], preds))
    return scores


def evaluator(cfg: RunConfig, valid: Seq2SeqDataset, tokenizer, device: torch.device):
    """``(model parts) -> scores`` on the validation set, for the trainer."""
    return lambda parts: seq2seq_scores(parts[0], cfg, tokenizer, valid, batch_size=cfg.trainer.micro_batch_size,
                                        device=device)


def evaluate(model: nn.Module, cfg: RunConfig, tokenizer, path: str, *, batch_size: int, device: str) -> dict:
    """``megaforge evaluate`` on a seq2seq run: :func:`seq2seq_scores` of the records in ``path``."""
    ds = dataset(cfg, read_split(cfg, path), tokenizer)
    cut = truncation_note(cfg, ds)
    if cut:
        logger.info(f"{path}: {cut}")
    return seq2seq_scores(model, cfg, tokenizer, ds, batch_size=batch_size, device=torch.device(device))


def predict(model: nn.Module, cfg: RunConfig, tokenizer, input_path: str | Path, output: str | Path, *,
            batch_size: int, device: str, max_new_tokens: int | None = None, temperature: float = 0.0,
            top_k: int | None = None, top_p: float | None = None, seed: int | None = 0) -> Path:
    """``megaforge predict`` on a seq2seq run: each jsonl line of ``input_path`` written back to
    ``output`` with a ``completion`` field (the output for its ``task.input_field``: greedy, or sampled
    with ``temperature`` > 0, ``top_k``, ``top_p`` from ``seed``); at most ``max_new_tokens`` tokens
    (default ``model.decoder_seq_length``)."""
    input_path, output = Path(input_path), Path(output)
    if input_path.suffix not in (".jsonl", ".gz"):
        raise DataError(f"{input_path}: a seq2seq run predicts from a .jsonl file with a {cfg.task.input_field!r} "
                        "key per line")
    examples = read_seq2seq(input_path, input_field=cfg.task.input_field, target_field=None)
    sample = None
    if temperature > 0:
        gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

        def sample(logits: torch.Tensor) -> torch.Tensor:
            return sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
    texts = generate_all(model, tokenizer, [e.input for e in examples], seq_length=cfg.model.seq_length,
                         max_new_tokens=max_new_tokens or cfg.model.decoder_seq_length, batch_size=batch_size,
                         device=torch.device(device), sample=sample)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", encoding="utf-8") as fh:
        for ex, text in zip(examples, texts):
            fh.write(json.dumps({**ex.record, "completion": text}, ensure_ascii=False) + "\n")
    logger.info(f"predicted {len(examples)} records → {output}")
    return output
