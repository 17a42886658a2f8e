"""T5 span corruption: lengths, noise statistics, sentinels, reconstruction, determinism, real corpus."""

from __future__ import annotations

import gzip
from itertools import islice

import numpy as np
import pytest

from toolkit.config import load_config
from toolkit.data.t5_dataset import (
    IGNORE_INDEX,
    T5Dataset,
    build_t5_datasets,
    corrupt_spans,
    noise_counts,
    random_spans_noise_mask,
    span_corruption_lengths,
)
from toolkit.errors import ConfigError

SENTINELS = list(range(10_000, 10_100))  # <extra_id_0> … <extra_id_99> stand-ins
EOS, PAD = 1, 0


class Windows:
    """Packed windows of unique tokens: window i holds 1000·i + 100 … (never a special id)."""

    def __init__(self, n: int, length: int):
        self.n, self.length = n, length

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"tokens": 100 + 1000 * i + np.arange(self.length + 1)}


def dataset(seq_length=512, decoder_seq_length=None, n=400, seed=7, split=0) -> T5Dataset:
    raw, targets = span_corruption_lengths(seq_length)
    return T5Dataset(Windows(n, raw), seq_length=seq_length, decoder_seq_length=decoder_seq_length or targets,
                     noise_density=0.15, mean_noise_span_length=3.0, sentinel_ids=SENTINELS, eos_id=EOS, pad_id=PAD,
                     seed=seed, split=split)


def reconstruct(inputs: np.ndarray, targets: np.ndarray, sentinels=SENTINELS) -> np.ndarray:
    """Original tokens from inputs + targets: each input sentinel k → the target tokens after sentinel k."""
    assert inputs[-1] == EOS and targets[-1] == EOS  # the appended EOS (the stream holds EOS between documents)
    sentinel_set = set(sentinels)
    spans, current = {}, None
    for t in targets[:-1].tolist():
        if t in sentinel_set:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    out = []
    for t in inputs[:-1].tolist():
        out.extend(spans[t] if t in sentinel_set else [t])
    return np.asarray(out)


def test_lengths_follow_t5():
    # compute_input_and_target_lengths(512, 0.15, 3) in T5 / HF's run_t5_mlm_flax gives (568, 114)
    assert span_corruption_lengths(512) == (568, 114)
    assert span_corruption_lengths(128) == (141, 29)
    assert noise_counts(568, 0.15, 3.0) == (85, 28)
    for seq in (16, 64, 128, 256, 512, 1024):
        raw, targets = span_corruption_lengths(seq)
        noise, spans = noise_counts(raw, 0.15, 3.0)
        assert raw - noise + spans + 1 == seq and noise + spans + 1 == targets
        noise1, spans1 = noise_counts(raw + 1, 0.15, 3.0)
        assert (raw + 1) - noise1 + spans1 + 1 > seq  # raw is the largest length that fits


@pytest.mark.parametrize("seq", [64, 512])
def test_every_sample_has_exact_lengths_and_masks(seq):
    ds = dataset(seq, n=50)
    for i in range(len(ds)):
        s = ds[i]
        assert s["encoder_tokens"].shape == (seq,) and s["encoder_tokens"][-1] == EOS
        assert s["labels"].shape == (ds.targets_length,) and s["labels"][-1] == EOS
        assert s["encoder_padding_mask"].all() and s["decoder_padding_mask"].all()
        assert s["decoder_tokens"][0] == PAD and np.array_equal(s["decoder_tokens"][1:], s["labels"][:-1])
        assert all(v.dtype in (np.int64, np.bool_) for v in s.values())


def test_longer_decoder_is_right_padded():
    ds = dataset(64, decoder_seq_length=20)
    s = ds[3]
    n = ds.targets_length  # 14
    assert s["labels"].shape == s["decoder_tokens"].shape == s["decoder_padding_mask"].shape == (20,)
    assert (s["labels"][n:] == IGNORE_INDEX).all() and (s["decoder_tokens"][n:] == PAD).all()
    assert s["decoder_padding_mask"].sum() == n and s["labels"][n - 1] == EOS
    assert np.array_equal(s["decoder_tokens"][1:n], s["labels"][: n - 1])


def test_too_short_decoder_or_too_few_sentinels_is_a_clear_error():
    with pytest.raises(ConfigError, match="model.decoder_seq_length=114"):
        dataset(512, decoder_seq_length=100)
    raw, t = span_corruption_lengths(512)
    with pytest.raises(ConfigError, match="needs 28 sentinel tokens"):
        T5Dataset(Windows(2, raw), seq_length=512, decoder_seq_length=t, noise_density=0.15,
                  mean_noise_span_length=3.0, sentinel_ids=SENTINELS[:10], eos_id=EOS, pad_id=PAD, seed=0)


def test_noise_density_and_mean_span_length():
    ds = dataset(512, n=300)
    noise_tokens = spans = 0
    span_lengths: list[int] = []
    per_position = np.zeros(ds.raw_length)
    for i in range(len(ds)):
        mask = random_spans_noise_mask(ds.raw_length, 0.15, 3.0, ds.rng(i))
        per_position += mask
        noise_tokens += int(mask.sum())
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
        lengths = edges[1::2] - edges[::2]
        spans += lengths.size
        span_lengths.extend(lengths.tolist())
        assert not mask[0] and mask[-1]  # T5's interleaving: non-noise first, noise last
    assert abs(noise_tokens / (len(ds) * ds.raw_length) - 0.15) < 0.005
    assert abs(noise_tokens / spans - 3.0) < 0.1
    assert 1 == min(span_lengths) and max(span_lengths) >= 10  # random lengths, not fixed 3s
    middle = per_position[50:-50] / len(ds)  # every position is corrupted about equally often
    assert abs(middle.mean() - 0.15) < 0.01 and middle.max() < 0.3


