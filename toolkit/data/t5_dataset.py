"""T5 span-corruption pretraining dataset (Raffel et al. 2020, "span corruption" objective).

Each sample starts from ``raw_length`` consecutive tokens of the packed corpus stream (documents back
to back, each followed by EOS, exactly the GPT packing of :mod:`toolkit.data.gpt_dataset` with
windows of ``raw_length`` tokens). A random ``noise_density`` share of them (0.15), in spans of mean
length ``mean_noise_span_length`` (3), is corrupted as T5's ``random_spans_noise_mask`` does: the
noise and non-noise token counts are each split into ``num_noise_spans`` random non-empty segments
that are interleaved, non-noise first and noise last. Then:

* inputs: the non-noise tokens, each noise span replaced by one sentinel (``<extra_id_0>``,
  ``<extra_id_1>``, … in order), then EOS;
* targets: for each noise span, its sentinel followed by the span's tokens, then EOS.

``raw_length`` is chosen as T5's ``compute_input_and_target_lengths`` does: the largest length whose
inputs fit ``model.seq_length``; the inputs are then exactly ``seq_length`` tokens and the targets
exactly :func:`span_corruption_lengths`'s ``targets_length`` (seq_length 512 → 568 raw tokens, 114
targets). ``model.decoder_seq_length`` must be at least that; longer targets are right-padded (pad
id, labels -100). Decoder inputs are the targets shifted right behind a start token (the pad id, as
in T5).

Sample ``i`` is a pure function of ``(seed, split, i)``: the window comes from the seeded GPT index
and the noise mask from ``np.random.RandomState`` seeded with ``(seed, split, i)`` (a frozen,
version-stable stream), so a resumed run sees exactly the same samples.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from toolkit.errors import ConfigError

IGNORE_INDEX = -100  # label of padded target positions (matches toolkit.models.common.loss)
_RNG_TAG = 0x75C0  # decorrelates the noise-mask stream from the GPT index shuffles (which use RandomState(seed))


def noise_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """``(num_noise_tokens, num_noise_spans)`` for ``length`` raw tokens, as T5 computes them."""
    num_noise = int(round(length * noise_density))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    return num_noise, num_spans


def span_corruption_lengths(inputs_length: int, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> tuple[int, int]:
    """``(raw_length, targets_length)``: raw tokens that corrupt into exactly ``inputs_length``
    input tokens (EOS included), and the length of the targets they give (EOS included)."""
    if inputs_length < 4 or not 0.0 < noise_density < 1.0 or mean_noise_span_length < 1.0:
        raise ConfigError(f"span corruption needs model.seq_length >= 4, 0 < data.noise_density < 1 and "
                          f"data.mean_noise_span_length >= 1 (got {inputs_length}, {noise_density}, "
                          f"{mean_noise_span_length})")

    def lengths(raw: int) -> tuple[int, int]:
        noise, spans = noise_counts(raw, noise_density, mean_noise_span_length)
        return raw - noise + spans + 1, noise + spans + 1

    raw = inputs_length
    while lengths(raw + 1)[0] <= inputs_length:
        raw += 1
    inputs, targets = lengths(raw)
    noise, spans = noise_counts(raw, noise_density, mean_noise_span_length)
    if inputs != inputs_length or raw - noise < spans:
        raise ConfigError(f"model.seq_length={inputs_length} is too short for span corruption with "
                          f"data.noise_density={noise_density}; use a longer sequence")
    return raw, targets


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.RandomState) -> np.ndarray:
    """Lengths (int64 [num_segments], each >= 1, summing to ``num_items``) of a uniformly random
    split of ``num_items`` items into ``num_segments`` non-empty runs."""
    cuts = np.sort(rng.permutation(num_items - 1)[: num_segments - 1]) + 1  # [num_segments - 1] boundaries
    return np.diff(np.concatenate([[0], cuts, [num_items]])).astype(np.int64)


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.RandomState) -> np.ndarray:
    """bool [length]: True on corrupted tokens. Spans alternate non-noise, noise, …, ending with noise."""
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)  # [spans]
    nonnoise_lengths = _random_segmentation(length - num_noise, num_spans, rng)  # [spans]
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)  # [2 × spans]
    span_start = np.zeros(length, dtype=np.int64)  # 1 where a span (after the first) begins
    span_start[np.cumsum(interleaved)[:-1]] = 1
    return np.cumsum(span_start) % 2 == 1


def _replace_spans(tokens: np.ndarray, spans: np.ndarray, sentinels: np.ndarray) -> np.ndarray:
    """Each run of True in ``spans`` → one sentinel (the k-th run gets ``sentinels[k]``); other tokens kept."""
    first = spans & ~np.concatenate([[False], spans[:-1]])  # first token of each run
    span_id = np.cumsum(first) - 1  # run index at every position
    out = np.where(first, sentinels[np.clip(span_id, 0, None)], tokens)
    return out[~spans | first]


def corrupt_spans(tokens: np.ndarray, noise_mask: np.ndarray, sentinel_ids: Sequence[int],
                  eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, targets)`` int64 arrays for raw ``tokens`` and their ``noise_mask``.

    inputs: noise spans → sentinels, then EOS; targets: non-noise spans → sentinels (so noise span
    ``k`` follows sentinel ``k``), then EOS.
    """
    sentinels = np.asarray(sentinel_ids, dtype=np.int64)
    tokens = np.asarray(tokens, dtype=np.int64)
    eos = np.array([eos_id], dtype=np.int64)
    inputs = np.concatenate([_replace_spans(tokens, noise_mask, sentinels), eos])
    targets = np.concatenate([_replace_spans(tokens, ~noise_mask, sentinels), eos])
    return inputs, targets


