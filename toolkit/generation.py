"""Text generation with a KV cache: greedy, temperature, top-k and top-p sampling."""

from __future__ import annotations

import torch
from torch import nn

from toolkit.errors import ConfigError


def sample_next(logits: torch.Tensor, *, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next ids [b] from last-position logits [b, V]; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # [b, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             seed: int | None = None) -> torch.Tensor:
    """Continue ``prompt`` [b, s] by up to ``max_new_tokens``; returns only the new ids [b, n]."""
    model.eval()
    b, s = prompt.shape
    max_len = min(s + max_new_tokens, model.cfg.max_position_embeddings or model.cfg.seq_length) \
        if model.cfg.position_embedding_type == "learned_absolute" else s + max_new_tokens
    max_new_tokens = max(0, max_len - s)
    dtype = next(model.parameters()).dtype
    caches = model.new_caches(b, max_len, device=prompt.device, dtype=dtype)
    gen = torch.Generator(device=prompt.device).manual_seed(seed) if seed is not None else None
    logits = model(prompt, caches=caches)[:, -1]
    out = []
    done = torch.zeros(b, dtype=torch.bool, device=prompt.device)
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
        out.append(nxt)
        if eos_id is not None:
            done |= nxt == eos_id
            if bool(done.all()):
                break
        if i + 1 < max_new_tokens:
            logits = model(nxt[:, None], start_pos=s + i, caches=caches)[:, -1]
    return torch.stack(out, dim=1) if out else prompt.new_zeros(b, 0)


@torch.no_grad()
def generate_pipelined(pipeline, prompt: torch.Tensor, *, max_new_tokens: int, temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
                       seed: int | None = None) -> torch.Tensor:
    """:func:`generate` across the stages of a pipeline (``toolkit.parallel.pipeline.Pipeline``) —
    collective over every rank of the job, each with the same ``prompt`` [b, s].

    Each stage keeps the KV caches of its own layers; hidden states [b, n, hidden] go stage to stage
    with send/recv over the pipeline group; the last stage samples and broadcasts each token to the
    pipeline. Needs tensor_model_parallel_size = 1 (data-parallel replicas run in lockstep).
    Returns the new ids [b, n] on every rank.
    """
    import torch.distributed as dist

    parts = dict(zip(pipeline.stage_indices, pipeline.parts))
    first = pipeline.parts[0]
    cfg, group, pp = first.cfg, pipeline.group, pipeline.pp_size
    b, s = prompt.shape
    max_len = min(s + max_new_tokens, cfg.max_position_embeddings or cfg.seq_length) \
        if cfg.position_embedding_type == "learned_absolute" else s + max_new_tokens
    max_new_tokens = max(0, max_len - s)
    dtype = next(first.parameters()).dtype
    for part in pipeline.parts:
        part.eval()
    caches = {i: part.new_caches(b, max_len, device=prompt.device, dtype=dtype) for i, part in parts.items()}
    gen = torch.Generator(device=prompt.device).manual_seed(seed) if seed is not None else None
    tokens, start, out = prompt, 0, []
    done = torch.zeros(b, dtype=torch.bool, device=prompt.device)
    for _i in range(max_new_tokens):
        h = None
        nxt = torch.empty(b, dtype=torch.long, device=prompt.device)
        for stage in range(pipeline.num_stages):  # stage s runs on pipeline rank s % pp
            if stage not in parts:
                continue
            if stage == 0:
                h = tokens
            else:  # from the previous stage, on another pipeline rank (pp > 1)
                h = torch.empty(b, tokens.shape[1], cfg.hidden_size, dtype=dtype, device=prompt.device)
                dist.recv(h, group=group, group_src=(stage - 1) % pp)
            h = parts[stage](h, start_pos=start, caches=caches[stage])
            if stage < pipeline.num_stages - 1:
                dist.send(h.contiguous(), group=group, group_dst=(stage + 1) % pp)
            else:
                nxt = sample_next(h[:, -1], temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
        dist.broadcast(nxt, group=group, group_src=(pipeline.num_stages - 1) % pp)
        out.append(nxt)
        if eos_id is not None:
            done |= nxt == eos_id
            if bool(done.all()):
                break
        tokens, start = nxt[:, None], start + tokens.shape[1]
    return torch.stack(out, dim=1) if out else prompt.new_zeros(b, 0)


def generate_text(model: nn.Module, tokenizer, prompt: str, *, max_new_tokens: int = 50, device=None,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  seed: int | None = None) -> str:
    """Continue ``prompt`` text (decoder-only), or answer it (encoder–decoder: the prompt is the
    encoder input, as T5 fills ``<extra_id_0>`` spans); returns only the generated text. ``model``
    may be a pipeline (``toolkit.parallel.pipeline.Pipeline``): see :func:`generate_pipelined`."""
    device = device or (model.device if hasattr(model, "stage_indices") else next(model.parameters()).device)
    if getattr(model, "is_encoder_decoder", False):
        gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        ids = tokenizer.encode(prompt) + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
        new = model.generate_seq2seq(
            torch.tensor([ids], device=device), max_new_tokens=max_new_tokens,
            decoder_start_id=tokenizer.pad_id or 0, eos_id=tokenizer.eos_id,
            sample=lambda logits: sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                              generator=gen),
        )[0].tolist()
        stop = tokenizer.eos_id
    elif hasattr(model, "new_caches") or hasattr(model, "stage_indices"):  # a model, or a pipeline of stages
        ids = tokenizer.encode(prompt) or [tokenizer.eod_id]
        run = generate_pipelined if hasattr(model, "stage_indices") else generate
        new = run(model, torch.tensor([ids], device=device), max_new_tokens=max_new_tokens,
                  eos_id=tokenizer.eod_id, temperature=temperature, top_k=top_k, top_p=top_p,
                  seed=seed)[0].tolist()
        stop = tokenizer.eod_id
    else:
        raise ConfigError(f"{type(model).__name__} is an encoder without a decoder; generation needs a GPT or T5 run")
    if stop in new:
        new = new[: new.index(stop)]
    return tokenizer.decode(new)


def generate_reply(model: nn.Module, tokenizer, prompt: str, *, max_new_tokens: int = 50, device=None,
                   temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   seed: int | None = None) -> str:
    """``prompt`` answered by a decoder fine-tuned with SFT: continued until the end token SFT trains
    (the tokenizer's eos, else eod), which is cut off. A prompt longer than the model's positions keeps
    its end, as training cuts from the start."""
    from toolkit.data.tasks.sft import end_token_id

    eos = end_token_id(tokenizer)
    limit = model.cfg.max_position_embeddings or model.cfg.seq_length
    ids = tokenizer.encode(prompt)[-(limit - 1):]  # room for at least one new token
    device = device or next(model.parameters()).device
    new = generate(model, torch.tensor([ids], device=device), max_new_tokens=max_new_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, eos_id=eos, seed=seed)[0].tolist()
    return tokenizer.decode(new[: new.index(eos)] if eos in new else new)


def generate_chat(model: nn.Module, tokenizer, messages: list[dict], *, template: str, **sampling) -> str:
    """The assistant's reply to ``messages`` (``role``/``content`` dicts): the conversation rendered with
    the chat ``template`` and its generation prompt, answered by :func:`generate_reply`."""
    from toolkit.data.tasks.sft import chat_prompt

    return generate_reply(model, tokenizer, chat_prompt(template, messages, tokenizer), **sampling)
