"""Perplexity of a decoder run (GPT/Llama, pretraining or SFT) on a text file or an indexed dataset:
``megaforge evaluate RUN --perplexity --data FILE|PREFIX [--stride N]``.

The data becomes one token stream, as pretraining sees it: a ``.jsonl`` file's ``text`` fields (or a
``.txt`` file, one document) tokenized and each followed by the end-of-document token, or an indexed
dataset's documents (``PREFIX.bin``/``.idx``, megaforge's or Megatron-LM's; their end-of-document
tokens are already in them) concatenated. The stream is scored in windows of ``model.seq_length``
tokens that start ``stride`` tokens apart, the sliding-window evaluation of Hugging Face's
perplexity guide: a token is predicted once, by the first window that reaches it, from all earlier
tokens of that window — at least ``seq_length - stride`` of them. With ``stride < seq_length``
every token after the first is scored; with the default ``stride = seq_length`` (disjoint windows,
the fastest) the first token of each window has no context and is not scored, as in the guide. The
loss is the token-weighted mean negative log-likelihood over the scored tokens, and the perplexity
its exponential.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from toolkit.data.tasks.formats import json_lines, read_text
from toolkit.errors import ConfigError, DataError
from toolkit.training.generative import load_lm_run, require_decoder

logger = logging.getLogger(__name__)


def read_token_stream(data: str | Path, tokenizer, *, json_key: str = "text") -> np.ndarray:
    """The token ids [n] of a ``.jsonl``/``.txt`` file or an indexed dataset prefix."""
    path = Path(data)
    if path.suffix in (".jsonl", ".txt") and path.is_file():
        eod = tokenizer.eod_id
        if path.suffix == ".txt":
            texts = [read_text(path)]
        else:
            texts = []
            for where, obj in json_lines(path):
                if not isinstance(obj, dict) or not isinstance(obj.get(json_key), str):
                    raise DataError(f"{where}: each line needs a string {json_key!r}")
                texts.append(obj[json_key])
        ids: list[int] = []
        for text in texts:
            ids.extend(tokenizer.encode(text))
            if eod is not None:
                ids.append(eod)
        return np.asarray(ids, dtype=np.int64)
    prefix = str(path)[:-4] if path.suffix in (".bin", ".idx") else str(path)
    if not (Path(prefix + ".idx").is_file() and Path(prefix + ".bin").is_file()):
        raise DataError(f"{data}: not a .jsonl or .txt file, nor an indexed dataset (PREFIX.bin + PREFIX.idx); "
                        "pass one of those")
    from toolkit.data.megatron_indexed import open_indexed

    ds = open_indexed(prefix)
    if len(ds) == 0:
        raise DataError(f"{prefix}.idx holds no documents")
    return np.concatenate([np.asarray(ds[i], dtype=np.int64) for i in range(len(ds))])


def windows(n: int, length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first)`` of each window over a stream of ``n`` tokens: tokens ``[begin, end)`` go
    in, targets ``[first, end)`` are scored (each at most once; a window's first token has no context)."""
    out, prev_end = [], 0
    for begin in range(0, max(n - 1, 1), stride):
        end = min(begin + length, n)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n:
            break
    return out


@torch.no_grad()
def stream_perplexity(model: nn.Module, ids: np.ndarray, *, seq_length: int, stride: int | None = None,
                      batch_size: int = 8) -> dict:
    """``{"loss", "ppl", "num_tokens", "num_windows", "stride"}`` of ``model`` on the token stream ``ids``."""
    stride = stride or seq_length
    if not 0 < stride <= seq_length:
        raise ConfigError(f"--stride must be between 1 and the model's seq_length {seq_length} (got {stride})")
    if len(ids) < 2:
        raise DataError("the data holds fewer than 2 tokens; perplexity needs at least one predicted token")
    model.eval()
    device = next(model.parameters()).device
    wins = windows(len(ids), seq_length, stride)
    stream = torch.as_tensor(ids, device=device)
    total, count = 0.0, 0
    by_length: dict[int, list[tuple[int, int, int]]] = {}  # windows of one length batch together
    for w in wins:
        by_length.setdefault(w[1] - w[0], []).append(w)
    for group in by_length.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            tokens = torch.stack([stream[b:e] for b, e, _ in chunk])  # [k, length]
            logits = model(tokens)[:, :-1].float()  # [k, length - 1, V]
            nll = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
            nll = nll.view(len(chunk), -1)  # [k, length - 1]: column j predicts token begin + j + 1
            for row, (b, e, first) in zip(nll, chunk):
                total += float(row[first - b - 1:].double().sum())
                count += e - first
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "num_tokens": count, "num_windows": len(wins),
            "stride": stride}


def perplexity_run(run_dir: str | Path, data: str | Path | None, *, stride: int | None = None, device: str = "cpu",
                   batch_size: int = 8) -> dict:
    """Perplexity of the run's model (its best checkpoint if kept) on ``data``; written to
    ``RUN_DIR/eval_perplexity.json`` and returned."""
    require_decoder(run_dir)
    if not data:
        raise ConfigError("perplexity needs --data: a .jsonl file ('text' per line), a .txt file or an indexed "
                          "dataset prefix")
    model, cfg, tokenizer, src = load_lm_run(run_dir, device=device)
    ids = read_token_stream(data, tokenizer)
    scores = stream_perplexity(model, ids, seq_length=cfg.model.seq_length, stride=stride, batch_size=batch_size)
    result = {"data": str(data), "checkpoint": str(src), "seq_length": cfg.model.seq_length, **scores}
    out = Path(run_dir) / "eval_perplexity.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    logger.info(f"perplexity of {src} on {data}: loss={scores['loss']:.4f} ppl={scores['ppl']:.3f} over "
                f"{scores['num_tokens']} tokens ({scores['num_windows']} windows, stride {scores['stride']}) → {out}")
    return result