class T5Dataset:
    """Span-corruption samples over a dataset of packed token windows (``{"tokens": [>= raw_length]}``).

    ``ds[i]`` holds (int64 unless noted)::

        encoder_tokens        [seq_length]           corrupted inputs, EOS last
        decoder_tokens        [decoder_seq_length]   pad (start), targets[:-1], then pad
        labels                [decoder_seq_length]   targets, then -100
        encoder_padding_mask  [seq_length] bool      True = real token (always all True here)
        decoder_padding_mask  [decoder_seq_length] bool  True = real target position
    """

    def __init__(self, windows: Any, *, seq_length: int, decoder_seq_length: int, noise_density: float,
                 mean_noise_span_length: float, sentinel_ids: Sequence[int], eos_id: int, pad_id: int, seed: int,
                 split: int = 0) -> None:
        self.windows = windows
        self.seq_length, self.decoder_seq_length = int(seq_length), int(decoder_seq_length)
        self.noise_density, self.mean_noise_span_length = float(noise_density), float(mean_noise_span_length)
        self.raw_length, self.targets_length = span_corruption_lengths(seq_length, noise_density,
                                                                       mean_noise_span_length)
        if decoder_seq_length < self.targets_length:
            raise ConfigError(
                f"model.decoder_seq_length={decoder_seq_length} is shorter than the {self.targets_length} target "
                f"tokens span corruption gives for model.seq_length={seq_length} (data.noise_density="
                f"{noise_density}, data.mean_noise_span_length={mean_noise_span_length}); set "
                f"model.decoder_seq_length={self.targets_length}")
        _, spans = noise_counts(self.raw_length, noise_density, mean_noise_span_length)
        if len(sentinel_ids) < spans:
            raise ConfigError(f"span corruption of {self.raw_length} tokens needs {spans} sentinel tokens "
                              f"(<extra_id_0> …) but the tokenizer has {len(sentinel_ids)}; use a T5 tokenizer "
                              "such as english-t5-spm")
        self.sentinel_ids = np.asarray(sentinel_ids, dtype=np.int64)
        self.eos_id, self.pad_id, self.seed, self.split = int(eos_id), int(pad_id), int(seed), int(split)

    def __len__(self) -> int:
        return len(self.windows)

    def rng(self, i: int) -> np.random.RandomState:
        """The noise-mask generator of sample ``i``: a function of ``(seed, split, i)`` only."""
        return np.random.RandomState([self.seed % 2**32, self.seed // 2**32 % 2**32, self.split,
                                      i % 2**32, i // 2**32, _RNG_TAG])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if i < 0:
            i += len(self)
        tokens = np.asarray(self.windows[i]["tokens"][: self.raw_length], dtype=np.int64)  # [raw_length]
        mask = random_spans_noise_mask(self.raw_length, self.noise_density, self.mean_noise_span_length, self.rng(i))
        inputs, targets = corrupt_spans(tokens, mask, self.sentinel_ids, self.eos_id)
        n, d = targets.size, self.decoder_seq_length
        labels = np.full(d, IGNORE_INDEX, dtype=np.int64)
        labels[:n] = targets
        decoder_tokens = np.full(d, self.pad_id, dtype=np.int64)
        decoder_tokens[1:n] = targets[:-1]  # shift right; position 0 is the start token (pad)
        return {
            "encoder_tokens": inputs,
            "decoder_tokens": decoder_tokens,
            "labels": labels,
            "encoder_padding_mask": np.ones(inputs.size, dtype=bool),
            "decoder_padding_mask": np.arange(d) < n,
        }

    def __repr__(self) -> str:
        return (f"T5Dataset({len(self)} samples: {self.raw_length} raw → {self.seq_length} input / "
                f"{self.targets_length} target tokens, over {self.windows!r})")


def build_t5_datasets(cfg: Any, tokenizer: Any, prefixes: Sequence[Any], num_samples: tuple[int, int, int]
                      ) -> tuple[T5Dataset | None, T5Dataset | None, T5Dataset | None]:
    """(train, valid, test) span-corruption datasets: the ``ModelSpec.datasets`` builder.

    ``cfg`` is a :class:`~toolkit.config.RunConfig`; windows of ``raw_length`` tokens come from
    :func:`~toolkit.data.gpt_dataset.build_gpt_datasets` over ``prefixes`` (blending included).
    """
    from toolkit.data.gpt_dataset import build_gpt_datasets

    m, d = cfg.model, cfg.data
    raw, _ = span_corruption_lengths(m.seq_length, d.noise_density, d.mean_noise_span_length)
    missing = [n for n in ("eos_id", "pad_id") if getattr(tokenizer, n, None) is None]
    if missing:
        raise ConfigError(f"T5 span corruption needs a tokenizer with </s> and <pad>; {missing[0]} is missing "
                          "(use a T5 tokenizer such as english-t5-spm)")
    # GPT windows hold raw + 1 tokens; T5Dataset takes the first raw (no token shared between samples).
    windows = build_gpt_datasets(prefixes, splits_string=d.splits_string, seq_length=raw, seed=cfg.trainer.seed,
                                 num_samples=num_samples, cache_dir=d.index_cache_dir)
    return tuple(  # type: ignore[return-value]
        None if w is None else T5Dataset(
            w, seq_length=m.seq_length, decoder_seq_length=m.decoder_seq_length, noise_density=d.noise_density,
            mean_noise_span_length=d.mean_noise_span_length, sentinel_ids=tokenizer.sentinel_ids,
            eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, seed=cfg.trainer.seed, split=s)
        for s, w in enumerate(windows))