def test_sentinels_in_order_and_matching():
    ds = dataset(512, n=60)
    for i in range(len(ds)):
        s = ds[i]
        inputs, targets = s["encoder_tokens"], s["labels"]
        in_sent = [t for t in inputs.tolist() if t in SENTINELS]
        tgt_sent = [t for t in targets.tolist() if t in SENTINELS]
        assert in_sent == tgt_sent == SENTINELS[: len(in_sent)]
        assert len(in_sent) == noise_counts(ds.raw_length, 0.15, 3.0)[1]
        assert targets[0] == SENTINELS[0]  # the first span of targets is always a sentinel
        # no two sentinels are adjacent: every span is non-empty on both sides
        assert not any(a in SENTINELS and b in SENTINELS for a, b in zip(inputs[:-1], inputs[1:]))


def test_inputs_and_targets_reconstruct_the_original_tokens():
    ds = dataset(256, n=40)
    for i in range(len(ds)):
        s = ds[i]
        original = ds.windows[i]["tokens"][: ds.raw_length]
        assert np.array_equal(reconstruct(s["encoder_tokens"], s["labels"]), original)


def test_corrupt_spans_small_example():
    tokens = np.arange(20, 30)
    mask = np.array([0, 0, 1, 1, 0, 0, 0, 1, 0, 1], dtype=bool)
    inputs, targets = corrupt_spans(tokens, mask, [90, 91, 92], eos_id=EOS)
    assert inputs.tolist() == [20, 21, 90, 24, 25, 26, 91, 28, 92, EOS]
    assert targets.tolist() == [90, 22, 23, 91, 27, 92, 29, EOS]


def test_samples_are_a_pure_function_of_seed_and_index():
    a, b = dataset(128, seed=3), dataset(128, seed=3)
    order = np.random.default_rng(0).permutation(len(a))[:30]
    first = {int(i): a[int(i)] for i in order}
    for i in sorted(first):  # a different access order gives identical samples
        for k, v in b[i].items():
            assert np.array_equal(v, first[i][k])
    other = dataset(128, seed=4)
    assert any(not np.array_equal(other[i]["encoder_tokens"], a[i]["encoder_tokens"]) for i in range(10))
    valid = dataset(128, seed=3, split=1)
    assert any(not np.array_equal(valid[i]["encoder_tokens"], a[i]["encoder_tokens"]) for i in range(10))


# ----------------------------------------------------------------------------------------------
# the real pipeline: shipped T5 tokenizer, preprocessing, builder


@pytest.fixture(scope="module")
def t5_corpus(tmp_path_factory):
    from toolkit.assets import corpora_dir
    from toolkit.data.preprocess import preprocess
    from toolkit.tokenization import load_tokenizer

    tok = load_tokenizer("english-t5-spm")
    folder = tmp_path_factory.mktemp("t5corpus")
    src = folder / "docs.jsonl"
    with gzip.open(corpora_dir() / "english.jsonl.gz", "rt", encoding="utf-8") as f:
        src.write_text("".join(islice(f, 150)))
    preprocess([src], folder / "docs", tok, workers=1, progress=False)
    return tok, str(folder / "docs")


def test_builder_on_the_shipped_tokenizer(t5_corpus, tmp_path):
    tok, prefix = t5_corpus
    assert tok.pad_id == 0 and tok.eos_id == 1 and tok.unk_id == 2 and len(tok.sentinel_ids) == 100
    assert tok.sentinel_ids == [tok.token_to_id(f"<extra_id_{k}>") for k in range(100)]
    cfg = load_config("t5-tiny", [f"data.index_cache_dir={tmp_path}", "trainer.seed=11", "data.splits_string=8,1,1"])
    train, valid, test = build_t5_datasets(cfg, tok, [prefix], (20, 8, 4))
    assert (len(train), len(valid), len(test)) == (20, 8, 4)
    for i in range(len(train)):
        s = train[i]
        assert s["encoder_tokens"].shape == (128,) and s["labels"].shape == (29,)
        raw = np.asarray(train.windows[i]["tokens"][: train.raw_length])
        rebuilt = reconstruct(s["encoder_tokens"], s["labels"], tok.sentinel_ids)
        assert np.array_equal(rebuilt, raw)
        assert tok.decode(rebuilt) == tok.decode(raw)
    again = build_t5_datasets(cfg, tok, [prefix], (20, 8, 4))[0]
    assert all(np.array_equal(again[i]["encoder_tokens"], train[i]["encoder_tokens"]) for i in range(len(train)))
    text = tok.decode(train[0]["encoder_tokens"])
    assert len(text) > 100  # sentinels and EOS are dropped on decode


def test_collated_batch_feeds_the_objective(t5_corpus, tmp_path):
    import torch

    from toolkit.data.sampler import collate
    from toolkit.models.build import build_model
    from toolkit.models.t5.objective import t5_span_corruption

    tok, prefix = t5_corpus
    cfg = load_config("t5-tiny", [f"data.index_cache_dir={tmp_path}", "model.num_layers=1",
                                  "model.num_decoder_layers=1", "model.hidden_size=32", "model.kv_channels=8",
                                  "model.ffn_hidden_size=64"])
    cfg.model.vocab_size = tok.vocab_size
    train = build_t5_datasets(cfg, tok, [prefix], (4, 0, 0))[0]
    batch = collate([train[i] for i in range(4)])
    assert batch["encoder_padding_mask"].dtype == torch.bool and batch["labels"].dtype == torch.int64
    model = build_model(cfg.model)
    model.init_weights(0)
    loss = t5_span_corruption(model, batch)
    assert torch.isfinite(loss) and loss.item() > 5.0  # about ln(8000) at init
