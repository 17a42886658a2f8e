"""Incremental seq2seq decoding for :class:`~toolkit.models.t5.model.T5Model`: the encoder runs
once, cross-attention keys are cached on the first step, and each step feeds one new token."""

from __future__ import annotations

from typing import Callable

import torch

Sampler = Callable[[torch.Tensor], torch.Tensor]  # last-position logits [b, V] -> next ids [b]


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


@torch.no_grad()
def generate_seq2seq(model, encoder_tokens: torch.Tensor, *, max_new_tokens: int,
                     encoder_padding_mask: torch.Tensor | None = None, decoder_start_id: int = 0,
                     eos_id: int | None = None, sample: Sampler = greedy) -> torch.Tensor:
    """Decode up to ``max_new_tokens`` ids [b, n] for ``encoder_tokens`` [b, s_enc].

    The decoder starts from ``decoder_start_id`` (T5: the pad id, 0). ``sample`` maps the logits of
    the last position to the next ids (greedy by default; pass e.g. a closure over
    ``toolkit.generation.sample_next`` for temperature/top-k/top-p). Sequences that produced
    ``eos_id`` keep emitting it; decoding stops when all have.
    """
    model.eval()
    b = encoder_tokens.shape[0]
    device = encoder_tokens.device
    dtype = next(model.parameters()).dtype
    encoder_hidden = model.encode(encoder_tokens, encoder_padding_mask)  # [b, s_enc, hidden]
    caches = model.new_caches(b, max(1, max_new_tokens), encoder_tokens.shape[1], device=device, dtype=dtype)
    token = torch.full((b, 1), decoder_start_id, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    out: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        logits = model.decode(token, encoder_hidden, encoder_padding_mask, start_pos=step, caches=caches)[:, -1]
        nxt = sample(logits)  # [b]
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        out.append(nxt)
        if eos_id is not None and bool(done.all()):
            break
        token = nxt[:, None]
    return torch.stack(out, dim=1) if out else encoder_tokens.new_zeros(b, 0)
