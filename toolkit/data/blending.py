"""Blend several datasets by weight, and parse ``data.data_prefix`` lists.

:class:`BlendedDataset` assigns every global sample to a component dataset with Megatron's greedy
rule: sample ``i`` goes to the dataset that is most under-sampled relative to its weight after
``i + 1`` samples. After any number of samples ``n`` each dataset's realized count stays within
one sample of ``weight × n`` (checked for up to four datasets with arbitrary weights; with many
very unequal weights the greedy rule can drift slightly beyond one), and the assignment is a pure
function of the weights and size.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from toolkit.data.megatron_indexed import open_indexed
from toolkit.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


def _as_weight(item: Any) -> float | None:
    """``item`` as a float if it is a number or a numeric string, else None."""
    if isinstance(item, bool):
        return None
    if isinstance(item, (int, float)):
        return float(item)
    if isinstance(item, str):
        try:
            return float(item.strip())
        except ValueError:
            return None
    return None


def parse_data_prefix(data_prefix: Sequence[Any] | str | Path) -> tuple[list[str], list[float]]:
    """``data.data_prefix`` → (prefixes, weights normalized to sum to 1).

    Accepts ``["path"]``, ``["p1", "p2"]`` (equal weights) and ``[0.7, "p1", 0.3, "p2"]`` (weights
    may be numbers or numeric strings and need not sum to 1). Anything else is a ConfigError.
    """
    if isinstance(data_prefix, (str, Path)):
        data_prefix = [data_prefix]
    items = list(data_prefix)
    if not items:
        raise ConfigError("data.data_prefix is empty; give at least one indexed-dataset prefix")
    if _as_weight(items[0]) is None:  # plain list of paths
        for i, item in enumerate(items):
            if not isinstance(item, (str, Path)) or not str(item) or _as_weight(item) is not None:
                raise ConfigError(
                    f"data.data_prefix[{i}]={item!r}: expected a dataset prefix; to weight datasets, "
                    "give a weight before every prefix, e.g. [0.7, data/a, 0.3, data/b]"
                )
        return [str(p) for p in items], [1.0 / len(items)] * len(items)
    if len(items) % 2:
        raise ConfigError(
            f"data.data_prefix has {len(items)} entries; weighted form needs pairs: [WEIGHT, PREFIX, WEIGHT, PREFIX, ...]"
        )
    prefixes: list[str] = []
    weights: list[float] = []
    for i in range(0, len(items), 2):
        w, p = _as_weight(items[i]), items[i + 1]
        if w is None:
            raise ConfigError(f"data.data_prefix[{i}]={items[i]!r}: expected a weight (number) before prefix {p!r}")
        if not math.isfinite(w) or w <= 0:
            raise ConfigError(f"data.data_prefix[{i}]={items[i]!r}: weights must be positive numbers")
        if not isinstance(p, (str, Path)) or not str(p) or _as_weight(p) is not None:
            raise ConfigError(f"data.data_prefix[{i + 1}]={p!r}: expected a dataset prefix after weight {w}")
        prefixes.append(str(p))
        weights.append(w)
    total = sum(weights)
    return prefixes, [w / total for w in weights]


def blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy assignment of ``size`` samples to datasets.

    Returns ``dataset_index`` (int16 [size]: which dataset) and ``dataset_sample_index`` (int64
    [size]: the running sample number within that dataset).
    """
    w = [float(x) for x in weights]
    total = sum(w)
    w = [x / total for x in w]
    k = len(w)
    dataset_index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    if k == 1:
        sample_index[:] = np.arange(size)
        return dataset_index, sample_index
    counts = [0] * k
    ds_out: list[int] = [0] * size
    smp_out: list[int] = [0] * size
    rest = range(1, k)
    for i in range(size):  # pure-Python loop over lists: ~1 µs per sample for a few datasets
        n = i + 1
        best, best_err = 0, w[0] * n - counts[0]
        for d in rest:
            err = w[d] * n - counts[d]
            if err > best_err:
                best, best_err = d, err
        ds_out[i] = best
        smp_out[i] = counts[best]
        counts[best] += 1
    dataset_index[:] = ds_out
    sample_index[:] = smp_out
    return dataset_index, sample_index


