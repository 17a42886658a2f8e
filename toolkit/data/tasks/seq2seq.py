"""Sequence-to-sequence fine-tuning data for encoder–decoders (``task.type: seq2seq``, T5).

A jsonl record holds the encoder input and the target text under ``task.input_field`` and
``task.target_field`` (``input`` and ``target`` by default); other keys are kept for ``predict``.

Encoding is Hugging Face T5's (``tokenizer(input, text_target=target, truncation=True)`` with a
``DataCollatorForSeq2Seq``):

* encoder tokens: ``input`` tokens then EOS, at most ``model.seq_length`` (a longer input keeps its
  first ``seq_length - 1`` tokens and its EOS; truncations are counted and logged), right-padded with
  the pad id and masked out by ``encoder_padding_mask``;
* labels: ``target`` tokens then EOS, at most ``model.decoder_seq_length`` (likewise), then -100: the
  loss is on every target token and the EOS, never on padding;
* decoder inputs: the labels shifted right behind the decoder start token (T5: the pad id, 0), -100
  read as the pad id — exactly ``T5ForConditionalGeneration._shift_right(labels)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from toolkit.data.tasks.formats import json_lines
from toolkit.errors import ConfigError, DataError

IGNORE_INDEX = -100


@dataclass
class Seq2SeqExample:
    """One record: the encoder ``input`` text, the ``target`` (None when only predicting), where it came
    from (``file:line``) and the whole jsonl object (``predict`` writes it back)."""

    input: str
    target: str | None
    where: str
    record: dict = field(default_factory=dict)


def parse_seq2seq_record(obj: dict, where: str, *, input_field: str = "input", target_field: str | None = "target"
                         ) -> Seq2SeqExample:
    """A jsonl object → :class:`Seq2SeqExample`; a missing or non-string field is a one-line DataError.
    ``target_field=None`` reads inputs only (prediction)."""
    fields = [input_field] + ([target_field] if target_field is not None else [])
    for name in fields:
        if name not in obj:
            raise DataError(f"{where}: a seq2seq record needs {' and '.join(repr(f) for f in fields)} (has "
                            f"{sorted(obj)}); rename the keys or set task.input_field / task.target_field")
        if not isinstance(obj[name], str):
            raise DataError(f"{where}: {name!r} must be a string, got {type(obj[name]).__name__}")
    target = obj[target_field] if target_field is not None else None
    return Seq2SeqExample(obj[input_field], target, where, obj)


def read_seq2seq(path: str | Path, *, input_field: str = "input", target_field: str | None = "target"
                 ) -> list[Seq2SeqExample]:
    """The records of a jsonl file, one per line (``target_field=None``: inputs only)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; check task.train_file / valid_file / test_file or --input")
    examples = [parse_seq2seq_record(obj, where, input_field=input_field, target_field=target_field)
                for where, obj in json_lines(path)]
    if not examples:
        raise DataError(f"{path} holds no records; check the file (an empty split cannot train or evaluate)")
    return examples


def decoder_start_id(tokenizer) -> int:
    """The token decoding starts from: T5's pad id (0)."""
    return tokenizer.pad_id if tokenizer.pad_id is not None else 0


def _eos(tokenizer) -> int:
    if tokenizer.eos_id is None:
        raise ConfigError("seq2seq needs a tokenizer with an end-of-sequence token (T5's </s>): the encoder input "
                          "ends with it and the model learns to stop at it")
    return tokenizer.eos_id


def encode_input(text: str, tokenizer, length: int) -> tuple[list[int], bool]:
    """(``text`` tokens + EOS cut to ``length`` keeping the EOS, whether it was cut)."""
    ids = tokenizer.encode(text)
    cut = len(ids) > length - 1
    return ids[: length - 1] + [_eos(tokenizer)], cut


@dataclass
class Seq2SeqEncoded:
    """Encoded records, one row each: encoder tokens and mask [n, seq_length], decoder inputs and labels
    [n, decoder_seq_length]; how many inputs and targets were truncated."""

    encoder_tokens: np.ndarray
    encoder_padding_mask: np.ndarray
    decoder_tokens: np.ndarray
    labels: np.ndarray
    examples: list[Seq2SeqExample]
    truncated_inputs: int = 0
    truncated_targets: int = 0


def encode_seq2seq_examples(examples: list[Seq2SeqExample], tokenizer, *, seq_length: int,
                            decoder_seq_length: int) -> Seq2SeqEncoded:
    """Encode ``examples`` (see the module doc) in rows of ``seq_length`` / ``decoder_seq_length``."""
    pad, start = decoder_start_id(tokenizer), decoder_start_id(tokenizer)
    n = len(examples)
    enc = np.full((n, seq_length), pad, dtype=np.int64)
    enc_mask = np.zeros((n, seq_length), dtype=bool)
    dec = np.full((n, decoder_seq_length), pad, dtype=np.int64)
    labels = np.full((n, decoder_seq_length), IGNORE_INDEX, dtype=np.int64)
    cut_in = cut_out = 0
    for r, ex in enumerate(examples):
        ids, cut = encode_input(ex.input, tokenizer, seq_length)
        cut_in += cut
        enc[r, : len(ids)], enc_mask[r, : len(ids)] = ids, True
        target, cut = encode_input(ex.target or "", tokenizer, decoder_seq_length)
        cut_out += cut
        labels[r, : len(target)] = target
        dec[r, 0] = start
        dec[r, 1: len(target) + 1] = target[: decoder_seq_length - 1]  # shifted right behind the start token
    return Seq2SeqEncoded(enc, enc_mask, dec, labels, examples, cut_in, cut_out)


class Seq2SeqDataset(torch.utils.data.Dataset):
    """Rows ``{"encoder_tokens", "encoder_padding_mask"}`` [seq_length] and ``{"decoder_tokens",
    "labels"}`` [decoder_seq_length] (-100 on padding), the batch the T5 objective takes."""

    def __init__(self, encoded: Seq2SeqEncoded):
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.encoded.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        e = self.encoded
        return {"encoder_tokens": torch.from_numpy(e.encoder_tokens[i]),
                "encoder_padding_mask": torch.from_numpy(e.encoder_padding_mask[i]),
                "decoder_tokens": torch.from_numpy(e.decoder_tokens[i]), "labels": torch.from_numpy(e.labels[i])}
