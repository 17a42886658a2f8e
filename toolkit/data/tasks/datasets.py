"""Fine-tuning datasets: encoded windows or text pairs as fixed-length tensors, and an epoch-shuffled
view of any number of samples (the trainer draws ``max_steps × global_batch_size`` samples)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from toolkit.data.tasks.encoding import IGNORE, Window, encode_ner, encode_pair
from toolkit.data.tasks.formats import NerExample, PairExample
from toolkit.data.tasks.labels import LabelSet


def _pad(ids: list[int], length: int, value: int) -> list[int]:
    return ids + [value] * (length - len(ids))


@dataclass
class EncodedTask:
    """Everything evaluation needs besides the tensors: the examples and their windows."""

    examples: list  # NerExample | PairExample
    windows: list[Window] | None  # token classification only


class TaskDataset(Dataset):
    """Items ``{"tokens", "token_types", "padding_mask", "labels"}`` padded to ``max_length``:
    ``labels`` [s] per position (-100 ignored) for token classification, a class id or a float
    score for sequence tasks.

    The rows are kept as one stacked tensor per key (an item is a view of row ``i``): a data-loader
    worker started with ``spawn`` or ``forkserver`` (macOS's default, Linux's from Python 3.14) receives
    the dataset pickled, and each tensor storage travels as a shared-memory file descriptor: four, not
    four per example (5,514 NCBI-disease windows were 22k descriptors, over a 20k open-file limit)."""

    def __init__(self, rows: list[dict[str, torch.Tensor]], encoded: EncodedTask):
        keys = rows[0].keys() if rows else ()
        self.columns = {k: torch.stack([row[k] for row in rows]) for k in keys}  # key → [n, ...]
        self.size, self.encoded = len(rows), encoded

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: column[i] for k, column in self.columns.items()}


def ner_dataset(examples: list[NerExample], tokenizer, labels: LabelSet | None, *, max_length: int,
                stride: int) -> TaskDataset:
    windows = encode_ner(examples, tokenizer, labels, max_length=max_length, stride=stride)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    rows = [{
        "tokens": torch.tensor(_pad(w.input_ids, max_length, pad)),  # [s]
        "token_types": torch.zeros(max_length, dtype=torch.long),
        "padding_mask": torch.tensor(_pad([1] * len(w.input_ids), max_length, 0)),
        "labels": torch.tensor(_pad(w.labels, max_length, IGNORE)),
    } for w in windows]
    return TaskDataset(rows, EncodedTask(examples, windows))


def pair_dataset(examples: list[PairExample], tokenizer, labels: LabelSet | None, *, max_length: int) -> TaskDataset:
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    ids = labels.id_of if labels is not None else None
    rows = []
    for ex in examples:
        tokens, types = encode_pair(ex, tokenizer, max_length=max_length)
        target = torch.tensor(float(ex.label)) if ids is None else torch.tensor(ids[str(ex.label)])
        rows.append({"tokens": torch.tensor(_pad(tokens, max_length, pad)),
                     "token_types": torch.tensor(_pad(types, max_length, 0)),
                     "padding_mask": torch.tensor(_pad([1] * len(tokens), max_length, 0)),
                     "labels": target})
    return TaskDataset(rows, EncodedTask(examples, None))


class EpochSampled(Dataset):
    """``num_samples`` items drawn epoch by epoch from ``base``, each epoch a new permutation seeded by
    ``(seed, epoch)``: the same order on every run, so a resumed fine-tune sees what it would have."""

    def __init__(self, base: Dataset, num_samples: int, seed: int):
        self.base, self.num_samples, self.seed = base, int(num_samples), int(seed)
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms[epoch] = np.random.RandomState([self.seed % 2**32, epoch]).permutation(len(self.base))
        return self._perms[epoch]

    def __getitem__(self, i: int):
        n = len(self.base)
        return self.base[int(self._perm(i // n)[i % n])]