class BlendedDataset:
    """Samples from ``datasets`` in proportion to ``weights``; ``len == size``; deterministic.

    ``seed`` is recorded for cache keys and reproducibility reports; the assignment itself needs no
    randomness (each component already shuffles its own samples).
    """

    def __init__(self, datasets: Sequence[Any], weights: Sequence[float], size: int, seed: int = 0) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ConfigError(f"BlendedDataset needs one weight per dataset, got {len(datasets)} datasets and {len(weights)} weights")
        if any((not math.isfinite(float(w))) or float(w) <= 0 for w in weights):
            raise ConfigError(f"blending weights must be positive, got {list(weights)}")
        if size < 0:
            raise ConfigError(f"BlendedDataset size must be >= 0, got {size}")
        self.datasets = list(datasets)
        total = float(sum(weights))
        self.weights = [float(w) / total for w in weights]
        self.size = int(size)
        self.seed = int(seed)
        self.dataset_index, self.dataset_sample_index = blending_indices(self.weights, self.size)
        counts = np.bincount(self.dataset_index, minlength=len(self.datasets)) if size else np.zeros(len(self.datasets), int)
        for d, (ds, need) in enumerate(zip(self.datasets, counts)):
            if need > len(ds):
                raise DataError(
                    f"blended dataset component {d} has {len(ds)} samples but the blend needs {need}; "
                    "build components with a margin (build_gpt_datasets does)"
                )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> Any:
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"sample {i} out of range for {self.size} blended samples")
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]


def component_size(weight: float, size: int) -> int:
    """Samples to build for a component of normalized ``weight`` in a blend of ``size``: 0.5% margin
    (as Megatron) and at least one more than the exact share, so the blend never runs out."""
    if size <= 0:
        return 0
    return max(math.ceil(weight * size * 1.005), math.ceil(weight * size) + 1)


SPLIT_NAMES = ("train", "valid", "test")


def split_documents(num_docs: int, splits_string: str = "969,30,1") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contiguous train/valid/test document-id ranges in proportion to ``splits_string``.

    ``"969,30,1"`` (or ``"969/30/1"``; missing parts are 0) is normalized; boundaries are the rounded
    cumulative fractions of ``num_docs``. Returns three int64 arrays of document ids (possibly empty).
    """
    parts = [p.strip() for p in re.split(r"[,/]", str(splits_string)) if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"data.splits_string={splits_string!r} must be numbers like '969,30,1'") from None
    if not 1 <= len(values) <= 3 or any(v < 0 or not np.isfinite(v) for v in values) or sum(values) <= 0:
        raise ConfigError(
            f"data.splits_string={splits_string!r} must be 1 to 3 non-negative numbers with a positive sum, e.g. '969,30,1'"
        )
    values += [0.0] * (3 - len(values))
    cum = np.cumsum(values) / sum(values)
    bounds = [0] + [min(num_docs, int(round(c * num_docs))) for c in cum]
    bounds[-1] = num_docs
    return tuple(np.arange(bounds[i], bounds[i + 1], dtype=np.int64) for i in range(3))  # type: ignore[return-value]


def build_blended_splits(data_prefix: Sequence[Any] | str, *, splits_string: str, num_samples: tuple[int, int, int],
                         seed: int, make: Callable[[Any, np.ndarray, int, str], Any],
                         skippable: tuple[type[Exception], ...] = ()) -> tuple[Any | None, Any | None, Any | None]:
    """(train, valid, test) datasets over one or several weighted corpora (``data.data_prefix``).

    ``make(indexed, documents, num_samples, split_name)`` builds one component. One prefix gives
    its component directly; several give a :class:`BlendedDataset` per split over the components
    that have documents in that split (weights renormalized among them), each built with a small
    margin (:func:`component_size`). A split is None when its ``num_samples`` is 0 or no component
    has documents in it; a valid/test split whose build raises one of ``skippable`` is skipped with
    a warning (the train split re-raises).
    """
    prefixes, weights = parse_data_prefix(data_prefix)
    if len(num_samples) != 3:
        raise ConfigError(f"num_samples must be (train, valid, test), got {num_samples!r}")
    indexed = [open_indexed(p) for p in prefixes]
    splits = [split_documents(len(ds), splits_string) for ds in indexed]
    out: list[Any | None] = []
    for s, n in enumerate(num_samples):
        members = [c for c in range(len(indexed)) if splits[c][s].size]
        if n <= 0 or not members:
            out.append(None)
            continue
        total = sum(weights[c] for c in members)
        w = [weights[c] / total for c in members]
        try:
            if len(indexed) == 1:
                out.append(make(indexed[0], splits[0][s], int(n), SPLIT_NAMES[s]))
                continue
            comps = [make(indexed[c], splits[c][s], component_size(wc, int(n)), SPLIT_NAMES[s])
                     for c, wc in zip(members, w)]
        except skippable as e:
            if s == 0:
                raise
            logger.warning("no %s samples (%s); the %s split is skipped", SPLIT_NAMES[s], e,
                                                SPLIT_NAMES[s])
            out.append(None)
            continue
        out.append(BlendedDataset(comps, w, int(n), seed))
    return tuple(out)  # type: ignore[return-value]
